"""benchmarks/records.py: the JSON record every quoted figure comes from."""

from __future__ import annotations

import importlib.util
import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest

# Loaded by path: putting benchmarks/ on sys.path would let its scripts shadow other modules.
_spec = importlib.util.spec_from_file_location("records", Path(__file__).resolve().parents[1] / "benchmarks" / "records.py")
records = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(records)


def test_write_record_stores_provenance_and_clean_figures(tmp_path):
    path = records.write_record("bench_x", {"a.acc": np.float32(0.5), "n": np.int64(3), "nan": math.nan, "s": "txt"},
                                notes="split: test", command=["python", "bench_x.py"], results_dir=tmp_path)
    rec = json.loads(path.read_text())
    assert path == tmp_path / "bench_x.json"
    assert rec["figures"] == {"a.acc": 0.5, "n": 3, "nan": None, "s": "txt"}
    assert rec["command"] == ["python", "bench_x.py"] and rec["notes"] == "split: test"
    assert rec["machine"]["cores"] >= 1 and rec["machine"]["cpu"] and rec["machine"]["cpu_probe_ms"] > 0
    assert rec["versions"]["python"] and rec["date"] and rec["commit"]
    assert rec["bundled_model_sha256"] is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_bundled_model_hash_is_the_weights_sha256(tmp_path):
    rec = json.loads(records.write_record("b", {"x": 1}, uses_bundled_model=True, results_dir=tmp_path).read_text())
    assert rec["bundled_model_sha256"] == records.bundled_model_sha256()
    assert len(rec["bundled_model_sha256"]) == 64


@pytest.mark.parametrize("name", ["", "a b", "a:b", "../x"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="record name"):
        records.write_record(name, {"x": 1}, results_dir=tmp_path)


def test_non_scalar_figures_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must be a number"):
        records.write_record("x", {"x": [1, 2]}, results_dir=tmp_path)
    assert not list(tmp_path.iterdir())
