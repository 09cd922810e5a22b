"""Shared fixtures: the real data folder (``$MALARIA_SCREEN_DATA``, default ``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("MALARIA_SCREEN_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not (root / "nih_cell_images").is_dir():
        pytest.skip(f"real data not found at {root} (set MALARIA_SCREEN_DATA)")
    return root


@pytest.fixture(scope="session")
def nih_dir(data_dir: Path) -> Path:
    return data_dir / "nih_cell_images"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return REPO / "src" / "malaria_screen" / "assets" / "samples"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Cell stores go to a per-session temp folder, never the user's cache."""
    monkeypatch.setenv("MALARIA_SCREEN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _make_subset(nih_dir: Path, dest: Path, patients: list[str]) -> Path:
    from malaria_screen.data.patients import parse_nih_patient_id

    for cls in ("Parasitized", "Uninfected"):
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((nih_dir / cls).iterdir()):
            if parse_nih_patient_id(f.name) in patients:
                (dest / cls / f.name).symlink_to(f)
    return dest


@pytest.fixture(scope="session")
def make_subset():
    """``make_subset(nih_dir, dest, patients)``: symlink the cells of ``patients`` into
    ``dest/<Class>/`` (a real NIH subset); returns ``dest``."""
    return _make_subset
