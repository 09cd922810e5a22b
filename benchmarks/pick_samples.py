"""How the 24 bundled sample cells were chosen: at random, from the bundled model's TEST patients.

Usage::

    python benchmarks/pick_samples.py --data ../shared/data/nih_cell_images --out src/malaria_screen/assets/samples

Seeded draw (``--seed 0``), blind to any prediction: 12 Parasitized cells from 12 different
infected test patients and 12 Uninfected cells from 12 different test patients (all drawn from
``split.json``'s ``test`` files of the bundled model), one random cell per patient. The data folder
holds the public release's PNGs re-encoded as lossless WebP; each chosen cell is written back as a
PNG under its original public name (same pixels as the public release's file; checked here by
decoding both). ``make demo`` then runs on patients the model never saw, and says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="NIH cell folder the bundled model's split.json refers to")
    ap.add_argument("--out", required=True, help="Samples folder to (re)write: <out>/Parasitized, <out>/Uninfected")
    ap.add_argument("--per-class", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from PIL import Image

    from malaria_screen.data.io import decode_image
    from malaria_screen.data.patients import parse_nih_patient_id
    from malaria_screen.inference import default_model_dir

    split = json.loads((default_model_dir() / "split.json").read_text())
    test_files = sorted(split["splits"]["test"]["files"])
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    for cls in ("Parasitized", "Uninfected"):
        by_patient: dict[str, list[str]] = {}
        for f in test_files:
            if f.split("/")[0] == cls:
                by_patient.setdefault(parse_nih_patient_id(f), []).append(f)
        patients = sorted(by_patient)
        if len(patients) < args.per_class:
            raise SystemExit(f"only {len(patients)} test patients have {cls} cells")
        chosen = rng.choice(patients, size=args.per_class, replace=False)
        (out / cls).mkdir(parents=True, exist_ok=True)
        for old in (out / cls).glob("*.png"):
            old.unlink()
        for pt in sorted(chosen):
            f = by_patient[pt][int(rng.integers(len(by_patient[pt])))]
            rgb = decode_image(Path(args.data) / f)
            dst = out / cls / (Path(f).stem + ".png")
            Image.fromarray(rgb).save(dst, optimize=True)
            assert np.array_equal(decode_image(dst), rgb), dst
            print(f"{cls:12s} {pt:10s} {dst.name}")


if __name__ == "__main__":
    main()
