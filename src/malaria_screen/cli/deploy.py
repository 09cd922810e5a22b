"""Deployment commands: ``export``, ``ensemble``, ``app``, ``serve``, ``explain``, ``bench-infer``.

The main CLI calls :func:`register`. The package modules that pull in heavy libraries (torch,
onnx, gradio, fastapi, Pillow, OpenCV) are imported inside the commands, so ``--help`` is instant
and the torch-free runtime install still starts.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from enum import Enum
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from malaria_screen.cli.core import check_out_dir, check_out_file, echo_table, list_inputs
from malaria_screen.cli.smear import RESCORER_HELP, load_rescorer, screening_backend
from malaria_screen.errors import error_text
from malaria_screen.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, rows_to_csv
from malaria_screen.inference import load_model

__all__ = ["app_cmd", "bench_infer", "ensemble", "explain", "export", "register", "serve"]

log = logging.getLogger("malaria_screen.cli")

#: ``export --opset`` range: :data:`malaria_screen.export.onnx.MIN_OPSET` ..
#: :data:`~malaria_screen.export.onnx.MAX_OPSET` (repeated here so that ``--help`` imports no numpy).
OPSET_RANGE = (13, 20)


def _model_dir(model: Optional[Path]) -> Path:
    from malaria_screen.inference import default_model_dir

    return Path(model) if model is not None else default_model_dir()


class ExportFormat(str, Enum):
    """``export --format``."""

    onnx = "onnx"


class QuantFormat(str, Enum):
    """``export --quant-format``: how the int8 graph stores its quantisation."""

    qdq = "qdq"
    qoperator = "qoperator"


def export(
    out: Path = typer.Option(..., "--out", "-o", help="Destination .onnx file (written atomically) + <stem>.report.json"),
    model: Optional[Path] = typer.Option(None, help="Run folder; default: the bundled model"),
    fmt: ExportFormat = typer.Option(ExportFormat.onnx, "--format", help="Export format"),
    int8: bool = typer.Option(False, "--int8", help="Static int8 quantisation calibrated on TRAINING-patient cells"),
    data: Optional[Path] = typer.Option(None, help="NIH cell folder the run's split.json refers to. Default: $MALARIA_SCREEN_DATA/nih_cell_images"),
    calibration_cells: int = typer.Option(512, min=16, help="Training-patient cells for int8 calibration"),
    quant_format: QuantFormat = typer.Option(QuantFormat.qdq, help="int8 graph format"),
    check: bool = typer.Option(True, help="Check parity and test-patient accuracy of torch / fp32 / int8"),
    opset: int = typer.Option(17, min=OPSET_RANGE[0], max=OPSET_RANGE[1],
                              help="ONNX opset (13-17 with --int8: quantisation fails on newer ones for CellNet)"),
    seed: int = typer.Option(0, help="Seed of the calibration sample"),
) -> None:
    """Export a model to ONNX (fp32, or int8 with --int8) for the torch-free runtime.

    The graph takes (N, S, S, 3) uint8 letterboxed RGB cells and returns (N, C) float32
    probabilities (normalisation inside); the whole config.json is in its metadata. Prints file
    sizes and, on the run's test patients, accuracy / ROC-AUC of torch, ONNX fp32 and ONNX int8
    side by side; writes them to <stem>.report.json.
    """
    from malaria_screen.export.pipeline import ExportParityError, export_model, report_path

    if out.suffix.lower() != ".onnx":
        raise typer.BadParameter(f"--out must end in .onnx, got {out.name}")
    from malaria_screen.export.onnx import MAX_INT8_OPSET

    if int8 and opset > MAX_INT8_OPSET:
        raise typer.BadParameter(f"--int8 needs an opset of {OPSET_RANGE[0]} to {MAX_INT8_OPSET}, got {opset}",
                                 param_hint="'--opset'")
    check_out_file(out)
    try:
        rep = export_model(_model_dir(model), out, int8=int8, data_dir=data, calibration_cells=calibration_cells,
                           quant_format=quant_format.value, check=check, seed=seed, opset=opset)
    except (FileNotFoundError, ValueError, ExportParityError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    par = rep["parity"]
    typer.echo(f"wrote {out} ({rep['size_bytes']['written']:,} bytes, {rep['precision']}); report: {report_path(out)}")
    typer.echo(f"fp32 parity vs torch on {par['n_cells']} {par['cells']} cells: max |dp| = {par['max_abs_diff']:.2e} "
               f"(tolerance {par['tolerance']:.0e})")
    if rep.get("calibration"):
        c = rep["calibration"]
        typer.echo(f"int8 calibrated on {c['n_cells']} cells of {c['n_patients']} training patients")
    if rep["test"]:
        ts = rep["test_set"]
        typer.echo(f"\ntest patients: {ts['n_patients']} patients, {ts['n_cells']} cells")
        echo_table([[r["backend"], "-" if r["size_bytes"] is None else f"{r['size_bytes']:,}", f"{r['accuracy']:.4f}",
                 f"{r['accuracy_delta_points']:+.2f}", f"{r['roc_auc']:.4f}", f"{r['max_abs_diff']:.2e}",
                 f"{100 * r['label_agreement']:.2f}"] for r in rep["test"]],
               ["backend", "bytes", "accuracy", "d acc (points)", "ROC-AUC", "max |dp| vs torch", "same label %"])


def ensemble(
    members: List[Path] = typer.Argument(..., help="Two or more run folders and/or .onnx files (same input size and classes)"),
    out: Path = typer.Option(..., "--out", "-o", help="New ensemble folder (ensemble.json + members/)"),
    threshold: Optional[float] = typer.Option(None, min=1e-6, max=1 - 1e-6, help="Fixed threshold on the averaged p_parasitized"),
    calibrate: Optional[Path] = typer.Option(
        None, exists=True, file_okay=False,
        help="NIH-layout folder of labelled cells none of the members trained on (e.g. their validation fields' crops): "
             "the threshold is set so as many are called Parasitized as are"),
    groups: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                          help="path,group CSV of --calibrate; only the cells it lists are used"),
    note: Optional[str] = typer.Option(None, help="Free text stored in ensemble.json"),
) -> None:
    """Average several cell models into one (model averaging; Lakshminarayanan et al. 2017).

    The folder is self-contained (members are copied) and loads wherever a model does:
    predict, evaluate, smear, serve and app take it as --model. Threshold: --threshold, or
    count-matched on --calibrate cells, or by default the mean of the members' thresholds.
    Calibration cells of groups (patients / fields) any member was trained on are left out.
    """
    from malaria_screen.data.dataset import load_cell_set
    from malaria_screen.inference.ensemble import EnsemblePredictor, calibration_cells, write_ensemble

    if threshold is not None and calibrate is not None:
        raise typer.BadParameter("give --threshold or --calibrate, not both")
    check_out_dir(out)
    try:
        loaded = [load_model(m) for m in members]
        probe = EnsemblePredictor(loaded)  # checks count, input size and classes before anything is written
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    calib = None
    if calibrate is not None:
        try:
            cells = load_cell_set(calibrate, size_px=probe.input_size, groups_csv=groups, progress=False)
            chosen = calibration_cells(cells, probe, groups_csv=groups)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        if chosen.n_left_out:
            typer.echo(f"left out {chosen.n_left_out} calibration cells of groups a member was trained on", err=True)
        calib = (chosen.images, chosen.parasitized)
    try:
        ens = write_ensemble(out, members, threshold=threshold, calibration=calib, note=note)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    how = "fixed" if threshold is not None else (f"count-matched on {len(calib[1])} cells ({int(calib[1].sum())} Parasitized)"
                                                 if calib is not None else "mean of the members' thresholds")
    typer.echo(f"wrote {out}: {len(ens.members)} members, threshold {ens.threshold:.4f} ({how})")


def explain(
    paths: List[Path] = typer.Argument(..., help="Cell images and/or folders (recursive)"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for <name>_gradcam.png overlays and explanations.csv"),
    model: Optional[Path] = typer.Option(None, help="Run folder (PyTorch; Grad-CAM needs gradients); default: bundled"),
    target: Optional[str] = typer.Option(None, "--class", help="Class to explain (e.g. Parasitized). Default: the predicted class"),
    alpha: float = typer.Option(0.45, min=0.0, max=1.0, help="Heat-map opacity"),
) -> None:
    """Write Grad-CAM overlays (Selvaraju et al. 2017): where the model saw the evidence.

    A file that cannot be read (or is grayscale: the model reads the stain's colour) gets an
    error row in explanations.csv and the rest go on; the exit status is 1 if any file failed (or
    no image file was found). ONNX models cannot be explained: Grad-CAM needs the gradients.
    """
    from PIL import Image

    from malaria_screen.data.io import ImageDecodeError
    from malaria_screen.data.parallel import decode_cell
    from malaria_screen.inference.gradcam import explain as run_explain

    check_out_dir(out)
    if model is not None and model.suffix.lower() == ".onnx":
        raise typer.BadParameter("explain needs a PyTorch run folder (Grad-CAM needs the model's gradients); ONNX models "
                                 "cannot be explained", param_hint="'--model'")
    from malaria_screen.inference.site import MODEL_DIR, is_site_dir

    if model is not None and is_site_dir(model):  # its calibration does not change where the network looks
        raise typer.BadParameter(f"{model} is a site model: explain the cell model it wraps ({model / MODEL_DIR})",
                                 param_hint="'--model'")
    files = list_inputs(paths)
    try:
        pred = load_model(model, backend="torch")
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    if pred.backend != "torch":  # an ensemble folder: Grad-CAM explains one network
        raise typer.BadParameter(f"{model} is a model ensemble: explain needs a single PyTorch run folder (one of its "
                                 "members/)", param_hint="'--model'")
    cls_idx = None
    if target is not None:
        if target not in pred.class_names:
            raise typer.BadParameter(f"--class must be one of {pred.class_names}, got {target!r}")
        cls_idx = pred.class_names.index(target)
    rows, used = [], set()
    for f in files:
        row = {"path": str(f), "label": None, "p_parasitized": None, "explained_class": None, "overlay": None, "error": None}
        name, k = f"{f.stem}_gradcam.png", 1
        while name in used:
            k += 1
            name = f"{f.stem}_{k}_gradcam.png"
        try:
            (ex,) = run_explain(pred, [decode_cell(f)], class_index=cls_idx, alpha=alpha)
            buf = io.BytesIO()
            Image.fromarray(ex.overlay).save(buf, format="PNG")
            atomic_write_bytes(out / name, buf.getvalue())
        except Exception as exc:  # noqa: BLE001 - one bad file (or unwritable overlay) never stops the batch
            row["error"] = error_text(exc, plain=ImageDecodeError)
            rows.append(row)
            continue
        used.add(name)
        row.update(label=ex.label, p_parasitized=None if ex.p_parasitized is None else round(ex.p_parasitized, 6),
                   explained_class=ex.explained_class, overlay=name)
        rows.append(row)
    atomic_write_text(out / "explanations.csv", rows_to_csv(rows, ["path", "label", "p_parasitized", "explained_class", "overlay", "error"]))
    n_bad = sum(1 for r in rows if r["error"])
    typer.echo(f"{len(rows) - n_bad} overlays, {n_bad} failed -> {out}")
    if n_bad:
        raise typer.Exit(1)


def app_cmd(
    model: Optional[Path] = typer.Option(None, help="Run folder or .onnx file; default: the bundled model"),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (127.0.0.1 = this machine only). Any other needs a "
                                             "login (--key-file) or --allow-anonymous: docs/deployment-security.md"),
    port: int = typer.Option(7860, help="TCP port"),
    rescorer: Optional[Path] = typer.Option(None, "--rescorer", help=RESCORER_HELP),
    key_file: Optional[Path] = typer.Option(None, help="File of login keys, one per line (chmod 600); also "
                                                      "$MALARIA_SCREEN_APP_KEYS (comma-separated). The login's password "
                                                      "is a key, the user name is free. Without either: no login"),
    allow_anonymous: bool = typer.Option(False, help="Serve a non-loopback --host without a login (a proxy in front "
                                                     "authenticates)"),
    allowed_host: Optional[list[str]] = typer.Option(None, "--allowed-host", help="Accepted Host header (repeat); "
                                                     "default: 127.0.0.1, localhost, ::1 and the bound address. Add "
                                                     "your public name behind a proxy"),
    max_request_cpu_s: float = typer.Option(20.0, min=0.001, help="CPU seconds per click; images and fields after it "
                                                                  "is spent are listed as not processed"),
    max_queue: int = typer.Option(16, min=1, help="Clicks that may wait before the app answers 'queue full'"),
) -> None:
    """Start the offline web app (Gradio): whole fields, cells with Grad-CAM, labelling for a site model."""
    from malaria_screen.app import (APP_KEYS_ENV, AnonymousExposureError, AppAccess, AppLimits, check_exposure,
                                    is_loopback, launch)
    from malaria_screen.serve import load_api_keys

    try:
        access = AppAccess(keys=load_api_keys(key_file, env=APP_KEYS_ENV), allow_anonymous=allow_anonymous,
                           **({"allowed_hosts": tuple(allowed_host)} if allowed_host else {}))
        check_exposure(host, access)  # before the model is loaded
        limits = AppLimits(max_request_cpu_s=max_request_cpu_s, max_queue=max_queue)
        pred = load_model(model)
    except AnonymousExposureError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    if not is_loopback(host) and not access.keys:
        typer.echo(f"warning: serving the web app on {host} without a login (--allow-anonymous)", err=True)
    launch(pred, host=host, port=port, rescorer=load_rescorer(rescorer, pred), access=access, limits=limits)


def serve(
    model: Optional[Path] = typer.Option(None, help="Run folder or .onnx file; default: the bundled model"),
    backend: Optional[str] = typer.Option(None, help="torch | onnx | auto. Default: onnx for the bundled model (its "
                                          "model.onnx: PyTorch's answers without importing torch, so less memory per "
                                          "process), auto with --model"),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (127.0.0.1 = this machine only; put a reverse proxy "
                                             "with TLS in front for anything else: docs/deployment-security.md)"),
    port: int = typer.Option(8000, help="TCP port"),
    max_file_bytes: int = typer.Option(8 * 1024 * 1024, help="Largest accepted file, bytes"),
    max_request_bytes: int = typer.Option(64 * 1024 * 1024, help="Largest accepted request body, bytes"),
    max_images: int = typer.Option(256, help="Most images per request"),
    max_pixels: int = typer.Option(25_000_000, help="Largest accepted image, width x height pixels"),
    max_request_pixels: int = typer.Option(50_000_000, help="Pixels decoded per request, all images together"),
    max_request_cpu_s: float = typer.Option(20.0, help="CPU seconds per request (hard for /v1/field)"),
    max_field_memory: int = typer.Option(3 * 1024**3 // 2, help="Address space one field job may add to its worker, bytes "
                                                               "(0: no limit); a 19.7 Mpx field needs about 1.65 GB"),
    field_workers: int = typer.Option(1, min=1, help="Worker processes screening /v1/field images"),
    max_queue: int = typer.Option(8, min=1, help="Jobs waiting per queue before 503 + Retry-After"),
    body_timeout: float = typer.Option(60.0, help="Seconds to send a request body (408 after)"),
    header_timeout: float = typer.Option(10.0, help="Seconds to send the request headers (connection closed after)"),
    api_key_file: Optional[Path] = typer.Option(None, help="File of API keys, one per line; also $MALARIA_SCREEN_API_KEYS "
                                                          "(comma-separated). Without either: no authentication"),
    rate_limit: float = typer.Option(0.0, min=0.0, help="Requests per minute per client (API key, else address); 0: off"),
    rate_burst: int = typer.Option(20, min=1, help="Requests a client may send at once before the rate applies"),
    allowed_host: Optional[list[str]] = typer.Option(None, "--allowed-host", help="Accepted Host header (repeat); default: "
                                                     "127.0.0.1, localhost, ::1. Add your public name behind a proxy"),
    cors_origin: Optional[list[str]] = typer.Option(None, "--cors-origin", help="Browser origin allowed cross-site (repeat); "
                                                                              "default: none"),
    threads: int = typer.Option(1, min=1, help="Inference threads per call (torch / ONNX Runtime). Concurrency comes from "
                                           "requests; 1 measured fastest and fairest under load on 2 cores"),
    log_level: str = typer.Option("warning", help="uvicorn log level"),
    rescorer: Optional[Path] = typer.Option(None, "--rescorer", help=RESCORER_HELP),
) -> None:
    """Start the REST API (FastAPI): POST /v1/classify, POST /v1/field, GET /v1/model, /healthz, /readyz, /docs."""
    from malaria_screen.serve import ServeLimits, ServeSecurity, create_app, load_api_keys
    from malaria_screen.serve.server import run

    backend = screening_backend(model, backend)
    if backend not in ("torch", "onnx", "auto"):
        raise typer.BadParameter(f"--backend must be torch, onnx or auto, got {backend!r}", param_hint="'--backend'")
    try:
        is_onnx = backend == "onnx" or (model is not None and model.suffix.lower() == ".onnx")
        if not is_onnx and backend != "onnx":
            try:
                import torch

                torch.set_num_threads(threads)
            except ImportError:
                is_onnx = True
        limits = ServeLimits(max_file_bytes=max_file_bytes, max_request_bytes=max_request_bytes, max_images=max_images,
                             max_pixels=max_pixels, max_request_pixels=max_request_pixels,
                             max_request_cpu_s=max_request_cpu_s, max_field_memory_bytes=max_field_memory,
                             field_workers=field_workers, max_queue=max_queue, body_timeout_s=body_timeout,
                             header_timeout_s=header_timeout)
        security = ServeSecurity(api_keys=load_api_keys(api_key_file), rate_per_minute=rate_limit, rate_burst=rate_burst,
                                 **({"allowed_hosts": tuple(allowed_host)} if allowed_host else {}),
                                 cors_origins=tuple(cors_origin or ()))
        pred = load_model(model, backend=backend, **({"num_threads": threads} if is_onnx else {}))
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    if host not in ("127.0.0.1", "::1", "localhost") and not security.api_keys:
        typer.echo(f"warning: serving on {host} without API keys: anyone who reaches it can use it "
                   f"(see docs/deployment-security.md)", err=True)
    app = create_app(pred, limits, rescorer=load_rescorer(rescorer, pred), security=security)
    run(app, host=host, port=port, log_level=log_level, header_timeout_s=header_timeout)


def bench_infer(
    data: Optional[Path] = typer.Argument(None, help="Cell image folder. Default: $MALARIA_SCREEN_DATA/nih_cell_images"),
    model: Optional[Path] = typer.Option(None, help="Run folder; default: the bundled model"),
    fp32: Optional[Path] = typer.Option(None, help="ONNX fp32 file; default: exported to a temporary folder"),
    int8: Optional[Path] = typer.Option(None, help="ONNX int8 file; default: exported (calibrated) to a temporary folder"),
    n_files: int = typer.Option(2048, min=16, help="Files to classify per measurement (seeded sample)"),
    batch: List[int] = typer.Option([1, 256], min=1, help="Batch sizes (repeat the option)"),
    workers: Optional[int] = typer.Option(None, min=1, help="Decoding threads. Default: min(8, CPUs + 2)"),
    threads: Optional[int] = typer.Option(None, min=1, help="Inference threads (torch and ONNX Runtime). Default: library defaults"),
    as_png: bool = typer.Option(False, help="Re-encode the sampled cells as PNG first (pixels identical), as users' files are"),
    backends: str = typer.Option("torch,onnx-fp32,onnx-int8", help="Comma-separated subset to run"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON"),
    seed: int = typer.Option(0),
) -> None:
    """Benchmark cells/s end to end (file to label): torch, ONNX fp32, ONNX int8.

    Also prints decoding alone, inference alone, and the share of this machine's float32 matmul
    ceiling (MFLOPs/cell x cells/s / GFLOP/s of a 2048x2048 matmul measured in the same run).
    """
    from malaria_screen.export.bench import bench_backends
    from malaria_screen.export.split_cells import default_nih_dir
    from malaria_screen.inference import OnnxPredictor, Predictor
    from malaria_screen.models import build_model, count_flops

    if json_out is not None:
        check_out_file(json_out, "'--json'")
    data = data or default_nih_dir()
    if not data.is_dir():
        raise typer.BadParameter(f"no data folder {data}")
    wanted = [b.strip() for b in backends.split(",") if b.strip()]
    mdir = _model_dir(model)
    all_files = list_inputs([data])
    rng = np.random.default_rng(seed)
    files = [str(all_files[i]) for i in sorted(rng.choice(len(all_files), size=min(n_files, len(all_files)), replace=False))]
    with tempfile.TemporaryDirectory(prefix="malaria-screen-bench-") as tmp:
        if as_png:
            from PIL import Image

            from malaria_screen.data.io import decode_image

            pngs = []
            for i, f in enumerate(files):
                p = os.path.join(tmp, f"{i:06d}.png")
                Image.fromarray(decode_image(f)).save(p)
                pngs.append(p)
            files = pngs
        if threads:
            import torch

            torch.set_num_threads(threads)
        models = {}
        pt = Predictor.from_dir(mdir)
        if "torch" in wanted:
            models["torch"] = pt
        if "onnx-fp32" in wanted or ("onnx-int8" in wanted and int8 is None):
            if fp32 is None:
                from malaria_screen.export.onnx import export_onnx

                fp32 = export_onnx(pt, Path(tmp) / "model.onnx")
            if "onnx-fp32" in wanted:
                models["onnx-fp32"] = OnnxPredictor.from_file(fp32, num_threads=threads)
        if "onnx-int8" in wanted:
            if int8 is None:
                from malaria_screen.export.onnx import quantize_int8
                from malaria_screen.export.split_cells import load_split_cells

                cal = load_split_cells(mdir / "split.json", default_nih_dir(), "train", pt.input_size, n=512, seed=seed)
                int8 = quantize_int8(fp32, Path(tmp) / "model.int8.onnx", cal.cells)
            models["onnx-int8"] = OnnxPredictor.from_file(int8, num_threads=threads)
        net = build_model(pt.config.model, num_classes=pt.config.num_classes, input_size=pt.input_size)
        mflops = count_flops(net, pt.input_size) / 1e6
        res = bench_backends(models, files, batch_sizes=batch, mflops_per_cell=mflops, workers=workers)
    res.update(model=str(mdir), data=str(data), as_png=as_png, threads=threads)
    _print_bench(res)
    if json_out:
        atomic_write_json(json_out, res)


def _print_bench(res: dict) -> None:
    """Print :func:`~malaria_screen.export.bench.bench_backends` results as a table and a footnote."""
    head = ["backend", "batch", "end-to-end cells/s", "decode-only cells/s", "infer-only cells/s", "infer % of matmul peak",
            "e2e % of matmul peak"]
    rows = [[r["backend"], str(r["batch"]), f"{r['end_to_end']:,.0f}", f"{r['decode']:,.0f}", f"{r['infer']:,.0f}",
             "-" if r["ceiling_ratio"] is None else f"{100 * r['ceiling_ratio']:.1f}",
             "-" if r["ceiling_ratio_e2e"] is None else f"{100 * r['ceiling_ratio_e2e']:.1f}"] for r in res["rows"]]
    echo_table(rows, head)
    mf = res.get("mflops_per_cell")
    typer.echo(f"\n{res['n_files']} files, {res['workers']} decoding threads, {res['cpu_count']} CPUs; "
               f"matmul ceiling {res['matmul_gflops']:.1f} GFLOP/s (float32 2048x2048)"
               + (f"; model {mf:.2f} MFLOPs/cell" if mf else ""))


def register(app: typer.Typer) -> None:
    """Add the deployment commands to ``app``."""
    app.command("export")(export)
    app.command("ensemble")(ensemble)
    app.command("app")(app_cmd)
    app.command("serve")(serve)
    app.command("explain")(explain)
    app.command("bench-infer")(bench_infer)
