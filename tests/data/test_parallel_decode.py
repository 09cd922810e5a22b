"""Preparing cell files in worker processes gives what one process gives, in order, errors included."""

import numpy as np
import pytest
from PIL import Image

import malaria_screen
from malaria_screen.data.parallel import (
    WORKER_MAX_PIXELS,
    iter_classified_cells,
    iter_prepared_cells,
    prepare_cell,
    prepare_cell_files,
)


@pytest.fixture(scope="module")
def mixed_files(tmp_path_factory, nih_dir, samples_dir):
    """600 real NIH cells (every 34th), the bundled PNGs, and the failures a batch meets: missing,
    not an image, too small, grayscale, and one file over the worker's pixel cap."""
    d = tmp_path_factory.mktemp("mixed")
    cells = [str(p) for p in sorted(nih_dir.glob("*/*"))[::34]][:600] + [str(p) for p in sorted(samples_dir.glob("*/*.png"))]
    rgb = np.asarray(Image.open(cells[-1]).convert("RGB"))
    (d / "junk.png").write_bytes(b"not an image at all")
    Image.fromarray(rgb[:3, :3]).save(d / "dot.png")
    Image.fromarray(rgb).convert("L").save(d / "grey.png")
    side = int(np.sqrt(WORKER_MAX_PIXELS)) + 10
    big = np.ascontiguousarray(np.tile(rgb, (side // rgb.shape[0] + 1, side // rgb.shape[1] + 1, 1))[:side, :side])
    Image.fromarray(big).save(d / "big.png", compress_level=1)
    odd = [str(d / "junk.png"), str(d / "missing.png"), str(d / "dot.png"), str(d / "grey.png"), str(d / "big.png")]
    files = cells[:300] + odd + cells[300:]
    return files


def _local(size):
    def run(p):
        try:
            return prepare_cell(p, size), None
        except Exception as exc:  # noqa: BLE001
            return None, str(exc)
    return run


def test_workers_give_the_same_cells_and_errors_in_order(mixed_files):
    ref = [_local(64)(p) for p in mixed_files]
    got = list(iter_prepared_cells(mixed_files, 64, workers=2, chunk=16, local=lambda p: prepare_cell(p, 64)))
    assert len(got) == len(ref)
    for p, (c, e), (rc, re) in zip(mixed_files, got, ref):
        assert e == re, p
        if rc is None:
            assert c is None, p
        else:
            np.testing.assert_array_equal(c, rc, err_msg=p)
    errors = {p.rsplit("/", 1)[-1]: e for p, (_, e) in zip(mixed_files, got) if e}
    assert set(errors) == {"junk.png", "missing.png", "dot.png", "grey.png"}


def test_a_worker_defers_files_over_its_pixel_cap(mixed_files):
    big = [p for p in mixed_files if p.endswith("big.png")]
    cells, errors, deferred = prepare_cell_files(big + mixed_files[:3], 64)
    assert deferred == [0] and errors == [None] * 4 and cells.shape == (3, 64, 64, 3)


def test_predict_files_in_processes_equals_threads(mixed_files):
    model = malaria_screen.load_model()
    threads = list(model.predict_files(mixed_files, workers=2, processes=False))
    procs = list(model.predict_files(mixed_files, workers=2, processes=True))
    assert [r.path for r in procs] == mixed_files
    assert [(r.label, r.error) for r in procs] == [(r.label, r.error) for r in threads]
    np.testing.assert_allclose([r.p_parasitized or 0.0 for r in procs], [r.p_parasitized or 0.0 for r in threads], atol=1e-6)
    assert sum(r.error is not None for r in procs) == 4


@pytest.fixture(scope="module")
def int8_model(default_model_dir):
    from malaria_screen.inference.onnx_predictor import OnnxPredictor

    return OnnxPredictor.from_file(default_model_dir / "model.int8.onnx")


def test_workers_that_classify_give_the_probabilities_of_this_process(mixed_files, int8_model):
    """The bundled int8 model run by the workers (one thread each) and here: the same bits, the
    same errors, in order; the file over the workers' pixel cap is classified here."""
    ref = []
    for p in mixed_files:
        try:
            ref.append((int8_model.predict_proba_prepared(prepare_cell(p, 64)[None])[0], None))
        except Exception as exc:  # noqa: BLE001
            ref.append((None, str(exc)))
    got = list(iter_classified_cells(mixed_files, 64, workers=2, chunk=64, classifier=int8_model.worker_classifier(),
                                     local=lambda p: int8_model.predict_proba_prepared(prepare_cell(p, 64)[None])[0]))
    assert [e for _, e in got] == [e for _, e in ref]
    for p, (g, _), (r, _) in zip(mixed_files, got, ref):
        if r is None:
            assert g is None, p
        else:
            np.testing.assert_array_equal(g, r, err_msg=p)
    assert got[mixed_files.index(next(p for p in mixed_files if p.endswith("big.png")))][0] is not None


def test_an_inference_failure_in_a_worker_fails_its_cells_not_the_run(mixed_files, int8_model):
    """Cells prepared at a size the model does not take: every cell a worker prepared gets the
    model's error, the files that failed before keep their own, and the run ends normally."""
    got = list(iter_classified_cells(mixed_files, 48, workers=2, chunk=64, classifier=int8_model.worker_classifier(),
                                     local=lambda p: int8_model.predict_proba_prepared(prepare_cell(p, 64)[None])[0]))
    names = [p.rsplit("/", 1)[-1] for p in mixed_files]
    assert len(got) == len(mixed_files)
    assert [n for n, (g, _) in zip(names, got) if g is not None] == ["big.png"]  # deferred: classified here
    errors = {n: e for n, (_, e) in zip(names, got) if e}
    assert sum(e.startswith("inference failed: ") and "64" in e for e in errors.values()) == len(mixed_files) - 5
    assert not any(errors[k].startswith("inference failed") for k in ("junk.png", "missing.png", "dot.png", "grey.png"))


def test_onnx_predict_files_classifies_in_the_workers_with_the_answers_of_threads(mixed_files, int8_model):
    assert int8_model.worker_classifier().num_threads == 1
    threads = list(int8_model.predict_files(mixed_files, workers=2, processes=False))
    procs = list(int8_model.predict_files(mixed_files, workers=2, processes=True))
    assert [r.path for r in procs] == mixed_files
    assert [(r.label, r.p_parasitized, r.error) for r in procs] == [(r.label, r.p_parasitized, r.error) for r in threads]


class _DiesInWorker:
    """A classifier whose worker process dies on its first batch (as a crash in native code or the
    OOM killer would end it)."""

    class_names = ("Parasitized", "Uninfected")

    def predict_proba_prepared(self, cells):
        import os

        os._exit(3)


def test_if_a_worker_dies_this_process_classifies_the_rest_with_the_same_answers(mixed_files, int8_model):
    def here(p):
        return int8_model.predict_proba_prepared(prepare_cell(p, 64)[None])[0]

    files = mixed_files[:200] + mixed_files[300:305]
    got = list(iter_classified_cells(files, 64, workers=2, chunk=32, classifier=_DiesInWorker(), local=here))
    assert len(got) == len(files)
    for p, (g, e) in zip(files, got):
        try:
            ref = here(p)
        except Exception as exc:  # noqa: BLE001
            assert g is None and e == str(exc), p
            continue
        assert e is None, p
        np.testing.assert_array_equal(g, ref, err_msg=p)


class _DiesOnThirdBatch:
    """A classifier whose worker process dies on its third batch, after two good ones."""

    class_names = ("Parasitized", "Uninfected")

    def predict_proba_prepared(self, cells):
        import os

        n = int(os.environ.get("MALARIA_SCREEN_TEST_BATCHES", "0")) + 1
        os.environ["MALARIA_SCREEN_TEST_BATCHES"] = str(n)  # this worker process's own count
        if n == 3:
            os._exit(3)
        return np.tile(np.float32([0.25, 0.75]), (len(cells), 1))


def test_a_worker_death_noticed_when_queueing_more_work_loses_nothing(mixed_files):
    """The pool can break between two results: the next task's submission then fails, not a
    result. The run still gives every file's row, in order: the workers' rows before the death,
    this process's after it."""
    import time

    files = mixed_files[:100]
    rows = []
    for i, (g, e) in enumerate(iter_classified_cells(files, 64, workers=1, chunk=10, classifier=_DiesOnThirdBatch(),
                                                        local=lambda p: np.float32([1.0, 0.0]))):
        rows.append((g, e))
        if i == 0:
            time.sleep(2.0)  # the worker finishes its second chunk and dies on its third meanwhile
    assert len(rows) == len(files) and all(e is None for _, e in rows)
    from_workers = [k for k, (g, _) in enumerate(rows) if g[0] == np.float32(0.25)]
    assert from_workers == list(range(20))  # the two good chunks; the rest was classified here
