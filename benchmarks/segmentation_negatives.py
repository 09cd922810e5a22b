"""Experiment: Chula extra negatives cut by ``smear``'s own segmentation instead of around points.

Usage::

    python benchmarks/segmentation_negatives.py --data ../shared/data --out runs/segneg

The bundled model learns "another microscope, Uninfected" from the Chula-RBC-12 training fields,
cut around their annotated points with a global-threshold mask
(:func:`malaria_screen.data.extra_negatives.point_cell_set`): cleaner crops than the ones
``smear`` classifies, which come from its own segmentation (pale cells, clumps split, pieces,
platelets). On the IML fields most false Parasitized calls are such detections (lab notebook,
adaptation). This trains the bundled recipe on its own split (``config.json``, ``split.json``),
with the same Chula training fields cut instead by
:func:`malaria_screen.smear.segment.segment_field` and
:func:`malaria_screen.smear.crops.cell_crops` (every detection of a field without malaria is
Uninfected), in place of the point cuts. The run's ``split.json`` records them as extra
negatives, so that the quantifiers' training prior leaves them out as it does the point cuts.

The model is scored by ``bench_model_card.py --model OUT`` and ``bench_quantify.py --model OUT``;
this script's record ``segmentation_negatives`` holds the counts. No IML data chose anything here.
About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from malaria_screen.config import TrainConfig
from malaria_screen.data.dataset import CellSet, load_cell_set
from malaria_screen.data.extra_negatives import list_point_fields
from malaria_screen.data.io import decode_image
from malaria_screen.data.preprocess import letterbox
from malaria_screen.data.split import SplitIndices
from malaria_screen.inference.base import default_model_dir
from malaria_screen.smear.crops import cell_crops
from malaria_screen.smear.segment import segment_field
from malaria_screen.training.run import concat_cell_sets, split_from_manifest, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import write_record  # noqa: E402


def segmented_negatives(folder: Path, fields: list[str], class_names: list[str], size_px: int) -> CellSet:
    """Every detection of ``smear``'s segmentation on the given malaria-free fields, as Uninfected
    ``(N, size_px, size_px, 3) uint8`` cells (one group per field: ``<folder>:<stem>``)."""
    images, patients, relpaths = [], [], []
    for stem in fields:
        path = next(p for p in sorted((folder / "images").glob(f"{stem}.*")) if p.is_file())
        rgb = decode_image(path)
        seg = segment_field(rgb)
        for k, crop in enumerate(cell_crops(rgb, seg.labels, seg.cells())):
            images.append(letterbox(crop, size_px))
            patients.append(f"{folder.name}_seg:{stem}")
            relpaths.append(f"{folder.name}_seg/images/{path.name}#{k}")
    return CellSet(images=np.stack(images), labels=np.full(len(images), class_names.index("Uninfected"), np.int64),
                   patients=patients, relpaths=relpaths, class_names=list(class_names), root=folder, size_px=size_px,
                   errors={})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--base", default=None, help="run folder whose recipe and split are used (default: the bundled model)")
    ap.add_argument("--out", default="runs/segneg")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    base_dir = Path(args.base) if args.base else default_model_dir()
    base = TrainConfig.from_json(base_dir / "config.json")
    data = Path(args.data) / "nih_cell_images"
    chula = Path(args.data) / "chula_rbc"
    out = Path(args.out)
    cells = load_cell_set(data, size_px=base.input_size, progress=False)
    split = split_from_manifest(json.loads((base_dir / "split.json").read_text()), cells.relpaths)
    fields = list(base.extra_negative_fields) or list_point_fields(chula)
    neg = segmented_negatives(chula, fields, list(cells.class_names), base.input_size)
    both = concat_cell_sets(cells, neg)
    extra = np.arange(len(cells), len(both), dtype=np.int64)
    cfg = base.replace(extra_negatives=None, extra_negative_fields=())  # in place of the point cuts
    if (out / "weights.safetensors").is_file():  # a finished run is reused, if it is this one
        done = json.loads((out / "split.json").read_text()).get("extra_negatives") or {}
        if TrainConfig.from_json(out / "config.json").replace(mean=cfg.mean, std=cfg.std) != cfg or \
                done.get("n_cells") != len(extra):
            raise ValueError(f"{out} holds a run of other settings or negatives: remove it or pass another --out")
    else:
        shutil.rmtree(out, ignore_errors=True)  # a run stopped before its weights: from the start
        train(data, out, cfg, cells=both, progress=False,
              split=SplitIndices(train=np.concatenate([split.train, extra]), val=split.val, test=split.test))
        manifest = json.loads((out / "split.json").read_text())
        manifest["extra_negatives"] = {"folder": f"{chula} (smear's segmentation)", "split": "train",
                                       "n_cells": int(len(extra)), "n_fields": len(fields)}
        (out / "split.json").write_text(json.dumps(manifest))
    figures = {"n_fields": len(fields), "n_cells": int(len(extra)), "n_cells_per_field": len(extra) / len(fields)}
    if not args.no_record:
        write_record("segmentation_negatives", figures, notes=(
            f"Bundled model's recipe and split; the {len(fields)} Chula-RBC-12 training fields of its config cut by "
            f"smear's segmentation ({len(extra)} detections, all Uninfected) instead of around their points; "
            f"run folder {out}, scored by bench_model_card.py (record stain_and_negatives_candidates; its --model a run "
            "trained on the same Chula fields, so that only the held-out fields score it: this run's config does not "
            "list them) and bench_quantify.py (candidate_segneg_quantify*)."))
    return figures


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
