"""Record: the model registry's sizes, as ``malaria-screen models`` prints them.

Usage: python benchmarks/bench_models.py

For every registered architecture at its default input size: parameters and MFLOPs per cell
(``torch.utils.flop_counter``; one multiply-add counts as 2 FLOPs). Randomly initialised models:
the figures depend on the architecture only, not on trained weights. Writes
``benchmarks/results/models.json`` with keys ``<model>.input_px``, ``<model>.parameters`` and
``<model>.mflops``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import write_record  # noqa: E402


def main() -> None:
    from malaria_screen.models import build_model, count_flops, count_parameters, default_input_size, list_models

    figures: dict = {}
    for name in list_models():
        s = default_input_size(name)
        m = build_model(name, input_size=s)
        figures[f"{name}.input_px"] = s
        figures[f"{name}.parameters"] = count_parameters(m)
        figures[f"{name}.mflops"] = count_flops(m, s) / 1e6
    path = write_record("models", figures, notes="registry models at their default input size, random weights; "
                        "FLOPs by torch.utils.flop_counter (multiply-add = 2), per cell")
    print(json.dumps(figures, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
