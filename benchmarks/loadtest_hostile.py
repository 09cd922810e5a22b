"""Mixed hostile + normal load on ``malaria-screen serve`` (issue 23), loopback only, bounded.

Starts the API in a subprocess on 127.0.0.1 (a free port), waits for ``/readyz``, then:

Phase 1, mixed load (``--deadline`` seconds at most): ``--hostile`` clients (default 45) each
send up to ``--hostile-requests`` of the audit's hostile requests, in turn by client: a
5000x5000 noise JPEG to ``/v1/field``; 16 black 5000x5000 PNGs to ``/v1/classify``; a GIF of
550,000 frames; a multipart body without its closing boundary; a connection that sends half its
headers and stalls (slowloris); a body that stalls after its first bytes. Meanwhile
``--normal`` clients (default 5) each send ``--normal-requests`` real NIH cells, one per
``/v1/classify`` request, and a prober GETs ``/healthz`` every 0.2 s. Reported: normal
classify latency (p50/p99/max), their errors, ``/healthz`` latency (p99/max), hostile status
counts, and the peak RSS of the server with its field workers (sampled every 0.25 s).

Phase 2, memory under field load: ``--field-requests`` requests of the bundled demo field
(2 at a time) after ``--warmup`` requests; the RSS (server + workers) after warm-up and at the
end, and its growth.

Writes ``benchmarks/results/loadtest_hostile.json`` with :func:`records.write_record`.
Nothing leaves the machine; every loop is bounded in count and time.

Usage::

    python benchmarks/loadtest_hostile.py [--model RUN_DIR_OR_ONNX] [--hostile 45] [--normal 5]
        [--field-requests 2000] [--deadline 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile_payloads import black_png, gif_frames, multipart, noise_jpeg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_FIELD = REPO / "src" / "malaria_screen" / "assets" / "demo_field" / "chula_rbc_1.jpg"


def get_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="Run folder or .onnx file (default: the bundled model)")
    p.add_argument("--backend", default=None, help="torch | onnx | auto (default: serve's own: onnx for the bundled model)")
    p.add_argument("--hostile", type=int, default=45, help="Hostile clients")
    p.add_argument("--hostile-requests", type=int, default=3, help="Requests per hostile client")
    p.add_argument("--normal", type=int, default=5, help="Normal clients")
    p.add_argument("--normal-requests", type=int, default=40, help="Requests per normal client")
    p.add_argument("--field-requests", type=int, default=2000, help="Phase 2: demo-field requests after warm-up")
    p.add_argument("--warmup", type=int, default=50, help="Phase 2: warm-up field requests")
    p.add_argument("--deadline", type=float, default=300.0, help="Phase 1 deadline, seconds")
    p.add_argument("--field-deadline", type=float, default=3600.0, help="Phase 2 deadline, seconds")
    p.add_argument("--data", default=str(Path(os.environ.get("MALARIA_SCREEN_DATA", REPO.parent / "shared" / "data")) / "nih_cell_images"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="Do not write the record")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_rss(pid: int) -> int:
    """RSS of ``pid`` and its children, bytes (Linux /proc)."""
    pids = [pid]
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as fh:
                pids += [int(x) for x in fh.read().split()]
    except OSError:
        pass
    total = 0
    for q in pids:
        try:
            with open(f"/proc/{q}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Monitor(threading.Thread):
    """Samples the server's RSS every 0.25 s until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop_flag = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            self.peak = max(self.peak, _tree_rss(self.pid))
            self.stop_flag.wait(0.25)


async def _raw(port: int, payload: bytes, hold: float) -> str:
    """Send ``payload`` on a raw connection, then wait up to ``hold`` s for the server's answer or close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(64), timeout=hold)
        return data[:12].decode("latin-1", "replace").strip() or "closed"
    except asyncio.TimeoutError:
        return "held"
    finally:
        writer.close()


async def _normal_and_probe(url: str, cells: list, normal: int, normal_requests: int, deadline: float) -> dict:
    """Normal cell clients and the /healthz prober (run in their own process: the hostile clients'
    body building must not delay their measurements)."""
    import httpx

    t_end = time.monotonic() + deadline
    normal_lat, normal_err, hz_lat = [], [], []

    async def normal_client(ci: int, http: httpx.AsyncClient) -> None:
        await asyncio.sleep(5.0)  # let the hostile load build up first
        for k in range(normal_requests):
            if time.monotonic() > t_end:
                return
            name, data = cells[(ci * normal_requests + k) % len(cells)]
            t0 = time.monotonic()
            try:
                r = await http.post(url + "/v1/classify", files=[("files", (name, data, "image/png"))], timeout=60)
                dt = time.monotonic() - t0
                if r.status_code == 200 and r.json()["n_failed"] == 0:
                    normal_lat.append(dt)
                else:
                    normal_err.append(f"{r.status_code}: {r.text[:120]}")
            except Exception as exc:  # noqa: BLE001 - counted
                normal_err.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)

    async def prober(http: httpx.AsyncClient, done: asyncio.Event) -> None:
        while not done.is_set() and time.monotonic() < t_end:
            t0 = time.monotonic()
            try:
                r = await http.get(url + "/healthz", timeout=30)
                hz_lat.append(time.monotonic() - t0 if r.status_code == 200 else 99.0)
            except Exception:  # noqa: BLE001
                hz_lat.append(99.0)
            await asyncio.sleep(0.2)

    async with httpx.AsyncClient() as normal_http, httpx.AsyncClient() as probe_http:
        done = asyncio.Event()
        probe = asyncio.ensure_future(prober(probe_http, done))
        await asyncio.gather(*(normal_client(i, normal_http) for i in range(normal)))
        done.set()
        await probe
    ms = np.asarray(normal_lat) * 1000
    hz = np.asarray(hz_lat) * 1000
    return {
        "normal_ok": len(normal_lat), "normal_errors": len(normal_err), "normal_error_examples": normal_err[:3],
        "normal_p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "normal_p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "normal_max_ms": float(ms.max()) if len(ms) else None,
        "healthz_n": len(hz), "healthz_p50_ms": float(np.percentile(hz, 50)) if len(hz) else None,
        "healthz_p99_ms": float(np.percentile(hz, 99)) if len(hz) else None,
        "healthz_max_ms": float(hz.max()) if len(hz) else None,
        "healthz_over_100ms": int((hz > 100).sum()),
    }


def _normal_process(url: str, cells: list, normal: int, normal_requests: int, deadline: float, out) -> None:
    out.put(asyncio.run(_normal_and_probe(url, cells, normal, normal_requests, deadline)))


async def phase1(url: str, port: int, args, cells: list[tuple[str, bytes]]) -> dict:
    import multiprocessing as mp

    import httpx

    noise, black, gif = noise_jpeg(5000, quality=30), black_png(5000), gif_frames(550_000)
    open_body, ctype = multipart([("files", "cell.png", cells[0][1])], close=False)
    t_end = time.monotonic() + args.deadline
    hostile = Counter()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    normal = ctx.Process(target=_normal_process, args=(url, cells, args.normal, args.normal_requests, args.deadline, q))

    async def hostile_client(ci: int, http: httpx.AsyncClient) -> None:
        kind = ci % 6
        for _ in range(args.hostile_requests):
            if time.monotonic() > t_end:
                return
            try:
                if kind == 0:
                    r = await http.post(url + "/v1/field", files=[("file", ("noise.jpg", noise, "image/jpeg"))], timeout=120)
                    hostile[f"noise-field {r.status_code}"] += 1
                elif kind == 1:
                    r = await http.post(url + "/v1/classify", files=[("files", (f"b{k}.png", black, "image/png")) for k in range(16)],
                                        timeout=120)
                    hostile[f"16-black-png {r.status_code}"] += 1
                elif kind == 2:
                    r = await http.post(url + "/v1/classify", files=[("files", ("frames.gif", gif, "image/gif"))], timeout=120)
                    hostile[f"gif-frames {r.status_code}"] += 1
                elif kind == 3:
                    r = await http.post(url + "/v1/classify", content=open_body, headers={"content-type": ctype}, timeout=60)
                    hostile[f"no-closing-boundary {r.status_code}"] += 1
                elif kind == 4:
                    res = await _raw(port, b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n", 30)
                    hostile[f"slowloris {res}"] += 1
                else:
                    res = await _raw(port, b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + ctype.encode()
                                     + b"\r\nContent-Length: 5000000\r\n\r\n--hostileboundary\r\n", 90)
                    hostile[f"stalled-body {res}"] += 1
            except Exception as exc:  # noqa: BLE001 - counted
                hostile[f"kind{kind} {type(exc).__name__}"] += 1

    limits = httpx.Limits(max_connections=args.hostile + 2, max_keepalive_connections=args.hostile + 2)
    normal.start()
    async with httpx.AsyncClient(limits=limits) as hostile_http:
        t0 = time.monotonic()
        await asyncio.gather(*(hostile_client(i, hostile_http) for i in range(args.hostile)))
        wall = time.monotonic() - t0
    res = await asyncio.get_running_loop().run_in_executor(None, q.get, True, args.deadline + 120)
    normal.join(timeout=30)
    res.update(hostile=dict(sorted(hostile.items())), phase1_wall_s=wall)
    return res


async def phase2(url: str, pid: int, args) -> dict:
    import httpx

    field = DEMO_FIELD.read_bytes()
    codes: Counter = Counter()
    t_end = time.monotonic() + args.field_deadline
    n_total = args.warmup + args.field_requests
    counter = {"i": 0}
    rss = {}

    async def worker(http: httpx.AsyncClient) -> None:
        while counter["i"] < n_total and time.monotonic() < t_end:
            counter["i"] += 1
            i = counter["i"]
            r = await http.post(url + "/v1/field", files=[("file", (DEMO_FIELD.name, field, "image/jpeg"))], timeout=120)
            codes[r.status_code] += 1
            if i == args.warmup:
                rss["after_warmup"] = _tree_rss(pid)
            elif i > args.warmup:
                rss["max"] = max(rss.get("max", 0), _tree_rss(pid))

    t0 = time.monotonic()
    async with httpx.AsyncClient() as http:
        await asyncio.gather(worker(http), worker(http))
    rss["end"] = _tree_rss(pid)
    done = sum(codes.values())
    return {"field_requests_done": done, "field_requests_after_warmup": max(0, done - args.warmup),
            "field_codes": {str(k): v for k, v in codes.items()}, "field_wall_s": time.monotonic() - t0,
            "rss_after_warmup_mb": rss.get("after_warmup", 0) / 1e6, "rss_end_mb": rss["end"] / 1e6,
            "rss_max_after_warmup_mb": rss.get("max", 0) / 1e6,
            "rss_growth_mb": (rss["end"] - rss.get("after_warmup", rss["end"])) / 1e6}


def main(args: argparse.Namespace) -> dict:
    import httpx

    data = Path(args.data)
    files = sorted((data / "Parasitized").iterdir())[:2000] + sorted((data / "Uninfected").iterdir())[:2000]
    rng = np.random.default_rng(args.seed)
    cells = [(files[i].name, files[i].read_bytes()) for i in rng.choice(len(files), 200, replace=False)]
    port = _free_port()
    cmd = [sys.executable, "-m", "malaria_screen.cli", "serve", "--host", "127.0.0.1", "--port", str(port)] + \
        (["--backend", args.backend] if args.backend else []) + (["--model", args.model] if args.model else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    mon = Monitor(server.pid)
    try:
        t_up = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > t_up:
                raise RuntimeError(f"server did not start: {server.stderr.read().decode()[-2000:] if server.stderr else ''}")
            time.sleep(0.5)
        model = httpx.get(url + "/v1/model", timeout=10).json()["model"]
        rss_idle = _tree_rss(server.pid)
        mon.start()
        res = {"model": model, "rss_idle_mb": rss_idle / 1e6}
        res.update(asyncio.run(phase1(url, port, args, cells)))
        res["phase1_peak_rss_mb"] = mon.peak / 1e6
        if args.field_requests:
            res.update(asyncio.run(phase2(url, server.pid, args)))
        res["peak_rss_mb"] = mon.peak / 1e6
        res["server_alive"] = server.poll() is None
    finally:
        mon.stop_flag.set()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    res.update(hostile_clients=args.hostile, normal_clients=args.normal, normal_requests=args.normal_requests,
               hostile_requests=args.hostile_requests, cpu_count=os.cpu_count())
    return res


if __name__ == "__main__":
    a = get_arg_parser().parse_args()
    load_before = os.getloadavg()[0]
    r = main(a)
    import json

    print(json.dumps(r, indent=1))
    if not a.no_record:
        from records import write_record

        load = os.getloadavg()[0]
        figures = {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        write_record("loadtest_hostile", figures,
                     notes=f"{a.hostile} hostile + {a.normal} normal clients on loopback; model {r['model']['name']} "
                           f"({r['model']['backend']}); hostile status counts {r['hostile']}; "
                           f"phase 2: {r.get('field_requests_after_warmup', 0)} demo-field requests after {a.warmup} warm-up, "
                           f"status codes {r.get('field_codes', {})}; server alive at the end: {r['server_alive']}; "
                           f"1-min load average {load_before:.1f} before the start, {load:.1f} at the end"
                           + ("" if load_before < 1.5 else " (machine shared with other jobs)"),
                     uses_bundled_model=a.model is None)
