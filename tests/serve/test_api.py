"""REST API: results equal the predictor's, limits answer 413/415/422, bad images get item errors."""

from __future__ import annotations

import io
import tempfile

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def predictor(onnx_fp32):
    from malaria_screen.inference import OnnxPredictor

    return OnnxPredictor.from_file(onnx_fp32)


_APPS: list = []


@pytest.fixture(scope="module", autouse=True)
def _close_field_workers():
    """Apps made without a lifespan (TestClient outside ``with``) start worker processes on demand: stop them."""
    yield
    for app in _APPS:
        for pool in (app.state.field_workers, app.state.heavy_workers):
            if pool is not None:
                pool.close()


def _client(predictor, **limits):
    from fastapi.testclient import TestClient

    from malaria_screen.serve import ServeLimits, create_app

    _APPS.append(create_app(predictor, ServeLimits(**limits)))
    return TestClient(_APPS[-1], base_url="http://localhost")  # the Host allow-list admits loopback names


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("lane", ["light", "heavy"])
def test_classify_matches_predictor_with_per_item_errors(predictor, sample_pngs, lane):
    """The same answers whether a request is decoded on the light lane's threads or, as a heavy
    request, in a worker process whose decoded cells come back: here every request over 1 px is
    heavy, and so is one with a part whose size cannot be read from its header (not an image)."""
    c = _client(predictor, **({"light_request_pixels": 1} if lane == "heavy" else {}))
    parts = [("files", (p.name, p.read_bytes(), "image/png")) for p in sample_pngs[:5]]
    if lane == "heavy":
        parts.insert(2, ("files", ("notes.png", b"this is not an image", "image/png")))
    parts.append(("files", ("cut.png", sample_pngs[0].read_bytes()[:300], "image/png")))
    parts.append(("files", ("dot.png", _png(np.full((1, 1, 3), 200, np.uint8)), "image/png")))
    gray = np.asarray(Image.open(sample_pngs[0]).convert("L"))
    parts.append(("files", ("gray.png", _png(np.dstack([gray] * 3)), "image/png")))
    r = c.post("/v1/classify", files=parts)
    assert r.status_code == 200, r.text
    body = r.json()
    n_bad = 4 if lane == "heavy" else 3
    assert body["n_images"] == 5 + n_bad and body["n_failed"] == n_bad
    res = body["results"]
    assert [x["filename"] for x in res] == [p[1][0] for p in parts]
    by_name = {x["filename"]: x for x in res}
    if lane == "heavy":
        assert by_name["notes.png"]["label"] is None and "not a recognised image" in by_name["notes.png"]["error"]
    assert by_name["cut.png"]["label"] is None and by_name["cut.png"]["error"]
    assert by_name["dot.png"]["label"] is None and "too small to be a cell crop: 1x1 px" in by_name["dot.png"]["error"]
    assert by_name["gray.png"]["label"] is None and "no colour (grayscale)" in by_name["gray.png"]["error"]
    ref = list(predictor.predict_files(sample_pngs[:5]))
    got = [x for x in res if x["error"] is None]
    assert [x["label"] for x in got] == [x.label for x in ref]
    np.testing.assert_allclose([x["p_parasitized"] for x in got], [x.p_parasitized for x in ref], atol=1e-5)
    assert body["n_parasitized"] == sum(x.label == "Parasitized" for x in ref)
    # the heavy lane's worker process starts on its first job (no lifespan here); light requests never start it
    assert _APPS[-1].state.heavy_workers.ready == (1 if lane == "heavy" else 0)


def test_limits_and_status_codes(predictor, sample_pngs):
    c = _client(predictor, max_images=3, max_file_bytes=50_000, max_request_bytes=200_000, max_pixels=200 * 200)
    one = ("files", (sample_pngs[0].name, sample_pngs[0].read_bytes(), "image/png"))
    r = c.post("/v1/classify", files=[one] * 4)
    assert r.status_code == 413 and "more than 3 images" in r.json()["detail"]
    r = c.post("/v1/classify", files=[("files", ("big.bin", b"\0" * 300_000, "application/octet-stream"))])
    assert r.status_code == 413 and "200,000 bytes" in r.json()["detail"]
    r = c.post("/v1/classify", content=b'{"image": "x"}', headers={"content-type": "application/json"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = c.post("/v1/classify", files=[("note", (None, b"hello"))])
    assert r.status_code == 422 and "no image" in r.json()["detail"]
    r = c.post("/v1/classify", content=b"--xyz\r\nbroken", headers={"content-type": "multipart/form-data; boundary=abc"})
    assert r.status_code == 422
    # per-item limits: bytes per file, pixels per image
    rng = np.random.default_rng(0)
    noisy = _png(rng.integers(0, 256, (150, 150, 3), dtype=np.uint8))  # ~67 kB > 50 kB
    huge = _png(np.zeros((300, 300, 3), np.uint8))  # small file, 90,000 px > 40,000 px
    r = c.post("/v1/classify", files=[one, ("files", ("noisy.png", noisy, "image/png")), ("files", ("huge.png", huge, "image/png"))])
    assert r.status_code == 200
    res = r.json()["results"]
    assert res[0]["label"] is not None
    assert "file too large" in res[1]["error"] and "50,000 bytes" in res[1]["error"]
    assert "too large" in res[2]["error"] and "40,000" in res[2]["error"]


def test_model_health_openapi(predictor):
    c = _client(predictor)
    assert c.get("/healthz").json() == {"status": "ok"}
    m = c.get("/v1/model").json()
    assert m["config"]["input_size"] == 64 and m["backend"] == "onnx" and m["limits"]["max_images"] == 256
    spec = c.get("/openapi.json").json()
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["files"]["items"]["format"] == "binary"
    assert {"/healthz", "/v1/model"} <= set(spec["paths"])


def test_writes_no_temporary_files(predictor, sample_pngs, tmp_path, monkeypatch):
    """Starlette spools uploads over 1 MB to the temp folder; this API parses in memory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    c = _client(predictor)
    big = _png(np.random.default_rng(1).integers(0, 256, (700, 700, 3), dtype=np.uint8))  # ~1.5 MB
    assert len(big) > 1024 * 1024
    r = c.post("/v1/classify", files=[("files", ("big.png", big, "image/png")),
                                      ("files", (sample_pngs[0].name, sample_pngs[0].read_bytes(), "image/png"))])
    assert r.status_code == 200 and r.json()["n_failed"] == 0
    assert list(tmp_path.iterdir()) == []


def test_whole_field_screening(predictor, demo_field):
    """Issue 5: a whole field in, cells, labels and parasitemia out (the MIT-licensed demo field)."""
    pytest.importorskip("skimage")
    import base64

    from malaria_screen.data.io import decode_image
    c = _client(predictor)
    r = c.post("/v1/field?overlay=true", files=[("file", (demo_field.name, demo_field.read_bytes(), "image/jpeg"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n_rbc"] > 20 and len(body["cells"]) >= body["n_rbc"]
    assert body["n_infected"] == sum(x["label"] == "Parasitized" for x in body["cells"])
    assert 0.0 <= body["parasitemia"] <= 1.0 and body["parasitemia_ci95"][0] <= body["parasitemia"] <= body["parasitemia_ci95"][1]
    ov = decode_image(base64.b64decode(body["overlay_png_base64"]))
    assert ov.shape == decode_image(demo_field).shape
    r = c.post("/v1/field", files=[("file", (demo_field.name, demo_field.read_bytes(), "image/jpeg"))] * 2)
    assert r.status_code == 422 and "exactly one" in r.json()["detail"]


def test_field_too_small_to_screen_is_422(predictor):
    """A readable image smaller than the segmentation needs (8x8 px) is the client's error, not a 500."""
    pytest.importorskip("skimage")
    c = _client(predictor)
    r = c.post("/v1/field", files=[("file", ("dot.png", _png(np.full((1, 1, 3), (200, 120, 150), np.uint8)), "image/png"))])
    assert r.status_code == 422, r.text
    assert "cannot screen the field image (1x1 px)" in r.json()["detail"] and "too small" in r.json()["detail"]


def test_grayscale_field_is_422(predictor, demo_field):
    """A grayscale copy of the demo field is refused with the reason, not screened as 0 % infected."""
    pytest.importorskip("skimage")
    gray = np.asarray(Image.open(demo_field).convert("L"))
    c = _client(predictor)
    r = c.post("/v1/field", files=[("file", ("gray.png", _png(gray), "image/png"))])
    assert r.status_code == 422, r.text
    assert "no colour (grayscale)" in r.json()["detail"]


def test_classify_decodes_off_the_event_loop(predictor, sample_pngs, monkeypatch):
    """Decoding (up to seconds for a large image) runs in a worker thread, where no event loop runs,
    so /healthz keeps answering meanwhile; also for small requests."""
    import asyncio

    import malaria_screen.data.parallel as cells  # /v1/classify decodes through prepare_cell

    real, where = cells.decode_image, []

    def decode(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")
        return real(*args, **kwargs)

    monkeypatch.setattr(cells, "decode_image", decode)
    c = _client(predictor)
    r = c.post("/v1/classify", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in sample_pngs[:2]])
    assert r.status_code == 200 and r.json()["n_failed"] == 0
    assert where == ["worker thread", "worker thread"]


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_field_self_check(demo_field, backend):
    """Self-check: a photo or noise is 422 with the reason (never a parasitemia); the demo field, with the
    bundled model (on ONNX Runtime, serve's default, or PyTorch) and its reference, is screened and in
    the model's domain."""
    pytest.importorskip("skimage")
    import skimage.data

    from malaria_screen.inference import load_model

    c = _client(load_model(backend=backend))
    for name, img in (("chelsea.png", skimage.data.chelsea()),
                      ("noise.png", np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))):
        r = c.post("/v1/field", files=[("file", (name, _png(img), "image/png"))])
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith("not a blood smear field: ")
    r = c.post("/v1/field", files=[("file", (demo_field.name, demo_field.read_bytes(), "image/jpeg"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["in_domain"] is True and body["domain_score"] <= body["domain_threshold"] and body["domain_note"] is None
