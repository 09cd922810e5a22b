"""``predict --ray`` and ``evaluate --ray`` on a local Ray runtime write what a local run writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture(scope="module")
def ray_runtime(missing):
    """A private Ray runtime with 2 CPUs, started by the test and shut down after the module."""
    try:
        import ray
    except ImportError:
        missing("ray is not installed (pip install 'malaria-screen[ray]'; the dev extra has it)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _run(*args):
    from malaria_screen.cli import app

    return runner.invoke(app, [str(a) for a in args])


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_ray_map_keeps_order_and_sets_up_once_per_worker(ray_runtime):
    import sys

    from malaria_screen.data.ray_map import ray_map

    ray_runtime.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

    out = list(ray_map(_tag, [[i, i + 1] for i in range(0, 40, 2)], setup=_setup, setup_args=("m",), workers=2))
    assert [x for chunk, _ in out for x in chunk] == list(range(40))
    assert len({pid for _, pid in out}) <= 2  # two actors, each set up once


def _setup(name):
    import os

    return (name, os.getpid())


def _tag(state, chunk):
    assert state[0] == "m"
    return chunk, state[1]


def test_predict_with_ray_writes_the_local_rows(ray_runtime, nih_dir, samples_dir, tmp_path):
    files = [str(p) for p in sorted(nih_dir.glob("*/*"))[::300]] + [str(p) for p in sorted(samples_dir.glob("*/*.png"))]
    (tmp_path / "junk.png").write_bytes(b"not an image")
    files.insert(5, str(tmp_path / "junk.png"))
    files.append(files[0])  # a repeat: one row, in both runs
    local, dist = tmp_path / "local.csv", tmp_path / "ray.csv"
    r1 = _run("predict", *files, "--out", local, "--quiet")
    r2 = _run("predict", *files, "--out", dist, "--quiet", "--ray", "local")
    assert r1.exit_code == r2.exit_code == 1, (r1.output, r2.output)  # one file failed in both
    a, b = _rows(local), _rows(dist)
    assert len(a) == len(files) - 1 and [r["path"] for r in a] == [r["path"] for r in b]
    assert [(r["label"], r["error"]) for r in a] == [(r["label"], r["error"]) for r in b]
    assert all(abs(float(x["p_parasitized"] or 0) - float(y["p_parasitized"] or 0)) <= 2e-6 for x, y in zip(a, b))
    sa, sb = (json.loads((tmp_path / f"{n}.summary.json").read_text()) for n in ("local", "ray"))
    assert sa["counts"] == sb["counts"] and sa["n"] == sb["n"]


def test_evaluate_with_ray_writes_the_local_metrics(ray_runtime, nih_dir, make_subset, tmp_path):
    from malaria_screen.data.patients import parse_nih_patient_id
    from malaria_screen.inference.base import default_model_dir

    test = json.loads((default_model_dir() / "split.json").read_text())["splits"]["test"]["files"]
    infected = sorted({parse_nih_patient_id(Path(f).name) for f in test if f.startswith("Parasitized/")})
    data = make_subset(nih_dir, tmp_path / "data", infected[:2])  # test patients: evaluate keeps them
    r1 = _run("evaluate", data, "--out", tmp_path / "local", "--n-boot", 200, "--no-progress")
    r2 = _run("evaluate", data, "--out", tmp_path / "ray", "--n-boot", 200, "--no-progress", "--ray", "local")
    assert r1.exit_code == r2.exit_code == 0, (r1.output, r2.output)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("local", "ray"))
    assert _rounded(ma) == _rounded(mb)  # torch on 1 thread (worker) vs all cores: equal to float noise
    pa, pb = _rows(tmp_path / "local" / "predictions.csv"), _rows(tmp_path / "ray" / "predictions.csv")
    assert len(pa) == ma["n_cells"] > 100
    assert [{k: v for k, v in r.items() if k != "p_parasitized"} for r in pa] == \
        [{k: v for k, v in r.items() if k != "p_parasitized"} for r in pb]
    assert all(abs(float(x["p_parasitized"]) - float(y["p_parasitized"])) <= 1e-5 for x, y in zip(pa, pb))


def _rounded(x):
    """Floats rounded to 5 decimals, recursively."""
    if isinstance(x, float):
        return round(x, 5)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x
