"""Fixtures for the whole-smear tests: data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def data_root() -> Path:
    env = os.environ.get("MALARIA_SCREEN_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def iml_dir() -> Path:
    d = data_root() / "iml_malaria_dev"
    if not (d / "annotations.json").is_file():
        pytest.skip(f"IML data not found at {d} (set MALARIA_SCREEN_DATA)")
    return d


@pytest.fixture(scope="session")
def chula_dir() -> Path:
    d = data_root() / "chula_rbc"
    if not (d / "images").is_dir():
        pytest.skip(f"Chula data not found at {d} (set MALARIA_SCREEN_DATA)")
    return d
