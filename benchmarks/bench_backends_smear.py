"""Benchmark: do the ONNX and int8 models screen whole fields as the PyTorch model does, self-check included?

The bundled model's three back-ends (PyTorch, ONNX fp32 ``model.onnx``, ONNX int8
``model.int8.onnx``) screen the same fields with the same segmentation (each field is segmented
once), each with the self-check reference ``smear`` gives it (:func:`~malaria_screen.smear.domain.load_reference`:
PyTorch and fp32 ONNX the folder's ``domain.safetensors``; int8 its own
``model.int8.domain.safetensors``, fitted by ``domain-fit --onnx`` on its features, when present):
the 120 IML dev fields (another microscope) and the 54 Chula-RBC-12 fields. Per back-end:
the fraction of fields in the model's domain, how many fields get another in/out verdict than with
PyTorch, the largest difference of a field's margin to the threshold (score minus threshold), the fraction of cells with the same
Parasitized/Uninfected call and the largest difference of a field's parasitemia (percentage
points). Since the ONNX graphs return the classifier head's input features (the self-check's
space), ``smear --model model.int8.onnx`` runs the self-check; before, it was silently off.

No accuracy is claimed here (see ``bench_smear`` / ``bench_quantify``): only agreement between
back-ends. The IML fields did not choose anything.

Usage::

    PYTHONPATH=src python benchmarks/bench_backends_smear.py [DATA_DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", nargs="?", default=None, help="default: $MALARIA_SCREEN_DATA or ../shared/data")
    ap.add_argument("--limit", type=int, default=None, help="at most N fields per data set (smoke runs; no record)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import os

    import torch

    import malaria_screen
    from malaria_screen.data.io import decode_image
    from malaria_screen.inference.base import default_model_dir
    from malaria_screen.inference.onnx_predictor import OnnxPredictor
    from malaria_screen.smear.domain import load_reference
    from malaria_screen.smear.screen import screen_field
    from malaria_screen.smear.segment import segment_field
    from records import write_record

    torch.set_num_threads(args.threads)
    data = Path(args.data_dir or os.environ.get("MALARIA_SCREEN_DATA", "../shared/data"))
    bundled = default_model_dir()
    models = {"torch": malaria_screen.load_model(),
              "onnx_fp32": OnnxPredictor.from_file(bundled / "model.onnx", num_threads=args.threads),
              "onnx_int8": OnnxPredictor.from_file(bundled / "model.int8.onnx", num_threads=args.threads)}
    refs = {m: load_reference(model) for m, model in models.items()}
    sets = {"iml": sorted((data / "iml_malaria_dev" / "images").iterdir()),
            "chula": sorted((data / "chula_rbc" / "images").iterdir())}
    fig: dict[str, float | int] = {}
    for set_name, files in sets.items():
        files = files[: args.limit] if args.limit else files
        res: dict[str, list] = {m: [] for m in models}
        for f in files:
            rgb = decode_image(str(f))
            seg = segment_field(rgb)
            for m, model in models.items():
                r = screen_field(rgb, model, segmentation=seg, domain_reference=refs[m], image_name=f.name)
                res[m].append(r)
        fig[f"{set_name}.n_fields"] = len(files)
        base = res["torch"]
        for m in models:
            rs = res[m]
            verdicts = [r.in_domain for r in rs]
            fig[f"{set_name}.{m}.in_domain_frac"] = float(np.mean([v is True for v in verdicts]))
            fig[f"{set_name}.{m}.unchecked_fields"] = int(sum(v is None for v in verdicts))
            if m == "torch":
                continue
            fig[f"{set_name}.{m}.verdicts_differing"] = int(sum(a.in_domain != b.in_domain for a, b in zip(rs, base)))
            # a field's margin to its back-end's threshold, against PyTorch's margin to its own
            ds = [abs((a.domain_score - refs[m].threshold) - (b.domain_score - refs["torch"].threshold))
                  for a, b in zip(rs, base) if a.domain_score is not None and b.domain_score is not None]
            fig[f"{set_name}.{m}.max_margin_diff"] = float(max(ds)) if ds else float("nan")
            same = [ca.label == cb.label for a, b in zip(rs, base) for ca, cb in zip(a.cells, b.cells)]
            fig[f"{set_name}.{m}.same_cell_calls"] = float(np.mean(same)) if same else float("nan")
            pd = [abs(a.parasitemia - b.parasitemia) * 100 for a, b in zip(rs, base)
                  if a.parasitemia is not None and b.parasitemia is not None]
            fig[f"{set_name}.{m}.max_parasitemia_diff_pp"] = float(max(pd)) if pd else float("nan")
            print(f"{set_name} {m}: in-domain {fig[f'{set_name}.{m}.in_domain_frac']:.3f} (torch "
                  f"{fig[f'{set_name}.torch.in_domain_frac']:.3f}), verdicts differing {fig[f'{set_name}.{m}.verdicts_differing']}"
                  f"/{len(files)}, max margin diff {fig[f'{set_name}.{m}.max_margin_diff']:.4f} (threshold {refs[m].threshold:.3f}), "
                  f"same cell calls {fig[f'{set_name}.{m}.same_cell_calls']:.4f}, max parasitemia diff "
                  f"{fig[f'{set_name}.{m}.max_parasitemia_diff_pp']:.3f} pp", flush=True)
    for m, r in refs.items():
        fig[f"{m}.domain_threshold"] = float(r.threshold)
    if args.limit:
        print("--limit: no record")
        return
    write_record("bench_backends_smear", fig, uses_bundled_model=True, notes=(
        "The bundled model as PyTorch, ONNX fp32 and ONNX int8, screening the 120 IML dev fields and the 54 Chula-RBC-12 "
        "fields with one segmentation per field and each back-end's self-check reference as smear loads it (int8: its "
        "own, fitted by domain-fit --onnx); agreement with PyTorch "
        "(verdicts, domain scores, cell calls at smear's default prior-2% rule, field parasitemia). No accuracy claimed; "
        "nothing chosen on these fields."))


if __name__ == "__main__":
    main()
