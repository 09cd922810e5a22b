"""Web app: the handler classifies and explains; in real headless Chromium an upload shows its result
and the page requests nothing off-host."""

from __future__ import annotations

import csv
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

pytest.importorskip("gradio")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_classify_files_explains_and_writes_csv(random_run, sample_pngs, tmp_path):
    from malaria_screen.app import classify_files
    from malaria_screen.inference import Predictor

    pt = Predictor.from_dir(random_run)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    summary, gallery, table, csv_path = classify_files(pt, [str(p) for p in sample_pngs[:3]] + [str(bad)], out_dir=tmp_path / "o")
    ref = list(pt.predict_files(sample_pngs[:3]))
    n_par = sum(r.label == "Parasitized" for r in ref)
    assert f"3 cells classified: {n_par} Parasitized" in summary and "1 file(s) failed" in summary
    assert len(gallery) == 3 and gallery[0][0].shape == (160, 320, 3)  # cell | Grad-CAM overlay
    assert [row[1] for row in table[:3]] == [r.label for r in ref] and table[3][3]
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["file"] for r in rows] == [p.name for p in sample_pngs[:3]] + ["notes.png"]


def test_onnx_model_runs_without_overlays(onnx_fp32, sample_pngs, tmp_path):
    from malaria_screen.app import classify_files
    from malaria_screen.inference import OnnxPredictor

    from PIL import Image

    Image.open(sample_pngs[1]).convert("L").save(tmp_path / "gray.png")
    files = [str(sample_pngs[0]), str(tmp_path / "gray.png")]
    summary, gallery, table, _ = classify_files(OnnxPredictor.from_file(onnx_fp32), files, out_dir=tmp_path)
    assert "1 cells classified" in summary and "PyTorch" in summary and "1 file(s) failed" in summary
    assert gallery[0][0].shape == (160, 160, 3)
    assert table[1][1] is None and "no colour (grayscale)" in table[1][3]


@pytest.fixture(scope="session")
def playwright_api(missing):
    """Playwright's sync API when Debian's Chromium and Playwright are installed; else skip
    (fail under ``CI=true``: a CI without the browser must not pass green). Listed first in a
    test's arguments, so that a missing browser is known before the model fixtures are built."""
    if not CHROMIUM.exists():
        missing("Debian chromium not installed (/usr/bin/chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        missing("playwright not installed")
    return sync_api


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
def test_upload_in_headless_chromium_shows_result_offline(playwright_api, random_run, sample_pngs, tmp_path):
    sync_api = playwright_api
    from malaria_screen.app import launch
    from malaria_screen.inference import Predictor

    pt = Predictor.from_dir(random_run)
    sample = next(p for p in sample_pngs if p.parent.name == "Parasitized")
    expected = next(pt.predict_files([sample])).label
    port = _free_port()
    demo = launch(pt, host="127.0.0.1", port=port, prevent_thread_lock=True, work_dir=tmp_path / "work")
    off_host: list[str] = []
    all_requests: list[str] = []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.on("request", lambda req: all_requests.append(req.url))
            page.on("request", lambda req: off_host.append(req.url)
                    if urlparse(req.url).hostname not in ("127.0.0.1", "localhost", None) and not req.url.startswith(("data:", "blob:"))
                    else None)
            # not "networkidle": the app's unload handler keeps Gradio's heartbeat connection open
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=60_000)
            page.get_by_role("tab", name="Cells").click(timeout=60_000)  # the app opens on the whole-field tab
            page.locator("#cell-files input[type=file]").set_input_files(str(sample))
            summary = page.locator("#summary")
            summary.get_by_text("cells classified").wait_for(timeout=60_000)
            text = summary.inner_text()
            assert "1 cells classified" in text
            assert f"{1 if expected == 'Parasitized' else 0} Parasitized" in text
            assert page.locator("#results").get_by_text(sample.name).count() >= 1
            assert page.locator("#gallery img").count() >= 1
            page.wait_for_timeout(1_000)  # late requests (fonts, icons) reach the off-host listener
            browser.close()
    finally:
        demo.close()
    assert len(all_requests) > 5  # the listener saw the page load its scripts, styles and fonts
    assert off_host == [], f"the page requested off-host resources: {off_host}"


def test_whole_field_tab_handler(onnx_fp32, demo_field):
    pytest.importorskip("skimage")
    from malaria_screen.app import screen_field_image
    from malaria_screen.data.io import decode_image
    from malaria_screen.inference import OnnxPredictor
    rgb = decode_image(demo_field)
    summary, overlay = screen_field_image(OnnxPredictor.from_file(onnx_fp32), rgb)
    assert "red cells" in summary and "parasitemia" in summary
    assert overlay.shape == rgb.shape and (overlay != rgb).any()
    assert screen_field_image(OnnxPredictor.from_file(onnx_fp32), None) == ("No field uploaded.", None)
    summary, overlay = screen_field_image(OnnxPredictor.from_file(onnx_fp32), rgb.mean(2).astype(np.uint8))
    assert "no colour (grayscale)" in summary and overlay is None


def test_slide_handler_totals_flags_and_gallery(demo_field, tmp_path):
    """Several fields of one slide: a photo is refused with its reason, the rest are screened, the
    slide total is the sum over counted fields, and the gallery holds the cells called Parasitized."""
    pytest.importorskip("skimage")
    import skimage.data
    from PIL import Image

    from malaria_screen.app import screen_slide_files
    from malaria_screen.data.io import decode_image
    from malaria_screen.inference import load_model
    from malaria_screen.smear.domain import load_reference
    from malaria_screen.smear.screen import screen_field

    model = load_model(backend="torch")
    ref = load_reference(model)
    Image.fromarray(skimage.data.coffee()).save(tmp_path / "coffee.png")
    summary, overlays, table, cells = screen_slide_files(model, [demo_field, str(tmp_path / "coffee.png")],
                                                         domain_reference=ref)
    res = screen_field(decode_image(demo_field), model, domain_reference=ref)
    assert f"Parasitized of {res.n_rbc} red cells in 1 field(s)" in summary
    assert "coffee.png" in summary and "not a blood smear field" in summary
    assert len(overlays) == 1 and overlays[0][0].shape == decode_image(demo_field).shape
    assert table[0][:3] == [Path(demo_field).name, res.n_rbc, res.n_infected] and table[0][4] is True
    assert table[1][0] == "coffee.png" and "not Giemsa-coloured" in table[1][6]
    n_pos = sum(c.label == "Parasitized" for c in res.cells)
    assert sum("(Parasitized)" in cap for _, cap in cells) == min(n_pos, 60)
    assert screen_slide_files(model, []) == ("No field uploaded.", [], [], [])


def test_slide_handler_keeps_two_fields_of_one_name_apart(demo_field, tmp_path):
    """Two uploads named alike (from two folders): two rows, two overlays, each with its own name."""
    pytest.importorskip("skimage")
    from PIL import Image

    from malaria_screen.app import screen_slide_files
    from malaria_screen.data.io import decode_image
    from malaria_screen.inference import load_model

    rgb = decode_image(demo_field)
    for folder, img in (("a", rgb), ("b", np.ascontiguousarray(rgb[:, ::-1]))):  # the second mirrored: other pixels
        (tmp_path / folder).mkdir()
        Image.fromarray(img).save(tmp_path / folder / "field.png")
    _, overlays, table, _ = screen_slide_files(load_model(), [str(tmp_path / "a" / "field.png"), str(tmp_path / "b" / "field.png")])
    assert [r[0] for r in table] == ["field.png", "field (2).png"]
    assert [cap.split(":")[0] for _, cap in overlays] == ["field.png", "field (2).png"]
    assert not np.array_equal(overlays[0][0], overlays[1][0])  # each field's own overlay


@pytest.mark.browser
def test_whole_field_tab_in_headless_chromium(playwright_api, random_run, demo_field, tmp_path):
    """The app opens on the 'Whole field' tab; clicking the example thumbnail screens it: the page
    shows the same slide count as the Python API, the flags table and the overlay."""
    pytest.importorskip("skimage")
    sync_api = playwright_api
    from malaria_screen.app import launch, screen_slide_files
    from malaria_screen.inference import Predictor

    pt = Predictor.from_dir(random_run)
    expected, _, table, _ = screen_slide_files(pt, [demo_field])
    n_rbc = table[0][1]
    port = _free_port()
    demo = launch(pt, host="127.0.0.1", port=port, prevent_thread_lock=True, work_dir=tmp_path / "work")
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=60_000)
            page.locator("#field-examples img").first.wait_for(timeout=60_000)
            assert page.locator("#field-examples img").count() >= 1  # opens on the whole-field tab, thumbnails shown
            page.locator("#field-examples img").first.click()
            summary = page.locator("#field-summary")
            summary.get_by_text("Slide parasitemia").wait_for(timeout=120_000)
            text = summary.inner_text()
            assert f"of {n_rbc} red cells in 1 field(s)" in text, (text, expected)
            assert page.locator("#field-out img").count() >= 1
            assert page.locator("#field-table").get_by_text(Path(demo_field).name).count() >= 1
            browser.close()
    finally:
        demo.close()


def test_app_limits_match_rest(onnx_fp32, sample_pngs, tmp_path):
    """Issue 23: 25 Mpx per image (was 100), 50 Mpx per click, the field tab decoding its file within
    the limit, uploads capped and deleted, a bounded queue."""
    from PIL import Image

    from malaria_screen.app import AppLimits, build_app, classify_files, screen_field_image
    from malaria_screen.inference import OnnxPredictor

    pred = OnnxPredictor.from_file(onnx_fp32)
    big = tmp_path / "big.png"
    Image.new("RGB", (5001, 5000), (200, 120, 150)).save(big)  # 25.005 Mpx, a small file
    ok = tmp_path / "ok.png"
    Image.new("RGB", (5000, 5000), (200, 120, 150)).save(ok)
    files = [str(big), str(ok), str(ok), str(ok), str(sample_pngs[0])]
    _, _, table, _ = classify_files(pred, files, out_dir=tmp_path / "o")
    assert "too large" in table[0][3] and "25,000,000" in table[0][3]
    assert table[1][3] is None and table[2][3] is None  # 2 x 25 Mpx: the whole 50 Mpx budget
    assert "pixel budget" in table[3][3] and "pixel budget" in table[4][3]
    summary, overlay = screen_field_image(pred, str(big))
    assert "too large" in summary and overlay is None
    demo = build_app(pred, limits=AppLimits(max_queue=3), work_dir=tmp_path / "w")
    assert demo.app_limits.max_file_bytes == 8 * 1024 * 1024 and demo._queue.max_size == 3
    assert demo.delete_cache == (900, 900)


@pytest.mark.slow
@pytest.mark.browser
def test_labelling_tab_in_headless_chromium(playwright_api, default_model_dir, demo_field, iml_dir, tmp_path):
    """Issue 20: add an example field and an uploaded IML field, label cells with the keyboard
    (p / u / n, z = undo), export the CSV and fit a site model: the page's counts, the exported
    file and the site folder agree with the labels typed; the before/after is shown as in-sample."""
    pytest.importorskip("skimage")
    sync_api = playwright_api
    from malaria_screen.app import launch
    from malaria_screen.inference import load_model
    from malaria_screen.inference.site import SitePredictor
    from malaria_screen.smear.adapt import read_labels_csv

    model = load_model(default_model_dir, backend="torch")
    iml_field = iml_dir / "images" / "PA171959.JPG"
    port = _free_port()
    work = tmp_path / "work"
    demo = launch(model, host="127.0.0.1", port=port, prevent_thread_lock=True, work_dir=work)
    keys = ["p", "p", "u", "p", "u", "n", "u", "n"]  # then z: the last 'n' is taken back
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=60_000)
            page.get_by_role("tab", name="Labelling").click(timeout=60_000)
            status = page.locator("#label-status")
            page.locator("#label-examples img").first.click(timeout=60_000)  # the bundled example field
            status.get_by_text("1 field(s)").wait_for(timeout=60_000)
            page.locator("#label-in input[type=file]").set_input_files(str(iml_field))
            status.get_by_text("2 field(s)").wait_for(timeout=60_000)
            assert page.locator("#label-batch img").count() == 12 and page.locator("#label-cell img").count() == 1
            page.evaluate("document.activeElement && document.activeElement.blur()")
            for k, key in enumerate(keys, start=1):
                page.keyboard.press(key)
                status.get_by_text(f"{k} labelled").wait_for(timeout=30_000)
            page.keyboard.press("z")
            status.get_by_text("7 labelled: 3 Parasitized, 3 Uninfected, 1 not a cell").wait_for(timeout=30_000)
            page.locator("#label-export").click()
            status.get_by_text("Exported 7 labels").wait_for(timeout=30_000)
            page.locator("#label-csv").get_by_text("labels").first.wait_for(timeout=30_000)  # the file to download
            page.locator("#label-adapt").click()
            result = page.locator("#label-result")
            result.get_by_text("Site model fitted").wait_for(timeout=120_000)
            text = result.inner_text()
            assert "in-sample" in text and "on 7 labelled cells" in text and "3 Parasitized" in text
            assert page.locator("#label-compare").get_by_text("PA171959.JPG").count() >= 1
            assert "site" in page.locator("#label-site").inner_text() and ".zip" in page.locator("#label-site").inner_text()
            (csv_path,) = work.glob("*/labelling/fields/labels.csv")
            cells = read_labels_csv(csv_path)
            assert [c.label for c in cells] == ["Parasitized", "Parasitized", "Uninfected", "Parasitized", "Uninfected",
                                                "not a cell", "Uninfected"]
            assert {Path(c.field).name for c in cells} <= {Path(demo_field).name, iml_field.name}
            site = load_model(csv_path.parents[1] / "site")
            assert isinstance(site, SitePredictor) and site.site.n_parasitized == 3 and site.site.n_not_a_cell == 1
            page.close()  # the tab closes: its session folder goes
            for _ in range(50):
                if not csv_path.parents[2].exists():
                    break
                time.sleep(0.2)
            assert not csv_path.parents[2].exists()
            browser.close()
    finally:
        demo.close()
