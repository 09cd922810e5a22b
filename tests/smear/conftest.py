"""Fixtures for the whole-smear tests: data location, a field folder with a field too small to segment."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest


def data_root() -> Path:
    env = os.environ.get("MALARIA_SCREEN_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def iml_dir(missing) -> Path:
    d = data_root() / "iml_malaria_dev"
    if not (d / "annotations.json").is_file():
        missing(f"IML data not found at {d} (set MALARIA_SCREEN_DATA)")
    return d


@pytest.fixture(scope="session")
def chula_dir(missing) -> Path:
    d = data_root() / "chula_rbc"
    if not (d / "images").is_dir():
        missing(f"Chula data not found at {d} (set MALARIA_SCREEN_DATA)")
    return d


@pytest.fixture
def iml_with_tiny_field(tmp_path, iml_dir) -> tuple[Path, Path]:
    """``(field folder, annotations.json)``: two real IML fields and a readable 1x1 PNG (too small
    to segment), all three annotated."""
    from PIL import Image

    names = ["PA171926.JPG", "PA171966.JPG"]  # annotated parasitemia 0.9 % and 0 %
    d = tmp_path / "fields"
    d.mkdir()
    for n in names:
        shutil.copy(iml_dir / "images" / n, d / n)
    Image.new("RGB", (1, 1), (200, 150, 160)).save(d / "tiny.png")
    ann = [a for a in json.loads((iml_dir / "annotations.json").read_text()) if a["image_name"] in names]
    ann.append({"image_name": "tiny.png", "objects": [{"type": "red blood cell", "bbox": {"x": 0, "y": 0, "w": 1, "h": 1}}]})
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return d, tmp_path / "ann.json"
