"""Load test of ``malaria-screen serve`` on loopback: concurrent clients posting real cells.

Starts the API in a subprocess bound to 127.0.0.1 on a free port, waits for ``/healthz``, then
runs ``--clients`` concurrent clients that each send ``--requests`` POST /v1/classify requests
(``--images`` real NIH cells per request, drawn with a fixed seed), and prints errors, latency
percentiles (p50/p90/p99, ms) and throughput (requests/s, cells/s). Each client's first request
(which opens its connection) is counted in errors and throughput but its latency is reported
apart (``first_request_p50_ms``), not in the percentiles. Bounded: at most
clients x requests requests, each with a timeout, and an overall deadline; nothing leaves the
machine.

Usage::

    python benchmarks/loadtest_serve.py [--model RUN_DIR_OR_ONNX] [--clients 50] [--requests 20]
        [--images 1] [--data $MALARIA_SCREEN_DATA/nih_cell_images] [--deadline 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def get_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="Run folder or .onnx file (default: the bundled model)")
    p.add_argument("--backend", default=None, help="torch | onnx | auto (default: serve's own: onnx for the bundled model)")
    p.add_argument("--clients", type=int, default=50, help="Concurrent clients")
    p.add_argument("--requests", type=int, default=20, help="Requests per client")
    p.add_argument("--images", type=int, default=1, help="Cells per request")
    p.add_argument("--data", default=str(Path(os.environ.get("MALARIA_SCREEN_DATA", "../shared/data")) / "nih_cell_images"),
                   help="NIH cell folder")
    p.add_argument("--timeout", type=float, default=60.0, help="Per-request timeout, seconds")
    p.add_argument("--deadline", type=float, default=300.0, help="Whole test deadline, seconds")
    p.add_argument("--json", default=None, help="Also write results here")
    p.add_argument("--seed", type=int, default=0)
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _run(url: str, payloads: list[list[tuple[str, bytes]]], clients: int, per_client: int, timeout: float, deadline: float):
    import httpx

    lat, errors, cells, first = [], [], 0, []
    t_end = time.perf_counter() + deadline

    async def client(ci: int, http: httpx.AsyncClient) -> None:
        nonlocal cells
        for k in range(per_client):
            if time.perf_counter() > t_end:
                errors.append("deadline")
                return
            files = [("files", (n, b, "image/png")) for n, b in payloads[(ci * per_client + k) % len(payloads)]]
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/classify", files=files, timeout=timeout)
                dt = time.perf_counter() - t0
                body = r.json()
                if r.status_code != 200 or body.get("n_failed", 1) != 0:
                    errors.append(f"{r.status_code}: {str(body)[:200]}")
                else:
                    (first if k == 0 else lat).append(dt)
                    cells += body["n_images"] if k else 0
            except Exception as exc:  # noqa: BLE001 - counted as an error
                errors.append(f"{type(exc).__name__}: {exc}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - t0
    return lat, first, errors, cells, wall


def main(args: argparse.Namespace) -> dict:
    import httpx

    data = Path(args.data)
    files = sorted((data / "Parasitized").iterdir()) + sorted((data / "Uninfected").iterdir())
    rng = np.random.default_rng(args.seed)
    n_payloads = min(200, args.clients * args.requests)
    pick = rng.choice(len(files), size=n_payloads * args.images, replace=False)
    blobs = [(files[i].name, files[i].read_bytes()) for i in pick]
    payloads = [blobs[j * args.images : (j + 1) * args.images] for j in range(n_payloads)]
    port = _free_port()
    cmd = [sys.executable, "-m", "malaria_screen.cli", "serve", "--host", "127.0.0.1", "--port", str(port)] + \
        (["--backend", args.backend] if args.backend else []) + (["--model", args.model] if args.model else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        t_up = time.perf_counter() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.perf_counter() > t_up:
                raise RuntimeError(f"server did not start: {server.stderr.read().decode()[-2000:] if server.stderr else ''}")
            time.sleep(0.2)
        model = httpx.get(url + "/v1/model", timeout=5).json()
        lat, first, errors, cells, wall = asyncio.run(_run(url, payloads, args.clients, args.requests, args.timeout, args.deadline))
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    ms = np.asarray(lat) * 1000.0
    res = {
        "model": (model.get("model") or {}).get("name", model.get("source")), "backend": model.get("backend"), "precision": model.get("precision"),
        "clients": args.clients, "requests_per_client": args.requests, "images_per_request": args.images,
        "requests_ok": int(len(lat) + len(first)), "first_request_p50_ms": float(np.median(first) * 1000) if first else None,
        "errors": len(errors), "error_examples": errors[:5], "wall_s": wall,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None, "p90_ms": float(np.percentile(ms, 90)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None, "max_ms": float(ms.max()) if len(ms) else None,
        "requests_per_s": (len(lat) + len(first)) / wall if wall else None,
        "cells_per_s": cells / wall if wall else None,
        "cpu_count": os.cpu_count(),
    }
    return res


if __name__ == "__main__":
    a = get_arg_parser().parse_args()
    r = main(a)
    print(f"model {r['model']} ({r['backend']}, {r['precision'] or 'fp32/torch'}); {r['clients']} clients x "
          f"{r['requests_per_client']} requests x {r['images_per_request']} cell(s), loopback, {r['cpu_count']} CPUs")
    print(f"ok {r['requests_ok']}, errors {r['errors']}  {r['error_examples'] if r['errors'] else ''}")
    if r["p50_ms"] is not None:
        print(f"latency p50 {r['p50_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms "
              f"(first request per client, opening its connection: p50 {r['first_request_p50_ms']:.1f} ms)")
        print(f"throughput {r['requests_per_s']:.1f} requests/s, {r['cells_per_s']:.1f} cells/s over {r['wall_s']:.2f} s")
    if a.json:
        from malaria_screen.fileio import atomic_write_json

        atomic_write_json(a.json, r)
    sys.exit(1 if r["errors"] else 0)
