"""Deployment exports: ONNX (fp32, preprocessing in the graph) and int8 static quantisation.

See :mod:`malaria_screen.export.onnx` for the graph contract and metadata,
:mod:`malaria_screen.export.split_cells` for the calibration / test cells of a run's patient split,
:mod:`malaria_screen.export.backend_agreement` for the torch / fp32 / int8 side-by-side check and
:mod:`malaria_screen.export.bench` for the end-to-end throughput benchmark.
"""

from malaria_screen.export.backend_agreement import compare_backends
from malaria_screen.export.onnx import export_onnx, quantize_int8
from malaria_screen.export.split_cells import SplitCells, default_nih_dir, load_split_cells

__all__ = ["SplitCells", "compare_backends", "default_nih_dir", "export_onnx", "load_split_cells", "quantize_int8"]
