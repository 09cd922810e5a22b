"""Issue 23: the audit's hostile inputs against a real ``malaria-screen serve`` in a subprocess.

The server runs the bundled ONNX model on loopback (127.0.0.1, a free port) under an
address-space limit (``RLIMIT_AS`` 3 GiB, set with :func:`resource.setrlimit` before exec), with
a small CPU budget per request (``--max-request-cpu-s 3``) so the budget, not the machine's
speed, decides. Every request count is fixed and every request has a timeout. Time bounds are
generous (CI has 2 busy cores) but far below what each input cost before this change; each
bound names what was measured, before (main at fdc024f) and after, on the shared 2-core machine.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("skimage")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from hostile_payloads import black_png, gif_frames, multipart, noise_jpeg  # noqa: E402

MODEL = REPO / "src" / "malaria_screen" / "assets" / "default_model" / "model.onnx"
DEMO_FIELD = REPO / "src" / "malaria_screen" / "assets" / "demo_field" / "chula_rbc_1.jpg"
AS_LIMIT = 3 * 1024**3
GiB = 1024**3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "VmPeak"):
            out[k] = int(v.split()[0]) * 1024
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (t / "children").read_text().split()]
    return kids


def _workers(pid: int, task: str = "field") -> set[int]:
    """The server's worker processes of ``task`` ("field" or "cells"), by the name they give
    themselves (``/proc/PID/comm``)."""
    out = set()
    for c in _children(pid):
        try:
            comm = Path(f"/proc/{c}/comm").read_text().strip()
        except OSError:
            continue
        if comm == f"malaria-{task}":
            out.add(c)
    return out


class Server:
    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url
        self.port = int(url.rsplit(":", 1)[1])

    def rss(self) -> int:
        """Resident memory of the server and its field workers now, bytes."""
        return sum(_status(p).get("VmRSS", 0) for p in [self.proc.pid] + _children(self.proc.pid))

    def wait_ready(self, timeout: float = 120) -> dict:
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            assert self.proc.poll() is None, "the server exited"
            try:
                r = httpx.get(self.url + "/readyz", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not ready in {timeout} s")


def _limit_as() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


@pytest.fixture(scope="module")
def server():
    if not MODEL.is_file():
        pytest.skip("bundled ONNX model not present")
    port = _free_port()
    cmd = [sys.executable, "-m", "malaria_screen.cli", "serve", "--model", str(MODEL), "--backend", "onnx",
           "--host", "127.0.0.1", "--port", str(port), "--max-request-cpu-s", "3", "--max-field-memory", str(GiB),
           "--max-queue", "2", "--body-timeout", "4", "--header-timeout", "3", "--max-request-bytes", str(20 * 1024**2)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_limit_as)
    srv = Server(proc, f"http://127.0.0.1:{port}")
    try:
        srv.wait_ready()
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        assert proc.returncode is not None


@pytest.fixture(scope="module")
def noise() -> bytes:
    data = noise_jpeg(5000, quality=30)
    assert 6_000_000 < len(data) < 8 * 1024**2  # the audit's 7 MB, inside the 8 MiB file limit
    return data


@pytest.fixture(scope="module")
def tiled() -> bytes:
    """The demo field tiled 6 x 6 (11 Mpx JPEG): a real smear, screened for seconds (noise is
    refused at once as not a smear)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.tile(np.asarray(Image.open(DEMO_FIELD).convert("RGB")), (6, 6, 1))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _post(url: str, path: str, files, timeout: float = 120) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = httpx.post(url + path, files=files, timeout=timeout)
    return r, time.monotonic() - t0


def test_noise_field_is_stopped_by_the_cpu_budget(server, noise):
    """Before: 54.8 s of segmentation and server RSS 1.3 -> 6.4 GB, answering 100 % parasitemia.
    Now the worker's RLIMIT_CPU (3 s here) or RLIMIT_AS ends the job: 422 with the reason
    (measured 6-9 s wall with the upload on the busy machine; a non-smear check may refuse it sooner)."""
    rss0 = server.rss()
    r, dt = _post(server.url, "/v1/field", [("file", ("noise.jpg", noise, "image/jpeg"))])
    assert r.status_code == 422, r.text
    assert dt < 30, f"{dt:.1f} s"
    assert server.rss() < rss0 + 1 * GiB
    assert httpx.get(server.url + "/healthz", timeout=5).json() == {"status": "ok"}
    server.wait_ready(timeout=90)  # the worker that was ended is replaced


def test_real_field_still_screens(server):
    r, dt = _post(server.url, "/v1/field", [("file", (DEMO_FIELD.name, DEMO_FIELD.read_bytes(), "image/jpeg"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n_rbc"] > 20 and body["model"]["name"] == "model.onnx" and len(body["model"]["sha256"]) == 64
    assert "/" not in json.dumps(body["model"])  # no server path


def test_black_pngs_in_one_request_stop_at_the_pixel_budget(server):
    """Before: 16 black 5000x5000 PNGs (1.2 MB) in one request cost 29 s of CPU. Now at most
    50 Mpx (2 images) are decoded per request, and none after its CPU budget (3 s here) is
    spent; the rest get an item error unread (measured 15-28 s wall at load average 24 on 2
    cores, most of it the grayscale check of the decoded images)."""
    png = black_png(5000)
    r, dt = _post(server.url, "/v1/classify", [("files", (f"b{i}.png", png, "image/png")) for i in range(16)])
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 16 and all(x["label"] is None for x in res)
    unread = [x["error"] for x in res if "not decoded" in x["error"]]
    assert len(unread) >= 14 and all("pixel budget" in e or "CPU budget" in e for e in unread), [x["error"] for x in res]
    assert dt < 60, f"{dt:.1f} s"


def test_gif_of_many_frames_is_not_walked(server):
    """Before: a GIF of 550,000 one-pixel frames (8 MB) cost 1.4 s (3.8 s on the busy machine) in
    ``im.n_frames``; now only the first frame is read (measured 0.3 ms to decode)."""
    from malaria_screen.data.io import decode_image

    gif = gif_frames(550_000)
    t0 = time.monotonic()
    assert decode_image(gif).shape == (1, 1, 3)
    assert time.monotonic() - t0 < 0.5
    r, _ = _post(server.url, "/v1/classify", [("files", ("frames.gif", gif, "image/gif"))])
    assert r.status_code == 200 and "too small to be a cell crop" in r.json()["results"][0]["error"]


def test_probes_answer_under_load_and_full_queues_say_503(server, tiled):
    """Before: 45 GIF requests made /healthz time out (> 10 s) for ~50 s. Now the probes are async
    and off the decode pool: under 7 concurrent heavy requests (4 large fields for 1 worker and
    2 waiting places, 3 black 25 Mpx PNGs) /healthz answers with a median < 0.5 s and a max < 5 s
    (measured: median 5-40 ms, max 0.04-1.2 s at a load average of 20-25 on 2 cores, the tail being
    the scheduler's; target 100 ms on an idle machine), and the requests past the queues get 503
    with Retry-After."""
    png = black_png(5000)
    results: list[tuple[int, dict]] = []

    def hostile(i: int) -> None:
        if i < 4:
            files, path = [("file", ("tiled.jpg", tiled, "image/jpeg"))], "/v1/field"
        else:
            files, path = [("files", ("black.png", png, "image/png"))], "/v1/classify"
        try:
            r = httpx.post(server.url + path, files=files, timeout=120)
            results.append((r.status_code, dict(r.headers)))
        except httpx.HTTPError as exc:
            results.append((0, {"error": str(exc)}))

    threads = [threading.Thread(target=hostile, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    lat = []
    with httpx.Client(timeout=10) as http:
        for _ in range(30):
            t0 = time.monotonic()
            assert http.get(server.url + "/healthz").status_code == 200
            lat.append(time.monotonic() - t0)
            time.sleep(0.1)
    for t in threads:
        t.join(timeout=180)
    lat.sort()
    assert lat[len(lat) // 2] < 0.5 and lat[-1] < 5.0, f"healthz median {lat[len(lat) // 2] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms"
    codes = sorted(c for c, _ in results)
    assert len(codes) == 7 and 0 not in codes and all(c in (200, 422, 503) for c in codes), codes
    assert all("retry-after" in h for c, h in results if c == 503)
    assert 503 in codes, codes  # 4 fields for 1 worker + 2 places: at least one refused
    server.wait_ready(timeout=90)


def test_work_stops_when_the_client_leaves(server, tiled):
    """Before: work went on after the client disconnected. Now the field worker running a
    departed client's job is killed (and replaced) within ~0.1 s of the disconnect."""
    t_idle = time.monotonic() + 180  # the previous test's queued fields must be done: ours must reach the worker
    while httpx.get(server.url + "/readyz", timeout=10).json()["pending"]["field"] and time.monotonic() < t_idle:
        time.sleep(0.5)
    server.wait_ready(timeout=90)
    before = _workers(server.proc.pid)
    assert len(before) == 1
    body, ctype = multipart([("file", "tiled.jpg", tiled)])
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST /v1/field HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        # wait until the job is in the field lane (running: it takes seconds), not a fixed sleep: on a
        # busy machine 1 s was not always enough for the request to reach the worker
        t_sub = time.monotonic() + 60
        while (not httpx.get(server.url + "/readyz", timeout=10).json()["pending"]["field"]
               and time.monotonic() < t_sub):
            time.sleep(0.1)
        time.sleep(0.5)
    t_end = time.monotonic() + 20
    while time.monotonic() < t_end and (_workers(server.proc.pid) & before):
        time.sleep(0.1)
    assert not (_workers(server.proc.pid) & before), "the worker of the departed client still runs"
    server.wait_ready(timeout=90)


def test_half_open_connections_time_out(server):
    """Before: a connection that sent half its headers was kept forever. Now it is closed after
    the header timeout (3 s here), and a body that stalls gets 408 after the body timeout (4 s)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0 = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server
        assert time.monotonic() - t0 < 15
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                  b"Content-Length: 100000\r\n\r\n--x\r\n")
        t0 = time.monotonic()
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert time.monotonic() - t0 < 15


def test_field_and_chunked_body_limits(server):
    """Issue 21: the /v1/field limits and the body limit of a chunked upload (no Content-Length)."""
    url = server.url
    big = os.urandom(9 * 1024**2)  # > 8 MiB file limit
    r = httpx.post(url + "/v1/field", files=[("file", ("big.jpg", big, "image/jpeg"))], timeout=60)
    assert r.status_code == 413 and "8,388,608 bytes" in r.json()["detail"]
    r = httpx.post(url + "/v1/field", files=[("file", ("black.png", black_png(5001), "image/png"))], timeout=60)
    assert r.status_code == 413 and "25,000,000" in r.json()["detail"]
    two = [("file", (DEMO_FIELD.name, DEMO_FIELD.read_bytes(), "image/jpeg"))] * 2
    assert httpx.post(url + "/v1/field", files=two, timeout=60).status_code == 422

    def chunks():
        for _ in range(25):  # 25 MiB, over the server's 20 MiB request limit
            yield b"\0" * 1024**2

    body_head, ctype = multipart([("files", "x.bin", b"")], close=False)
    r = httpx.post(url + "/v1/classify", content=(c for c in [body_head, *chunks()]), headers={"content-type": ctype},
                   timeout=60)
    assert r.status_code == 413 and "20,971,520 bytes" in r.json()["detail"]
    assert "content-length" not in r.request.headers and r.request.headers.get("transfer-encoding") == "chunked"


def test_strict_multipart(server):
    """Before: a body without its closing boundary was 200 and a text part named ``files`` was
    taken for an image, and a boundary over 256 characters was a 500; all are 422 now."""
    png = DEMO_FIELD.read_bytes()
    body, ctype = multipart([("files", "cell.jpg", png)], close=False)
    r = httpx.post(server.url + "/v1/classify", content=body, headers={"content-type": ctype}, timeout=30)
    assert r.status_code == 422 and "closing boundary" in r.json()["detail"]
    body, ctype = multipart([("files", None, b"hello")])
    r = httpx.post(server.url + "/v1/classify", content=body, headers={"content-type": ctype}, timeout=30)
    assert r.status_code == 422 and "text field" in r.json()["detail"]
    long = "b" * 300  # python-multipart raises on a boundary over 256 characters: was a 500
    body = f"--{long}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"c.jpg\"\r\n\r\n".encode() + png
    for path in ("/v1/classify", "/v1/field"):
        r = httpx.post(server.url + path, content=body + f"\r\n--{long}--\r\n".encode(),
                       headers={"content-type": f"multipart/form-data; boundary={long}"}, timeout=30)
        assert r.status_code == 422 and "at most 70" in r.json()["detail"], (path, r.status_code)


def test_memory_stays_bounded(server):
    """After the battery the server (main process) peaked under 1.5 GiB (measured ~0.5 GB; its
    address space is capped at 3 GiB) and the whole server, workers included, holds under 2 GiB."""
    assert _status(server.proc.pid)["VmHWM"] < 1.5 * GiB
    assert server.rss() < 2 * GiB
    assert server.proc.poll() is None
