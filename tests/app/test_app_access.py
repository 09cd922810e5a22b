"""Web app access and budgets (issue 23): login keys, the refusal to listen beyond loopback without
one, the Host allow-list, the per-click CPU budget and the limits the running app reports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer_text import flat

pytest.importorskip("gradio")

SRC = Path(__file__).resolve().parents[2] / "src"
KEY = "test-key-8f2c1d"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def four_mpx_pngs(tmp_path) -> list[str]:
    """Three 2000x2000 stain-coloured PNGs: each costs well over a millisecond of CPU to decode."""
    from PIL import Image

    out = []
    for k in range(3):
        p = tmp_path / f"cell{k}.png"
        Image.new("RGB", (2000, 2000), (200, 120 + k, 150)).save(p)
        out.append(str(p))
    return out


def test_loopback_and_exposure_rule():
    from malaria_screen.app import AnonymousExposureError, AppAccess, check_exposure, is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org", ""))
    check_exposure("127.0.0.1", AppAccess())  # loopback: no login needed
    with pytest.raises(AnonymousExposureError, match="without a login"):
        check_exposure("0.0.0.0", AppAccess())
    check_exposure("0.0.0.0", AppAccess(keys=(KEY,)))
    check_exposure("0.0.0.0", AppAccess(allow_anonymous=True))
    with pytest.raises(ValueError, match="surrounding whitespace"):
        AppAccess(keys=(" k",))
    acc = AppAccess(keys=("a-key", KEY))
    assert acc.check(KEY) and acc.check("a-key") and not acc.check(KEY[:-1]) and not acc.check("")
    assert KEY not in repr(acc)


def test_launch_refuses_non_loopback_without_login(onnx_fp32, tmp_path):
    """Refused before anything binds: the port stays free."""
    from malaria_screen.app import AnonymousExposureError, launch
    from malaria_screen.inference import OnnxPredictor

    port = _free_port()
    with pytest.raises(AnonymousExposureError, match="--allow-anonymous"):
        launch(OnnxPredictor.from_file(onnx_fp32), host="0.0.0.0", port=port, prevent_thread_lock=True,
               work_dir=tmp_path)
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))  # nothing listens there


def test_cli_app_refuses_non_loopback_without_login(tmp_path):
    """``malaria-screen app --host 0.0.0.0`` exits 2 with the reason, before the model is loaded;
    an empty key file is an error, not a silently open app."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("MALARIA_SCREEN_APP_KEYS", None)
    cmd = [sys.executable, "-m", "malaria_screen.cli", "app", "--host", "0.0.0.0", "--port", str(_free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "without a login" in proc.stderr and "--allow-anonymous" in proc.stderr
    empty = tmp_path / "keys.txt"
    empty.write_text("# no key yet\n")
    proc = subprocess.run(cmd + ["--key-file", str(empty)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "holds no key" in flat(proc.stderr), proc.stderr[-2000:]


def test_over_budget_click_gets_the_message(onnx_fp32, four_mpx_pngs, demo_field, tmp_path):
    """A click over its CPU budget: the first image is done (nothing spent before it), the rest
    are listed with the reason, not decoded; the same in the whole-field tab."""
    pytest.importorskip("skimage")
    from malaria_screen.app import classify_files, screen_slide_files
    from malaria_screen.inference import OnnxPredictor

    pred = OnnxPredictor.from_file(onnx_fp32)
    summary, gallery, table, csv_path = classify_files(pred, four_mpx_pngs, out_dir=tmp_path / "o",
                                                       max_request_cpu_s=0.001)
    assert table[0][3] is None and table[0][1] in pred.class_names
    assert [r[3] for r in table[1:]] == ["not processed: this click's CPU budget (0.001 s) is spent; send it in a "
                                         "later click"] * 2
    assert "1 cells classified" in summary and "2 file(s) failed" in summary and len(gallery) == 1
    _, _, table, _ = classify_files(pred, four_mpx_pngs, out_dir=tmp_path / "o")  # default budget: all three
    assert [r[3] for r in table] == [None, None, None]

    second = tmp_path / "second.jpg"
    second.write_bytes(Path(demo_field).read_bytes())
    summary, overlays, table, _ = screen_slide_files(pred, [str(demo_field), str(second)], max_request_cpu_s=0.001)
    assert len(overlays) == 1 and table[0][0] == Path(demo_field).name and table[0][1] > 0
    assert table[1][0] == "second.jpg" and "CPU budget (0.001 s) is spent" in table[1][6]
    assert "⛔ **second.jpg**: not processed" in summary


def test_login_host_check_and_limits_of_the_running_app(onnx_fp32, four_mpx_pngs, tmp_path):
    """With keys every route needs the login (401), a wrong key is refused after the delay, the
    right one opens the app; a foreign Host header gets 400; the config carries the limits; a
    logged-in client over the CPU budget gets the message through the queue."""
    import httpx
    from gradio_client import Client, handle_file

    from malaria_screen.app import AppAccess, AppLimits, launch
    from malaria_screen.inference import OnnxPredictor

    port = _free_port()
    limits = AppLimits(max_request_cpu_s=0.001, max_queue=5, cell_concurrency=2)
    demo = launch(OnnxPredictor.from_file(onnx_fp32), port=port, prevent_thread_lock=True, work_dir=tmp_path / "w",
                  limits=limits, access=AppAccess(keys=("other-key", KEY), login_delay_s=0.5))
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as c:
            for method, path in [("GET", "/config"), ("GET", "/gradio_api/info"), ("POST", "/gradio_api/upload"),
                                 ("POST", "/gradio_api/queue/join"), ("GET", f"/gradio_api/file={four_mpx_pngs[0]}")]:
                r = c.request(method, path)
                assert r.status_code == 401, (path, r.status_code, r.text[:200])
            t0 = time.monotonic()
            r = c.post("/login", data={"username": "someone", "password": KEY[:-1]})
            assert r.status_code == 400 and time.monotonic() - t0 >= 0.5
            assert c.get("/config").status_code == 401
            assert c.post("/login", data={"username": "someone", "password": KEY}).status_code == 200
            r = c.get("/config")
            assert r.status_code == 200
            cfg = r.json()
            assert cfg["max_file_size"] == limits.max_file_bytes == 8 * 1024 * 1024
            assert "0.001 CPU s per click" in r.text and "25 Mpx per image" in r.text
            assert c.get("/config", headers={"Host": "rebound.example.org"}).status_code == 400
        assert demo._queue.max_size == 5
        conc = {fn.concurrency_id: fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id}
        assert conc["cells"] == 2 and conc["field"] == conc["label-work"] == limits.field_concurrency == 1
        assert demo.app_access.keys == () and "127.0.0.1" in demo.app_access.allowed_hosts

        with pytest.raises(ValueError, match="Could not login"):
            Client(base, auth=("someone", "wrong-key"), verbose=False)
        client = Client(base, auth=("someone", KEY), verbose=False)
        summary, _, table, _ = client.predict([handle_file(p) for p in four_mpx_pngs], api_name="/classify")
        assert "1 cells classified" in summary and "2 file(s) failed" in summary
        assert [row[3] for row in table["data"]][1:] == ["not processed: this click's CPU budget (0.001 s) is spent; "
                                                         "send it in a later click"] * 2
    finally:
        demo.close()


def test_cli_app_takes_keys_from_the_environment(onnx_fp32, tmp_path):
    """``MALARIA_SCREEN_APP_KEYS=... malaria-screen app``: the served app needs the login."""
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "MALARIA_SCREEN_APP_KEYS": f"{KEY},another-key"}
    log_path = tmp_path / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "malaria_screen.cli", "app", "--model", str(onnx_fp32),
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            try:
                r = httpx.get(base + "/config", timeout=10)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.3)
        assert r.status_code == 401
        with httpx.Client(base_url=base, timeout=30) as c:
            assert c.post("/login", data={"username": "lab", "password": "another-key"}).status_code == 200
            assert c.get("/config").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_api_sessions_folders_are_swept(onnx_fp32, sample_pngs, tmp_path):
    """A client of the app's HTTP API never closes a tab, so Gradio's ``unload`` never deletes its
    session folder: a later click deletes every other session's folder in which nothing was
    written for ``session_ttl_s``; the calling session's own is kept."""
    from gradio_client import Client, handle_file

    from malaria_screen.app import AppLimits, launch, sweep_sessions
    from malaria_screen.inference import OnnxPredictor

    port = _free_port()
    work = tmp_path / "w"
    demo = launch(OnnxPredictor.from_file(onnx_fp32), port=port, prevent_thread_lock=True, work_dir=work,
                  limits=AppLimits(session_ttl_s=1))
    try:
        seen = []
        for _ in range(3):
            Client(f"http://127.0.0.1:{port}", verbose=False).predict([handle_file(str(sample_pngs[0]))], api_name="/classify")
            now = sorted(p.name for p in work.iterdir())
            assert len(now) == 1 and now[0] not in seen, (now, seen)  # the older sessions' folders are gone
            seen += now
            time.sleep(1.5)
        assert sweep_sessions(work, 1.0) == seen[-1:] and not any(work.iterdir())
    finally:
        demo.close()
