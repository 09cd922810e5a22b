"""Input robustness of the inference entry points: special files, size limit, array shapes."""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import malaria_screen
from malaria_screen.data.dataset import list_image_files
from malaria_screen.data.io import ImageDecodeError, decode_image
from malaria_screen.inference.base import decode_fast

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")


@pytest.fixture(scope="module")
def model():
    return malaria_screen.load_model()


@pytest.fixture
def samples(samples_dir):
    return sorted((samples_dir / "Parasitized").glob("*.png"))[:2] + sorted((samples_dir / "Uninfected").glob("*.png"))[:2]


# -- special files -----------------------------------------------------------------------------


@needs_fifo
def test_decode_fast_refuses_named_pipe_without_opening_it(tmp_path, call_releasing_fifo):
    fifo = tmp_path / "cell.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageDecodeError, match="not a regular file: a named pipe"):
        call_releasing_fifo(lambda: decode_fast(fifo), fifo)


@needs_fifo
def test_predict_files_on_a_folder_with_a_pipe_goes_on(tmp_path, samples, model, call_releasing_fifo):
    for f in samples[:2]:
        (tmp_path / f.name).symlink_to(f)
    fifo = tmp_path / "zz_pipe.png"
    os.mkfifo(fifo)
    files = list_image_files([tmp_path])
    assert [f.name for f in files] == sorted([samples[0].name, samples[1].name, "zz_pipe.png"])
    res = call_releasing_fifo(lambda: list(model.predict_files(files, workers=2)), fifo)
    assert [r.error is None for r in res] == [True, True, False]
    assert "not a regular file" in res[2].error and res[2].label is None
    assert all(r.label in model.class_names for r in res[:2])


def test_predict_files_reports_missing_and_broken_paths_and_goes_on(tmp_path, samples, model):
    broken = tmp_path / "broken.png"
    broken.symlink_to(tmp_path / "deleted.png")
    missing = tmp_path / "typo.png"
    files = list_image_files([samples[0], missing, broken, samples[2]])  # as the CLI lists its arguments
    assert files == [samples[0], missing, broken, samples[2]]
    res = list(model.predict_files(files, workers=2))
    assert [Path(r.path) for r in res] == files
    assert "no such file" in res[1].error and "broken symbolic link" in res[2].error
    assert res[0].error is None and res[3].error is None
    np.testing.assert_allclose([res[0].p_parasitized, res[3].p_parasitized], model.predict([samples[0], samples[2]]), atol=1e-6)


def test_predict_files_refuses_images_too_small_to_be_a_cell(tmp_path, samples, model):
    """A 1x1 or 3x500 px file gets a per-file error, not a call on a few enlarged pixels; 8 px passes."""
    cell = np.asarray(Image.open(samples[0]).convert("RGB"))
    Image.fromarray(cell[:1, :1]).save(tmp_path / "dot.png")
    Image.fromarray(np.repeat(cell[:3, :1], 500, axis=1)).save(tmp_path / "line.png")
    h, w = cell.shape[0] // 2, cell.shape[1] // 2
    Image.fromarray(cell[h - 4:h + 4, w - 4:w + 4]).save(tmp_path / "eight.png")  # from the cell, not its black corner
    files = [samples[0], tmp_path / "dot.png", tmp_path / "line.png", tmp_path / "eight.png", samples[2]]
    res = list(model.predict_files(files, workers=2))
    assert [r.error is None for r in res] == [True, False, False, True, True]
    assert "too small to be a cell crop: 1x1 px" in res[1].error and res[1].label is None
    assert "500x3 px" in res[2].error
    np.testing.assert_allclose([res[0].p_parasitized, res[4].p_parasitized], model.predict([samples[0], samples[2]]), atol=1e-6)


def test_predict_files_refuses_grayscale_cell_files(tmp_path, samples, model):
    """A grayscale copy of a cell file gets a per-file error (the stain's colour is the signal), the
    colour files around it are classified as before."""
    Image.open(samples[0]).convert("L").save(tmp_path / "gray.png")
    files = [samples[0], tmp_path / "gray.png", samples[2]]
    res = list(model.predict_files(files, workers=2))
    assert [r.error is None for r in res] == [True, False, True]
    assert "no colour (grayscale)" in res[1].error and res[1].label is None
    np.testing.assert_allclose([res[0].p_parasitized, res[2].p_parasitized], model.predict([samples[0], samples[2]]), atol=1e-6)


# -- one size limit on the OpenCV and Pillow paths ---------------------------------------------


@pytest.mark.slow
def test_fast_and_pillow_paths_share_the_size_limit_in_every_thread(limit_pngs):
    under, over = limit_pngs
    expected = "image too large: 10001x10000 px = 100,010,000 px > limit 100,000,000 px"

    def outcome(decode, path):
        try:
            return decode(path).shape
        except ImageDecodeError as exc:
            return str(exc)

    jobs = [(decode_fast, over), (decode_image, over)] * 8 + [(decode_fast, under), (decode_image, under)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda job: outcome(*job), jobs))
    assert got[-2:] == [(9_500, 10_000, 3)] * 2
    assert set(got[:-2]) == {expected}


# -- Python API: what counts as one image --------------------------------------------------------


def test_predict_2d_grayscale_array_is_one_image(samples, model):
    gray = np.asarray(Image.open(samples[0]).convert("L"))
    p = model.predict(gray)
    assert p.shape == (1,)
    np.testing.assert_allclose(p, model.predict([np.dstack([gray] * 3)]), atol=1e-6)
    assert model.predict_proba(gray).shape == (1, len(model.class_names))
    batch = np.stack([np.asarray(Image.open(f).convert("RGB").resize((64, 64))) for f in samples])
    assert model.predict(batch).shape == (len(samples),)  # (N, H, W, 3): N images


def test_predict_float_arrays_must_be_scaled(samples, model):
    rgb = np.asarray(Image.open(samples[0]).convert("RGB"))
    np.testing.assert_allclose(model.predict(rgb.astype(np.float32) / 255), model.predict(rgb), atol=1e-6)
    with pytest.raises(ValueError, match="divide a 0..255 image by 255"):
        model.predict(rgb.astype(np.float32))


def test_predict_bad_inputs_raise_clear_errors(samples, model):
    with pytest.raises(TypeError, match="images is None"):
        model.predict(None)
    with pytest.raises(TypeError, match="got int"):
        model.predict(3)
    mixed = [samples[0], samples[1].read_bytes(), b"not an image at all", np.asarray(Image.open(samples[2]))]
    with pytest.raises(ImageDecodeError, match=r"^image 2: not a recognised image format"):
        model.predict(mixed)
    with pytest.raises(TypeError, match=r"^image 1: cannot decode a NoneType"):
        model.predict([samples[0], None])
    with pytest.raises(ImageDecodeError, match=r"shape \(5,\)"):
        model.predict(np.zeros(5, np.uint8))


# -- decoding memory does not grow with threads --------------------------------------------------


def test_pixel_budget_admits_one_large_image_at_a_time():
    import threading
    import time

    from malaria_screen.data.io import PixelBudget

    budget, order = PixelBudget(max_pixels=100), []

    def job(name, w, h, hold_s):
        with budget.session() as on_size:
            on_size(w, h)
            on_size(w, h)  # a fallback decoder reporting the same size again holds it once
            order.append((name, "in", budget.held))
            time.sleep(hold_s)
        order.append((name, "out"))

    a = threading.Thread(target=job, args=("a", 10, 6, 0.3))
    a.start()
    time.sleep(0.05)
    b = threading.Thread(target=job, args=("b", 10, 6, 0.0))  # 60 + 60 > 100: waits for a
    c = threading.Thread(target=job, args=("c", 20, 20, 0.0))  # 400 > 100 alone: admitted when nothing is held
    b.start(), b.join(), c.start(), c.join(), a.join()
    assert order[0] == ("a", "in", 60) and order[1] == ("a", "out")
    assert ("b", "in", 60) in order and ("c", "in", 400) in order
    assert budget.held == 0 and budget.peak == 400


def test_predict_files_decodes_large_files_one_at_a_time(tmp_path, samples, model):
    from malaria_screen.data.io import PixelBudget

    cell = np.asarray(Image.open(samples[0]).convert("RGB"))
    big = np.ascontiguousarray(np.tile(cell, (1500 // cell.shape[0] + 1, 1500 // cell.shape[1] + 1, 1))[:1500, :1500])
    files = []
    for i in range(4):
        files.append(tmp_path / f"big{i}.png")
        Image.fromarray(big).save(files[-1])
    files.insert(2, samples[1])
    model._pixel_budget = PixelBudget(max_pixels=3_000_000)  # room for one 2.25 Mpx file and cells
    try:
        res = list(model.predict_files(files, workers=4, chunk=2))
        assert all(r.error is None for r in res)
        assert 2_250_000 <= model._pixel_budget.peak <= 3_000_000 and model._pixel_budget.held == 0
        np.testing.assert_allclose([r.p_parasitized for r in res], model.predict(files), atol=1e-6)
    finally:
        model._pixel_budget = PixelBudget()
