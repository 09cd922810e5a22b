"""Export a cell model to ONNX, with its preprocessing inside the graph, and quantise it to int8.

The exported graph is self-contained: it takes letterboxed cells as they come out of the decoder
and returns class probabilities, so a runtime needs numpy, Pillow and ONNX Runtime only.

Graph contract (``malaria_screen.onnx_io = "cells_nhwc_uint8->probs,features"``)
---------------------------------------------------------------------------------
input ``cells`` : (N, S, S, 3) uint8
    RGB cells letterboxed to ``S = input_size`` px (aspect kept, black padding;
    :func:`malaria_screen.data.preprocess.letterbox`). ``N`` is a dynamic axis.
output ``probs`` : (N, num_classes) float32
    Softmax probabilities in ``class_names`` order.
output ``features`` : (N, D) float32
    The input of the network's last ``nn.Linear`` (its pooled features), what
    :meth:`~malaria_screen.inference.predictor.Predictor.predict_with_features` reads with a hook:
    the self-check (:mod:`malaria_screen.smear.domain`) measures distances there, so it runs on the
    ONNX and int8 models too. Files exported before this output (contract
    ``"cells_nhwc_uint8->probs"``) still load, without the self-check.

Inside: ``Cast`` to float32, ``(x - 255 mean) * 1 / (255 std)`` with the training patients'
mean/std (on ``(N, S, S*3)`` rows, constants repeated per pixel), ``Transpose`` to NCHW, the
network, ``Softmax``. The normalisation is computed exactly as
:class:`~malaria_screen.inference.predictor.Predictor` does (the constants and order of
:func:`malaria_screen.data.normalize.pixel_affine`), so fp32 ONNX Runtime matches PyTorch
to float rounding. Taking uint8 also makes the model quantisation-friendly: the first quantised
tensor is the normalised input, whose range the calibration measures.

Metadata (``metadata_props``): ``malaria_screen.config`` (the whole ``config.json``),
``malaria_screen.metrics`` (the run's ``metrics.json``, if any), ``malaria_screen.onnx_io``,
``malaria_screen.precision`` (``fp32`` or ``int8-qdq`` / ``int8-qoperator``),
``malaria_screen.version``, ``malaria_screen.seen_patients`` (``{"train": [...], "val": [...]}``
from the run's ``split.json``, so ``evaluate`` leaves them out for an ONNX model too),
``malaria_screen.quantify`` (the parasitemia estimator's parameters,
:func:`~malaria_screen.evaluation.quantify.params_from_model` of the run: its training prior and
threshold, so ``smear`` corrects an ONNX model's posteriors to the same prior as the PyTorch
model's) and, after int8 quantisation, ``malaria_screen.quantization`` (method, calibration cells
and patients).

int8 uses ONNX Runtime static quantisation (``quantize_static``; Jacob et al., CVPR 2018:
affine uint8/int8 quantisation with int32 accumulation): weights int8 per output channel,
activations uint8 (asymmetric) calibrated with min/max on real cells of training patients.
Softmax and pooling stay in float so probabilities keep full resolution.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import malaria_screen
from malaria_screen.evaluation.quantify import params_from_model
from malaria_screen.fileio import atomic_write_bytes

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "FEATURES_NAME",
    "META_CONFIG",
    "MAX_INT8_OPSET",
    "MAX_OPSET",
    "MIN_OPSET",
    "export_onnx",
    "quantize_int8",
    "set_metadata",
]

log = logging.getLogger(__name__)

INPUT_NAME = "cells"
OUTPUT_NAME = "probs"
FEATURES_NAME = "features"
META_CONFIG = "malaria_screen.config"
META_METRICS = "malaria_screen.metrics"
META_IO = "malaria_screen.onnx_io"
META_PRECISION = "malaria_screen.precision"
META_QUANT = "malaria_screen.quantization"
META_VERSION = "malaria_screen.version"
META_SEEN = "malaria_screen.seen_patients"
META_QUANTIFY = "malaria_screen.quantify"
IO_CONTRACT = "cells_nhwc_uint8->probs,features"

#: Opsets :func:`export_onnx` accepts. Tried with every registered architecture (torch 2.14's
#: TorchScript exporter, ONNX Runtime 1.31): fp32 exports and matches torch from 11 (efficientnet_lite0's
#: padding needs 11) to 20, the exporter's newest; int8 per-channel QDQ needs 13 (DequantizeLinear's
#: ``axis``); below 7 the exporter writes an invalid graph.
MIN_OPSET: int = 13
MAX_OPSET: int = 20
#: Newest opset :func:`quantize_int8` accepts: from 18, ONNX Runtime's shape inference before
#: quantisation fails on CellNet's graph (the default model).
MAX_INT8_OPSET: int = 17

_DOC = ("malaria-screen cell classifier. Input 'cells': (N, S, S, 3) uint8 RGB, letterboxed to S px "
        "(aspect kept, black padding). Output 'probs': (N, num_classes) float32 softmax in class_names "
        "order; output 'features': (N, D) float32, the classifier head's input. Preprocessing config (JSON) in metadata_props['malaria_screen.config']. "
        "Research use only; not a medical device.")


def _wrapper(net, mean: Sequence[float], std: Sequence[float], size_px: int):
    # torch, and data.normalize (which imports it), only when exporting: quantize_int8 and the
    # metadata helpers run without torch
    import torch

    from malaria_screen.data.normalize import pixel_affine

    heads = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    if not heads:
        raise ValueError(f"{type(net).__name__} has no nn.Linear head to read features from")
    head = heads[-1]

    class _Deployable(torch.nn.Module):
        """uint8 NHWC cells -> (softmax probabilities, the head's input features), normalising as Predictor does."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net
            # the float32 constants of normalize_pixels (as Predictor), repeated along a row of S
            # pixels: the affine then runs on (N, S, S*3) rows, which ONNX Runtime vectorises,
            # instead of broadcasting a 3-vector over NHWC (3-4x slower once int8 convolutions run NHWC)
            offset, scale = pixel_affine(mean, std)
            self.register_buffer("mean255_row", offset.repeat(size_px))
            self.register_buffer("inv_std255_row", scale.repeat(size_px))

        def forward(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c = len(mean)
            x = (cells.float().reshape(-1, size_px, size_px * c) - self.mean255_row) * self.inv_std255_row
            x = x.reshape(-1, size_px, size_px, c).permute(0, 3, 1, 2)  # (N, C, S, S)
            captured: list[torch.Tensor] = []  # the head's input, as Predictor.predict_with_features hooks it
            hook = head.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0]))
            try:
                probs = self.net(x).softmax(-1)
            finally:
                hook.remove()
            return probs, captured[-1].reshape(captured[-1].shape[0], -1)

    return _Deployable().eval()


def set_metadata(model, entries: dict[str, str]) -> None:
    """Set (replace) string entries of an ``onnx.ModelProto``'s ``metadata_props`` in place."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    for k, v in keep + list(entries.items()):
        p = model.metadata_props.add()
        p.key, p.value = k, v


def _check_and_write(model, out_path: Path) -> Path:
    import onnx

    onnx.checker.check_model(model, full_check=True)
    return atomic_write_bytes(out_path, model.SerializeToString())


def _seen_patients(source: str | None) -> dict[str, list[str]]:
    split = Path(source) / "split.json" if source and Path(source).is_dir() else None
    if split is None or not split.exists():
        return {}
    man = json.loads(split.read_text(encoding="utf-8"))
    return {k: list(man["splits"].get(k, {}).get("patients", [])) for k in ("train", "val")}


def export_onnx(predictor, out_path: str | Path, *, opset: int = 17) -> Path:
    """Export a PyTorch :class:`~malaria_screen.inference.predictor.Predictor` to ONNX (fp32).

    Parameters
    ----------
    predictor : Predictor
        Its ``net`` and ``config`` are exported; ``metrics`` go into the metadata.
    out_path : path
        Destination ``.onnx`` file, written atomically after the ONNX checker passed.
    opset : int, default=17
        From :data:`MIN_OPSET` (13) to :data:`MAX_OPSET` (20).

    Returns
    -------
    Path
        ``out_path``. The graph maps ``cells (N, S, S, 3) uint8`` to ``probs (N, C) float32`` and
        ``features (N, D) float32`` (see the module docstring); ``N`` is dynamic.

    Raises
    ------
    ValueError
        If ``opset`` is outside ``MIN_OPSET..MAX_OPSET``, or the network has no ``nn.Linear`` head.
    onnx.checker.ValidationError
        If the exported graph is invalid.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be {MIN_OPSET} to {MAX_OPSET}, got {opset}")
    import onnx
    import torch

    cfg = predictor.config
    wrapped = _wrapper(predictor.net.cpu().eval(), cfg.mean, cfg.std, cfg.input_size)
    s = cfg.input_size
    example = torch.zeros((2, s, s, cfg.channels), dtype=torch.uint8)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            wrapped, (example,), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME, FEATURES_NAME],
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}, FEATURES_NAME: {0: "N"}},
        )
    predictor.net.to(getattr(predictor, "device", "cpu"))
    model = onnx.load_model_from_string(buf.getvalue())
    model.doc_string = _DOC
    model.producer_name = "malaria-screen"
    model.producer_version = malaria_screen.__version__
    set_metadata(model, {
        META_CONFIG: json.dumps(cfg.to_dict()),
        META_METRICS: json.dumps(predictor.metrics or {}),
        META_IO: IO_CONTRACT,
        META_PRECISION: "fp32",
        META_VERSION: malaria_screen.__version__,
        META_SEEN: json.dumps(_seen_patients(predictor.source)),
        META_QUANTIFY: json.dumps(asdict(params_from_model(predictor))),
    })
    out = _check_and_write(model, Path(out_path))
    log.info("exported %s (%d bytes)", out, out.stat().st_size)
    return out


class _CellReader:
    """``CalibrationDataReader`` over uint8 cells, in batches."""

    def __init__(self, cells: np.ndarray, batch: int) -> None:
        self._it = iter([{INPUT_NAME: cells[i : i + batch]} for i in range(0, len(cells), batch)])

    def get_next(self) -> dict | None:
        return next(self._it, None)


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_cells: np.ndarray,
    *,
    quant_format: str = "qdq",
    per_channel: bool = True,
    calibrate_method: str = "minmax",
    op_types: Sequence[str] = ("Conv", "Relu", "Gemm", "MatMul"),
    calibration_info: dict[str, Any] | None = None,
) -> Path:
    """Quantise an fp32 malaria-screen ONNX model to int8 (ONNX Runtime static quantisation).

    Parameters
    ----------
    fp32_path : path
        A model written by :func:`export_onnx`.
    out_path : path
        Destination ``.onnx`` (atomic).
    calibration_cells : (N, S, S, 3) ndarray of uint8
        Letterboxed cells of TRAINING patients (never test patients); a few hundred suffice.
    quant_format : {"qdq", "qoperator"}, default="qdq"
        QDQ (QuantizeLinear/DequantizeLinear pairs that ORT fuses into int8 kernels) or
        QOperator (QLinearConv etc. written directly).
    per_channel : bool, default=True
        Per-output-channel weight scales (more accurate for small convs).
    calibrate_method : {"minmax", "entropy", "percentile"}, default="minmax"
    op_types : sequence of str, default=("Conv", "Relu", "Gemm", "MatMul")
        Operator types to quantise; the rest (pooling, concat, softmax) stay float. ``Relu``
        must be included so that consecutive int8 convolutions chain without a
        dequantise/quantise round trip between them.
    calibration_info : dict, optional
        Stored in ``metadata_props['malaria_screen.quantization']`` (e.g. patients and cells).

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    ValueError
        If the cells do not match the model's input size, the options are unknown, or the model's
        opset is newer than :data:`MAX_INT8_OPSET`.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fmt = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}.get(quant_format)
    meth = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}.get(calibrate_method)
    if fmt is None or meth is None:
        raise ValueError(f"quant_format must be qdq|qoperator and calibrate_method minmax|entropy|percentile, "
                         f"got {quant_format!r}, {calibrate_method!r}")
    src = onnx.load(str(fp32_path))
    opset = next((o.version for o in src.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > MAX_INT8_OPSET:
        raise ValueError(f"int8 quantisation needs a model exported with opset {MIN_OPSET} to {MAX_INT8_OPSET}, "
                         f"got opset {opset}")
    meta = {p.key: p.value for p in src.metadata_props}
    cfg = json.loads(meta[META_CONFIG])
    s = int(cfg["input_size"])
    cells = np.ascontiguousarray(calibration_cells)
    if cells.dtype != np.uint8 or cells.ndim != 4 or cells.shape[1:] != (s, s, 3) or len(cells) == 0:
        raise ValueError(f"calibration cells must be (N>0, {s}, {s}, 3) uint8, got {cells.shape} {cells.dtype}")
    with tempfile.TemporaryDirectory(prefix="malaria-screen-quant-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        quantize_static(
            str(pre), str(q), _CellReader(cells, 64), quant_format=fmt, op_types_to_quantize=list(op_types),
            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=meth, extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        model = onnx.load(str(q))
    model.doc_string = src.doc_string
    model.producer_name, model.producer_version = src.producer_name, src.producer_version
    info = {"method": "onnxruntime.quantization.quantize_static", "format": quant_format, "per_channel": per_channel,
            "calibrate_method": calibrate_method, "op_types": list(op_types), "activations": "uint8", "weights": "int8",
            "calibration_cells": int(len(cells)), **(calibration_info or {})}
    set_metadata(model, {**meta, META_PRECISION: f"int8-{quant_format}", META_QUANT: json.dumps(info)})
    out = _check_and_write(model, Path(out_path))
    log.info("quantised %s -> %s (%d bytes)", fp32_path, out, out.stat().st_size)
    return out
