"""Pack a cell folder as its model-input cells, losslessly, small enough to travel to a GPU machine.

The device machine gets only the repository and at most 64 MiB of carried files per call, and
the NIH cell folder is about three times that. What training at ``--size`` px reads from the
folder is its letterboxed ``size x size`` cell store (:func:`malaria_screen.data.load_cell_set`),
so this writes each stored cell as a lossless WebP under the same relative path, split by patient
into ``--parts`` folders of about equal size. Letterboxing a square cell of the model's input size
leaves it as it is, so ``load_cell_set`` on the merged parts gives the same arrays, labels,
patients and order as on the original folder: checked here before anything is kept, and the run
fails otherwise. Training on them there is training on the same cells.

Usage::

    python benchmarks/pack_cells.py ../shared/data/nih_cell_images --out .gpu/cells --parts 2 [--size 64]

Merge the parts there with ``mkdir -p M && for p in .gpu/cells/part*; do cp -rs "$PWD/$p/." M/; done``.
See docs/performance.md (GPU).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir")
    ap.add_argument("--out", required=True, help="folder for part0/, part1/, ... (replaced)")
    ap.add_argument("--parts", type=int, default=2)
    ap.add_argument("--size", type=int, default=64, help="the model's input size, px")
    args = ap.parse_args()

    from malaria_screen.data.dataset import load_cell_set

    with tempfile.TemporaryDirectory(prefix="pack_cells_cache_") as cache:
        cells = load_cell_set(args.data_dir, size_px=args.size, cache_dir=cache, progress=False)
        out = Path(args.out)
        if out.exists():
            shutil.rmtree(out)
        patients = sorted(set(cells.patients))
        sizes = dict.fromkeys(patients, 0)
        for p in cells.patients:
            sizes[p] += 1
        part_of, load = {}, [0] * args.parts
        for p in sorted(patients, key=lambda q: (-sizes[q], q)):  # greedy: biggest patient to the lightest part
            k = int(np.argmin(load))
            part_of[p], load[k] = k, load[k] + sizes[p]
        for img, rel, pat in zip(cells.images, cells.relpaths, cells.patients):
            dest = out / f"part{part_of[pat]}" / Path(rel).with_suffix(".webp")
            dest.parent.mkdir(parents=True, exist_ok=True)
            ok, buf = cv2.imencode(".webp", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_WEBP_QUALITY, 101])
            if not ok:
                raise RuntimeError(f"cannot encode {rel}")
            dest.write_bytes(buf.tobytes())
        merged = Path(cache) / "merged"
        for part in sorted(out.glob("part*")):
            shutil.copytree(part, merged, dirs_exist_ok=True)
        again = load_cell_set(merged, size_px=args.size, cache_dir=Path(cache) / "again", progress=False)
    same = (np.array_equal(again.images, cells.images) and np.array_equal(again.labels, cells.labels)
            and again.patients == cells.patients)
    if not same:
        shutil.rmtree(out)
        raise SystemExit("the packed cells do not load as the original ones: nothing kept")
    for k in range(args.parts):
        size = sum(f.stat().st_size for f in (out / f"part{k}").rglob("*") if f.is_file())
        print(f"part{k}: {load[k]} cells, {size / 2**20:.1f} MiB")
    print(f"{len(cells)} cells of {len(patients)} patients at {args.size} px: identical when loaded back -> {out}")


if __name__ == "__main__":
    main()
