"""Issue 23 (item 3): API keys, rate limit, Host allow-list, CORS, the model named by name and hash,
Swagger UI served from local files, readiness, bounded queues (503 + Retry-After), and the
request body limit of a chunked upload; in-process (TestClient), no network."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "src" / "malaria_screen" / "assets" / "default_model" / "model.onnx"
SAMPLE = next(iter(sorted((REPO / "src" / "malaria_screen" / "assets" / "samples").glob("*/*.png"))), None)


@pytest.fixture(scope="module")
def predictor():
    if not MODEL.is_file() or SAMPLE is None:
        pytest.skip("bundled ONNX model or samples not present")
    from malaria_screen.inference import OnnxPredictor

    return OnnxPredictor.from_file(MODEL)


@pytest.fixture
def make_client(predictor):
    """``make_client(limits=None, host="localhost", **security)``: a TestClient; apps closed at the end."""
    from fastapi.testclient import TestClient

    from malaria_screen.serve import ServeLimits, ServeSecurity, create_app

    apps = []

    def make(limits: dict | None = None, host: str = "localhost", **security):
        app = create_app(predictor, ServeLimits(**(limits or {})), security=ServeSecurity(**security), field_in_process=False)
        apps.append(app)
        return TestClient(app, base_url=f"http://{host}")

    yield make
    for app in apps:
        app.state.heavy_workers.close()


def _cell():
    return [("files", (SAMPLE.name, SAMPLE.read_bytes(), "image/png"))]


def test_api_keys(make_client, tmp_path, monkeypatch):
    from malaria_screen.serve import load_api_keys

    keyfile = tmp_path / "keys"
    keyfile.write_text("# service keys\nalpha-key-1\n\nbeta-key-2\n")
    monkeypatch.setenv("MALARIA_SCREEN_API_KEYS", "gamma-key-3, alpha-key-1")
    keys = load_api_keys(keyfile)
    assert keys == ("gamma-key-3", "alpha-key-1", "beta-key-2")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(tmp_path / "empty")
    c = make_client(api_keys=keys)
    r = c.post("/v1/classify", files=_cell())
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert c.post("/v1/classify", files=_cell(), headers={"Authorization": "Bearer alpha-key-"}).status_code == 401
    assert c.get("/v1/model", headers={"X-API-Key": "wrong"}).status_code == 401
    assert c.post("/v1/classify", files=_cell(), headers={"Authorization": "Bearer beta-key-2"}).status_code == 200
    assert c.get("/v1/model", headers={"X-API-Key": "gamma-key-3"}).json()["security"]["auth"] is True
    # probes and the docs stay open (a load balancer has no key), the docs' own script and style too
    assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code in (200, 503)
    assert c.get("/openapi.json").status_code == 200
    assert all(c.get(f"/docs/static/{f}").status_code == 200 for f in ("swagger-ui.css", "swagger-ui-bundle.js"))
    assert c.post("/docs/static/../v1/classify", files=_cell()).status_code != 200  # no way round the key


def test_rate_limit_per_client(make_client):
    from malaria_screen.serve.security import AccessControl

    c = make_client(api_keys=("k1", "k2"), rate_per_minute=6, rate_burst=2)
    assert c.get("/healthz").status_code == 200  # builds the middleware stack
    mw = c.app.middleware_stack
    while not isinstance(mw, AccessControl):
        mw = mw.app
    now = {"t": 1000.0}
    mw.clock = lambda: now["t"]  # a frozen clock: no refill unless the test moves it
    h1, h2 = {"X-API-Key": "k1"}, {"X-API-Key": "k2"}
    assert [c.get("/v1/model", headers=h1).status_code for _ in range(3)] == [200, 200, 429]
    r = c.get("/v1/model", headers=h1)
    assert r.status_code == 429 and r.headers["retry-after"] == "10"  # 6 per minute: one token every 10 s
    assert c.get("/v1/model", headers=h2).status_code == 200  # another client is not throttled
    assert all(c.get("/healthz").status_code == 200 for _ in range(5))  # probes are not counted
    now["t"] += 10.0
    assert [c.get("/v1/model", headers=h1).status_code for _ in range(2)] == [200, 429]


def test_host_allow_list_and_cors(make_client):
    c = make_client()
    assert c.get("/healthz").status_code == 200
    assert make_client(host="127.0.0.1").get("/healthz").status_code == 200
    evil = make_client(host="rebind.attacker.example")
    assert evil.get("/v1/model").status_code == 400  # DNS rebinding: a foreign Host is refused
    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = c.options("/v1/classify", headers=pre)
    assert "access-control-allow-origin" not in r.headers  # no CORS by default
    c2 = make_client(cors_origins=("https://lab.example",))
    r = c2.options("/v1/classify", headers=pre | {"Origin": "https://lab.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://lab.example"
    r = c2.options("/v1/classify", headers=pre)
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_model_named_by_name_and_hash_not_path(make_client):
    c = make_client()
    sha = hashlib.sha256(MODEL.name.encode() + b"\0" + MODEL.read_bytes()).hexdigest()
    info = c.get("/v1/model").json()
    assert info["model"] == {"name": "model.onnx", "sha256": sha, "backend": "onnx"}
    body = c.post("/v1/classify", files=_cell()).json()
    assert body["model"] == info["model"]
    assert str(REPO) not in c.get("/v1/model").text and str(REPO) not in str(body)


def test_swagger_ui_is_served_offline(make_client):
    c = make_client()
    html = c.get("/docs").text
    assert "/docs/static/swagger-ui-bundle.js" in html and "/docs/static/swagger-ui.css" in html
    assert "cdn" not in html.lower() and "https://" not in html  # nothing fetched off-host
    js = c.get("/docs/static/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 500_000


def test_readyz_reports_state(make_client):
    r = make_client().get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready" and set(r.json()["pending"]) == {"light", "heavy", "field"}


def test_full_queue_refuses_with_retry_after():
    """A lane with 1 thread and 1 waiting place: the third job is refused at once (QueueFull)."""
    from malaria_screen.serve.jobs import Lane, QueueFull

    gate = threading.Event()

    def job(cancel, x):
        gate.wait(10)
        return x

    async def main():
        lane = Lane("test", 1, 1)
        a = asyncio.ensure_future(lane.run(job, 1))
        b = asyncio.ensure_future(lane.run(job, 2))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as exc:
            await lane.run(job, 3)
        assert exc.value.retry_after >= 1
        gate.set()
        assert await asyncio.gather(a, b) == [1, 2]
        assert lane.pending == 0 and not lane.full
        lane.close()

    asyncio.run(main())


def test_chunked_body_over_the_limit_is_413(make_client):
    """Issue 21: a body sent without Content-Length (chunked) is counted while it streams."""
    c = make_client(limits={"max_request_bytes": 300_000, "max_file_bytes": 100_000})
    head = b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n\r\n'

    def body():
        yield head
        for _ in range(40):
            yield b"\0" * 10_000

    r = c.post("/v1/classify", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "300,000 bytes" in r.json()["detail"]
    assert "content-length" not in r.request.headers


def test_field_limits_in_process(make_client):
    """Issue 21: /v1/field refuses too many files, too many bytes and too many pixels."""
    pytest.importorskip("skimage")
    import io

    from PIL import Image

    c = make_client(limits={"max_file_bytes": 200_000, "max_pixels": 1_000_000})
    buf = io.BytesIO()
    Image.new("RGB", (1001, 1000), (200, 120, 150)).save(buf, format="PNG")
    r = c.post("/v1/field", files=[("file", ("big.png", buf.getvalue(), "image/png"))])
    assert r.status_code == 413 and "1,000,000 px" in r.json()["detail"]
    r = c.post("/v1/field", files=[("file", ("huge.bin", b"\1" * 200_001, "image/png"))])
    assert r.status_code == 413 and "200,000 bytes" in r.json()["detail"]
    r = c.post("/v1/field", files=[("file", ("a.png", buf.getvalue(), "image/png"))] * 2)
    assert r.status_code == 422 and "exactly one" in r.json()["detail"]
    r = c.post("/v1/field", files=[("file", (None, b"text"))])
    assert r.status_code == 422
