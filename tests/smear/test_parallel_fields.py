"""``smear --workers N`` and ``--ray`` write what one worker writes (timings aside)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import malaria_screen
from malaria_screen.smear.report import run_smear


def _untimed(x):
    """JSON without its wall-time keys (``seconds``, ``seconds_total``), recursively."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if not k.startswith("seconds")}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


@pytest.fixture(scope="module")
def slide(tmp_path_factory, data_dir):
    """Four real IML fields, a Chula field, and a file that is not an image: one slide."""
    d = tmp_path_factory.mktemp("slide")
    for f in sorted((data_dir / "iml_malaria_dev" / "images").iterdir())[:4] + sorted((data_dir / "chula_rbc" / "images").iterdir())[:1]:
        (d / f.name).symlink_to(f)
    (d / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    return d


@pytest.fixture(scope="module", params=["onnx", "torch"])
def model(request):
    """The bundled model on ONNX Runtime (what ``smear`` runs by default) and on PyTorch."""
    return malaria_screen.load_model(backend=request.param)


@pytest.fixture(scope="module")
def one_worker(slide, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("w1")
    return out, run_smear([slide], out, model, workers=1)


def _same_outputs(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())  # no spool or temporary file left behind
    for n in names:
        if n.endswith(".json"):
            assert _untimed(json.loads((a / n).read_text())) == _untimed(json.loads((b / n).read_text())), n
        else:  # overlays and report.html, byte for byte
            assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_two_workers_write_what_one_worker_writes(slide, model, one_worker, tmp_path):
    out1, s1 = one_worker
    s2 = run_smear([slide], tmp_path, model, workers=2)
    assert s1["n_fields"] == 5 and s1["n_failed"] == 1 and s1["n_rbc"] > 500
    assert _untimed(s1) == _untimed(s2)
    _same_outputs(out1, tmp_path)


def test_no_overlays_writes_the_same_results_without_pngs(slide, model, one_worker, tmp_path):
    out1, s1 = one_worker
    s = run_smear([slide], tmp_path, model, workers=2, overlays=False)
    assert not list(tmp_path.glob("*.png")) and all(f["overlay"] is None for f in s["fields"])
    strip = lambda d: _untimed({**d, "fields": [{k: v for k, v in f.items() if k != "overlay"} for f in d["fields"]]})  # noqa: E731
    assert strip(s) == strip(s1)
    for j in out1.glob("*.json"):
        if j.name != "summary.json":
            assert _untimed(json.loads(j.read_text())) == _untimed(json.loads((tmp_path / j.name).read_text()))


@pytest.mark.slow  # 10 s in the last full run (2 cores)
def test_ray_writes_what_one_worker_writes(slide, model, one_worker, tmp_path, missing):
    try:
        import ray
    except ImportError:
        missing("ray is not installed (the dev extra has it)")
    out1, s1 = one_worker
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        s = run_smear([slide], tmp_path, model, ray="local")
    finally:
        ray.shutdown()
    assert _untimed(s) == _untimed(s1)
    _same_outputs(out1, tmp_path)


def _warn_job(item, model, rescorer):
    import logging

    logging.getLogger("malaria_screen.smear.segment").warning("field %s: a warning in the worker", item)
    return item * 2


def test_worker_log_records_are_emitted_once_by_the_driver(caplog):
    """A warning logged in a worker process reaches this process's loggers once, in field order;
    a level that silences it here (``smear -q``) silences it for workers too."""
    import logging

    from malaria_screen.smear.parallel import map_fields

    with caplog.at_level(logging.WARNING):
        assert list(map_fields(_warn_job, [1, 2, 3], model=None, workers=2)) == [2, 4, 6]
    assert [r.getMessage() for r in caplog.records] == [f"field {i}: a warning in the worker" for i in (1, 2, 3)]
    caplog.clear()
    log = logging.getLogger("malaria_screen")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with caplog.at_level(logging.WARNING, logger="malaria_screen.smear.parallel"):
            assert list(map_fields(_warn_job, [1, 2], model=None, workers=2)) == [2, 4]
    finally:
        log.setLevel(level)
    assert not [r for r in caplog.records if "worker" in r.getMessage()]


def test_interrupt_with_workers_leaves_only_the_finished_fields(slide, model, tmp_path):
    """Ctrl-C after the first field (raised in the progress callback) while two workers are busy:
    the workers are stopped, and only the field in the summary has outputs (no parts, no spool)."""
    seen = []

    def progress(name, entry):
        seen.append(name)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_smear([slide], tmp_path, model, workers=2, progress=progress)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["interrupted"] and len(s["fields"]) + len(s["errors"]) == 1
    stem = Path(s["fields"][0]["json"]).stem
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{stem}.json", f"{stem}_overlay.png", "report.html",
                                                                 "summary.json"])
