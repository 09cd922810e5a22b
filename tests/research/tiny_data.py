"""A tiny real NIH subset for the research tests (8 patients, 815 cells); import the fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

# Six infected patients (41-49 Parasitized and ~70 Uninfected cells each) and two controls.
TINY_PATIENTS = ["P107", "P138", "P35", "P39", "P85", "P119", "C1_thinF", "C201ThinF"]


@pytest.fixture(scope="module")
def tiny_nih(nih_dir: Path, tmp_path_factory, make_subset) -> Path:
    return make_subset(nih_dir, tmp_path_factory.mktemp("tiny_nih") / "data", TINY_PATIENTS)
