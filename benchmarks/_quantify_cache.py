"""Cached model outputs for ``bench_quantify.py``: the bundled model's posteriors on its NIH
validation and test patients, and every detected cell of the 120 IML dev fields.

Each cache file stores the SHA-256 of the model's weights; a file made with other weights is
recomputed. Nothing here chooses a method: it only runs the model once.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from pathlib import Path

import numpy as np


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 of ``model_dir/weights.safetensors``."""
    return hashlib.sha256((model_dir / "weights.safetensors").read_bytes()).hexdigest()


def _load(path: Path, sha: str):
    if path.is_file():
        with path.open("rb") as f:
            obj = pickle.load(f)
        if obj.get("weights_sha256") == sha:
            return obj
    return None


def _save(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        pickle.dump(obj, f)
    tmp.replace(path)


def nih_posteriors(model, model_dir: Path, nih_root: Path, cache: Path) -> dict:
    """p_parasitized, label (1 = Parasitized) and patient of every cell of the model's ``val`` and
    ``test`` patients (``split.json``), as ``{"val": {...}, "test": {...}, "train_counts": {...}}``."""
    import json

    sha = weights_sha256(model_dir)
    path = cache / "nih_posteriors.pkl"
    obj = _load(path, sha)
    if obj is not None:
        return obj
    split = json.loads((model_dir / "split.json").read_text())
    out: dict = {"weights_sha256": sha, "train_counts": split["splits"]["train"]["n_per_class"]}
    for part in ("val", "test"):
        files = split["splits"][part]["files"]
        paths, labels = [], []
        for rel in files:
            cls = rel.split("/")[0]
            p = nih_root / rel
            if not p.is_file():
                raise FileNotFoundError(f"{p} (listed in split.json) is missing")
            paths.append(p)
            labels.append(1 if cls == "Parasitized" else 0)
        t0 = time.perf_counter()
        probs = np.asarray([r.p_parasitized for r in model.predict_files(paths)], np.float64)
        pats = [Path(r).name for r in files]
        out[part] = {"p": probs, "y": np.asarray(labels, np.int8), "files": files, "names": pats,
                     "seconds": time.perf_counter() - t0}
        print(f"NIH {part}: {len(files)} cells in {out[part]['seconds']:.0f} s", flush=True)
    _save(path, out)
    return out


def iml_cells(model, model_dir: Path, iml: Path, cache: Path) -> dict:
    """Every IML dev field screened once by ``model``: per field the detected cells' boxes,
    border flags and p_parasitized, and the field's shape; ``{"fields": {name: {...}}, "failed": {...}}``.
    Resumable: fields already in the cache are kept."""
    from malaria_screen.data.io import check_colour, decode_image
    from malaria_screen.smear.labels import load_iml_annotations
    from malaria_screen.smear.screen import screen_field

    sha = weights_sha256(model_dir)
    path = cache / "iml_cells.pkl"
    obj = _load(path, sha) or {"weights_sha256": sha, "fields": {}, "failed": {}}
    ann = load_iml_annotations(iml / "annotations.json")
    todo = [n for n in sorted(ann) if n not in obj["fields"] and n not in obj["failed"]]
    for i, name in enumerate(todo):
        t0 = time.perf_counter()
        try:
            rgb = check_colour(decode_image(iml / "images" / name))
            res = screen_field(rgb, model, image_name=name)
        except Exception as exc:  # noqa: BLE001 - a failed field is recorded, the rest go on
            obj["failed"][name] = f"{type(exc).__name__}: {exc}"
            continue
        obj["fields"][name] = {
            "boxes": np.asarray([c.bbox for c in res.cells], np.float64).reshape(-1, 4),
            "border": np.asarray([c.border for c in res.cells], bool),
            "p": np.asarray([c.p_parasitized for c in res.cells], np.float64),
            "shape": rgb.shape[:2],
        }
        print(f"IML {len(obj['fields'])}/{len(ann)} {name}: {len(res.cells)} cells, {time.perf_counter() - t0:.1f} s",
              flush=True)
        if i % 10 == 9:
            _save(path, obj)
    _save(path, obj)
    return obj
