"""OnnxPredictor has Predictor's interface and answers; load_model dispatches on the path."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")


def test_same_interface_and_results_as_torch(random_run, onnx_fp32, sample_pngs, tmp_path):
    from malaria_screen.inference import OnnxPredictor, Predictor

    pt, ox = Predictor.from_dir(random_run), OnnxPredictor.from_file(onnx_fp32)
    for attr in ("input_size", "threshold", "class_names", "positive_index", "metrics"):
        assert getattr(ox, attr) == getattr(pt, attr), attr
    assert ox.source == str(onnx_fp32) and ox.backend == "onnx" and pt.backend == "torch"
    bad = tmp_path / "broken.png"
    bad.write_bytes(sample_pngs[0].read_bytes()[:200])  # truncated PNG
    files = [sample_pngs[0], bad, tmp_path / "missing.png", *sample_pngs[1:]]
    r_t = list(pt.predict_files(files, chunk=5, workers=2))
    r_o = list(ox.predict_files(files, chunk=5, workers=2))
    assert [r.path for r in r_o] == [str(f) for f in files]
    assert r_o[1].error and ("truncated" in r_o[1].error.lower() or "corrupt" in r_o[1].error.lower())
    assert r_o[2].error and "no such file" in r_o[2].error
    ok = [i for i, r in enumerate(r_t) if r.error is None]
    assert len(ok) == len(sample_pngs)
    assert [r_o[i].label for i in ok] == [r_t[i].label for i in ok]
    np.testing.assert_allclose([r_o[i].p_parasitized for i in ok], [r_t[i].p_parasitized for i in ok], atol=1e-4)
    p1 = ox.predict(sample_pngs[0])
    assert p1.shape == (1,) and abs(p1[0] - r_t[0].p_parasitized) < 1e-4
    assert ox.label_of(np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)) == ["Parasitized", "Uninfected"]
    with pytest.raises(ValueError, match="expected"):
        ox.predict_proba_prepared(np.zeros((2, 32, 32, 3), np.uint8))


def test_load_model_dispatch(random_run, onnx_fp32, tmp_path):
    from malaria_screen.inference import OnnxPredictor, Predictor, load_model

    assert isinstance(load_model(onnx_fp32), OnnxPredictor)
    assert isinstance(load_model(random_run), Predictor)
    with pytest.raises(ValueError, match="ONNX"):
        load_model(onnx_fp32, backend="torch")
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        load_model(random_run, backend="onnx")
    with pytest.raises(ValueError, match="backend"):
        load_model(random_run, backend="tensorflow")
    (tmp_path / "model.onnx").write_bytes(onnx_fp32.read_bytes())
    assert isinstance(load_model(tmp_path, backend="onnx"), OnnxPredictor)


def test_rejects_foreign_onnx(tmp_path):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from malaria_screen.inference import OnnxPredictor

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    p = tmp_path / "foreign.onnx"
    p.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString())
    with pytest.raises(ValueError, match="not exported by"):
        OnnxPredictor.from_file(p)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot load"):
        OnnxPredictor.from_file(tmp_path / "junk.onnx")


def test_fast_decoder_gives_pillow_pixels_and_pillow_errors(nih_dir, sample_pngs, tmp_path):
    from PIL import Image

    from malaria_screen.data.io import ImageDecodeError, decode_image
    from malaria_screen.inference.base import decode_fast

    webps = sorted((nih_dir / "Parasitized").iterdir())[:40] + sorted((nih_dir / "Uninfected").iterdir())[:40]
    rgba = tmp_path / "rgba.png"
    arr = np.asarray(Image.open(sample_pngs[0]).convert("RGBA")).copy()
    arr[::3, ::2, 3] = 77
    Image.fromarray(arr).save(rgba)
    pal = tmp_path / "pal.png"
    Image.open(sample_pngs[1]).convert("P").save(pal, transparency=0)
    for f in [*webps, *sample_pngs, rgba, pal]:
        np.testing.assert_array_equal(decode_fast(f), decode_image(f), err_msg=str(f))
        np.testing.assert_array_equal(decode_fast(f.read_bytes()), decode_image(f), err_msg=str(f))
    cut = tmp_path / "cut.webp"
    cut.write_bytes(webps[0].read_bytes()[:150])
    for bad in (cut, tmp_path / "missing.png"):
        with pytest.raises(ImageDecodeError):
            decode_fast(bad)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_fast(webps[0], max_pixels=100)


def test_overlapped_inference_is_a_one_thread_session_with_the_same_answers(default_model_dir, real_cells, nih_dir):
    """predict_files infers on one thread while workers decode: same probabilities and labels as
    the default session on the bundled int8 model, for real cells and end to end on files."""
    from malaria_screen.inference.onnx_predictor import OnnxPredictor

    pred = OnnxPredictor.from_file(default_model_dir / "model.int8.onnx")
    infer = pred.overlapped_inference()
    assert infer.__self__ is not pred and infer.__self__.num_threads == 1
    assert pred.overlapped_inference().__self__ is infer.__self__  # loaded once
    ref, got = pred.predict_proba_prepared(real_cells), infer(real_cells)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert pred.label_of(got) == pred.label_of(ref)
    one = OnnxPredictor.from_file(default_model_dir / "model.int8.onnx", num_threads=1)
    assert one.overlapped_inference() == one.predict_proba_prepared  # already one thread
    files = sorted(nih_dir.glob("*/*"))[::500]
    rows = list(pred.predict_files(files, workers=2, processes=True))
    assert [r.label for r in rows] == pred.label_of(pred.predict_proba(files))


def test_overlapped_inference_keeps_its_own_session_when_the_file_changed(default_model_dir, tmp_path):
    import os

    from malaria_screen.inference.onnx_predictor import OnnxPredictor

    copy = tmp_path / "m.onnx"
    copy.write_bytes((default_model_dir / "model.int8.onnx").read_bytes())
    pred = OnnxPredictor.from_file(copy)
    os.utime(copy, ns=(1, 1))  # rewritten since it was loaded: maybe another model
    assert pred.overlapped_inference() == pred.predict_proba_prepared


def test_a_pickled_onnx_model_needs_no_file_and_a_worker_copy_runs_one_thread(onnx_fp32, real_cells, tmp_path):
    """What a smear worker or a Ray actor on another machine receives: the model's bytes, not its
    path (which need not exist there); single_threaded() is the same computation on one thread."""
    import pickle
    import shutil

    from malaria_screen.inference import OnnxPredictor

    f = tmp_path / "m.onnx"
    shutil.copy(onnx_fp32, f)
    pred = OnnxPredictor.from_file(f)
    blob = pickle.dumps(pred)
    f.unlink()
    back = pickle.loads(blob)
    assert back.source == str(f) and back.gives_features and back.quantify_params == pred.quantify_params
    np.testing.assert_array_equal(back.predict_proba_prepared(real_cells), pred.predict_proba_prepared(real_cells))
    one = back.single_threaded()
    assert one.num_threads == 1 and one.single_threaded() is one
    np.testing.assert_allclose(one.predict_proba_prepared(real_cells), pred.predict_proba_prepared(real_cells), atol=1e-6)
