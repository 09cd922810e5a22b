"""Self-check: "not a blood smear field" and the domain score (malaria_screen.smear.domain)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from malaria_screen.data.io import decode_image
from malaria_screen.smear.domain import (
    DOMAIN_FILE,
    UNCHECKED,
    DomainReference,
    NotASmearError,
    check_smear,
    domain_check,
    fit_reference,
    load_reference,
    model_features,
    require_smear,
)

ASSETS = Path(__file__).resolve().parents[2] / "src" / "malaria_screen" / "assets"
DEMO_FIELD = ASSETS / "demo_field" / "chula_rbc_1.jpg"


def _photos() -> dict[str, np.ndarray]:
    import skimage.data as sd

    return {"astronaut": sd.astronaut(), "chelsea": sd.chelsea(), "coffee": sd.coffee()}


def _text_image() -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (800, 600), (255, 255, 255))
    dr = ImageDraw.Draw(im)
    for i in range(20):
        dr.text((10, 10 + 28 * i), "Giemsa thin smear, field 12, slide 7. " * 3, fill=(0, 0, 0))
    return np.asarray(im)


def _non_smears() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    import skimage.data as sd

    return {
        "noise": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        "noise_large": rng.integers(0, 256, (3000, 3000, 3), dtype=np.uint8),
        "blank": np.full((480, 640, 3), 200, np.uint8),
        "single_colour": np.full((480, 640, 3), (180, 40, 120), np.uint8),
        "text": _text_image(),
        "text_skimage": np.repeat(sd.text()[..., None], 3, axis=2),
        **_photos(),
    }


@pytest.mark.parametrize("name", list(_non_smears()))
def test_non_smears_are_refused_with_a_reason(name):
    img = _non_smears()[name]
    chk = check_smear(img)
    assert not chk.ok
    assert chk.reason.startswith("not a blood smear field: ")
    with pytest.raises(NotASmearError, match="not a blood smear field"):
        require_smear(img)


def test_reasons_name_the_kind_of_input():
    imgs = _non_smears()
    assert "blank or single-colour" in check_smear(imgs["blank"]).reason
    assert "blank or single-colour" in check_smear(imgs["single_colour"]).reason
    assert "noise" in check_smear(imgs["noise"]).reason
    assert "noise" in check_smear(imgs["noise_large"]).reason  # downsampled it is flat grey; the native patch is not
    for name in ("astronaut", "chelsea", "coffee"):
        assert "not Giemsa-coloured" in check_smear(imgs[name]).reason


def test_bundled_demo_field_is_a_smear():
    rgb = decode_image(str(DEMO_FIELD))
    chk = check_smear(rgb)
    assert chk.ok, chk
    assert require_smear(rgb) is rgb
    assert chk.stats["green_share"] > 0.8


def test_real_fields_of_two_microscopes_pass(data_dir):
    chula = sorted((data_dir / "chula_rbc" / "images").iterdir())
    iml = sorted((data_dir / "iml_malaria_dev" / "images").iterdir())
    for p in chula[::6] + iml[::12]:  # 9 + 10 fields
        chk = check_smear(decode_image(str(p)))
        assert chk.ok, (p.name, chk)


def test_check_smear_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        check_smear(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        check_smear(np.zeros((10, 10, 3), np.float32))


def test_reference_round_trip_and_score(tmp_path):
    means = np.array([[0.0, 0.0], [4.0, 0.0]])
    ref = DomainReference(class_means=means, precision=np.diag([1.0, 0.25]), threshold=3.0, threshold_rule="test",
                          calibration={"n": 1})
    d = ref.cell_distances(np.array([[0.0, 0.0], [4.0, 2.0], [2.0, 0.0], [-3.0, 0.0]]))
    np.testing.assert_allclose(d, [0.0, 1.0, 2.0, 3.0])  # nearest class mean; y scaled by 1/2
    assert ref.score(np.array([[0.0, 0.0], [4.0, 2.0], [2.0, 0.0]])) == pytest.approx(1.0)  # median
    assert ref.score(np.zeros((0, 2))) is None
    with pytest.raises(ValueError, match="dimensions"):
        ref.cell_distances(np.zeros((3, 5)))
    p = ref.save(tmp_path / DOMAIN_FILE)
    back = DomainReference.load(p)
    np.testing.assert_allclose(back.class_means, means)
    assert back.threshold == 3.0 and back.calibration == {"n": 1} and back.threshold_rule == "test"
    assert load_reference(tmp_path).threshold == 3.0
    assert load_reference(tmp_path / "missing") is None
    (tmp_path / DOMAIN_FILE).write_bytes(b"not safetensors")
    assert load_reference(tmp_path) is None  # unreadable: no self-check, logged
    with pytest.raises(ValueError, match="threshold"):
        DomainReference(class_means=means, precision=np.eye(2), threshold=float("nan"))
    with pytest.raises(ValueError, match="do not match"):
        DomainReference(class_means=means, precision=np.eye(3), threshold=1.0)


def test_domain_check():
    ref = DomainReference(class_means=np.zeros((1, 3)), precision=np.eye(3), threshold=2.0)
    near = domain_check(np.full((5, 3), 0.5), ref)
    far = domain_check(np.full((5, 3), 3.0), ref)
    assert near.in_domain is True and near.score == pytest.approx(np.sqrt(0.75)) and near.n_cells == 5
    assert far.in_domain is False
    assert far.to_json() == {"in_domain": False, "domain_score": round(3 * np.sqrt(3), 3), "domain_threshold": 2.0}
    assert domain_check(np.zeros((0, 3)), ref).in_domain is None
    assert domain_check(None, ref) is UNCHECKED and domain_check(np.zeros((2, 3)), None) is UNCHECKED


def _bundled():
    from malaria_screen.inference import default_model_dir, load_model

    d = default_model_dir()
    ref = load_reference(d)
    assert ref is not None, f"{d / DOMAIN_FILE} missing: run `malaria-screen domain-fit --data ../shared/data`"
    return d, ref, load_model(d, backend="torch")


def test_bundled_reference_matches_the_bundled_model():
    import hashlib

    d, ref, model = _bundled()
    sha = hashlib.sha256((d / "weights.safetensors").read_bytes()).hexdigest()
    assert ref.calibration["model_weights_sha256"] == sha, "stale reference: re-run malaria-screen domain-fit"
    assert ref.calibration["nih_heldout_fields"]["in_domain"] >= 0.98  # the p99 rule (interpolated)
    assert ref.calibration["chula_fields"]["in_domain"] == 1.0


def test_predict_with_features_is_predict_plus_features(samples_dir):
    _, ref, model = _bundled()
    files = sorted((samples_dir / "Parasitized").iterdir()) + sorted((samples_dir / "Uninfected").iterdir())
    imgs = [decode_image(str(p)) for p in files]
    p, f = model.predict_with_features(imgs)
    np.testing.assert_allclose(p, model.predict(imgs), atol=1e-6)
    assert f.shape == (len(imgs), ref.dim) and f.dtype == np.float32
    out = model_features(model, imgs, batch_size=5)
    np.testing.assert_allclose(out[0], p, atol=1e-6)
    np.testing.assert_allclose(out[1], f, atol=1e-5)
    # the bundled NIH samples are cells of the training domain: all within the field threshold
    assert np.median(ref.cell_distances(f)) <= ref.threshold


@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx"])
def test_bundled_onnx_models_run_the_self_check_with_their_own_reference(name):
    """smear --model model.int8.onnx checks the domain too (it used to skip it silently): the ONNX
    graphs return features; int8, whose features are its quantised network's, has its own reference
    fitted on them (domain-fit --onnx), fp32 shares the folder's."""
    import hashlib

    from malaria_screen.inference import default_model_dir
    from malaria_screen.inference.onnx_predictor import OnnxPredictor
    from malaria_screen.smear.crops import cell_crops
    from malaria_screen.smear.domain import reference_path_for
    from malaria_screen.smear.segment import segment_field

    d = default_model_dir()
    model = OnnxPredictor.from_file(d / name)
    ref = load_reference(model)
    own = reference_path_for(d / name)
    assert (ref.threshold == DomainReference.load(own).threshold) if own.is_file() else (ref.threshold == load_reference(d).threshold)
    assert name != "model.int8.onnx" or own.is_file(), "run malaria-screen domain-fit --onnx .../model.int8.onnx"
    sha = hashlib.sha256((d / "weights.safetensors").read_bytes()).hexdigest()
    assert ref.calibration["model_weights_sha256"] == sha
    rgb = decode_image(str(DEMO_FIELD))
    seg = segment_field(rgb)
    crops = cell_crops(rgb, seg.labels, seg.cells())
    assert domain_check(model_features(model, crops)[1], ref).in_domain is True
    photo = _photos()["chelsea"]
    tiles = [photo[y : y + 64, x : x + 64] for y in range(0, 256, 64) for x in range(0, 256, 64)]
    assert domain_check(model_features(model, tiles)[1], ref).in_domain is False


def test_an_int8_file_without_its_own_reference_has_no_self_check_rather_than_the_fp32_one(tmp_path, caplog):
    import shutil

    from malaria_screen.inference import default_model_dir
    from malaria_screen.inference.onnx_predictor import OnnxPredictor

    d = default_model_dir()
    for name in ("model.int8.onnx", "model.onnx", DOMAIN_FILE):
        shutil.copy(d / name, tmp_path / name)
    assert load_reference(OnnxPredictor.from_file(tmp_path / "model.onnx")) is not None  # fp32: the folder's
    assert load_reference(OnnxPredictor.from_file(tmp_path / "model.int8.onnx")) is None
    assert "domain-fit" in caplog.text and "--onnx" in caplog.text


def test_demo_field_is_in_domain_and_a_photo_out_of_it():
    from malaria_screen.smear.crops import cell_crops
    from malaria_screen.smear.segment import segment_field

    _, ref, model = _bundled()
    rgb = decode_image(str(DEMO_FIELD))
    seg = segment_field(rgb)
    crops = cell_crops(rgb, seg.labels, seg.cells())
    chk = domain_check(model_features(model, crops)[1], ref)
    assert chk.in_domain is True  # a Chula field: the threshold was set so that they pass
    # tiles of a photo as "cells" lie far outside the training cells
    photo = _photos()["chelsea"]
    tiles = [photo[y : y + 64, x : x + 64] for y in range(0, 256, 64) for x in range(0, 256, 64)]
    assert domain_check(model_features(model, tiles)[1], ref).in_domain is False


def test_fit_reference_on_a_small_split(tmp_path, nih_dir, data_dir):
    import shutil

    from malaria_screen.data.patients import parse_nih_patient_id
    from malaria_screen.inference import default_model_dir

    names = sorted(p.name for p in (nih_dir / "Uninfected").iterdir())
    patients = sorted({parse_nih_patient_id(n) for n in names})
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(default_model_dir() / "weights.safetensors", model / "weights.safetensors")
    split = {"splits": {"train": {"patients": patients[:6]}, "val": {"patients": patients[6:9]}, "test": {"patients": []}}}
    (model / "split.json").write_text(json.dumps(split))
    data = tmp_path / "data"
    for sub in ("images", "labels"):
        (data / "chula_rbc" / sub).mkdir(parents=True)
    (data / "nih_cell_images").symlink_to(nih_dir)
    stems = ["2", "3", "4"]
    for stem in stems:
        (data / "chula_rbc" / "images" / f"{stem}.jpg").symlink_to(data_dir / "chula_rbc" / "images" / f"{stem}.jpg")
        (data / "chula_rbc" / "labels" / f"{stem}.txt").symlink_to(data_dir / "chula_rbc" / "labels" / f"{stem}.txt")
    # as if trained on Chula field 2 as extra negatives: its cells join the reference, fields 3 and 4 set the threshold
    cfg = json.loads((default_model_dir() / "config.json").read_text())
    cfg |= {"extra_negatives": str(data / "chula_rbc"), "extra_negative_fields": ["2"]}
    (model / "config.json").write_text(json.dumps(cfg))
    ref = fit_reference(model, data)
    cal = ref.calibration
    assert cal["chula_fields"]["n_fields"] == 2 and cal["chula_fields"]["in_domain"] == 1.0
    assert cal["chula_fields"]["left_out_trained_fields"] == 1
    assert cal["classes"][-1] == "Uninfected (Chula-RBC-12 training fields)"  # its own component
    assert ref.class_means.shape == (len(cal["classes"]), ref.dim)
    assert cal["train_cells"]["n_cells"] >= 50 and cal["nih_heldout_fields"]["n_fields"] >= 1
    assert ref.threshold == pytest.approx(max(cal["chula_fields"]["max"], cal["nih_heldout_fields"]["q99"]), abs=1e-3)
    assert len(cal["model_weights_sha256"]) == 64
    path = ref.save(model / DOMAIN_FILE)
    assert path.stat().st_size < 200_000
    with pytest.raises(FileNotFoundError, match="split.json"):
        fit_reference(tmp_path, data)


def test_smear_leaves_out_of_domain_fields_out_of_the_total(tmp_path, data_dir):
    """A real IML field the bundled model is far off on (bench_domain: outside the domain) is flagged,
    left out of the slide total and named with the advice; --include-out-of-domain counts it; a photo
    is a field error; report.html shows the flag column and the gallery."""
    import shutil

    import skimage.data
    from PIL import Image

    from malaria_screen.smear.report import run_smear

    _, ref, model = _bundled()
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(DEMO_FIELD, src / DEMO_FIELD.name)
    shutil.copy(data_dir / "iml_malaria_dev" / "images" / "PA171931.JPG", src / "PA171931.JPG")
    Image.fromarray(skimage.data.coffee()).save(src / "coffee.png")
    s = run_smear([src], tmp_path / "a", model, domain_reference=ref)
    by = {f["image"]: f for f in s["fields"]}
    assert by["PA171931.JPG"]["in_domain"] is False and by[DEMO_FIELD.name]["in_domain"] is True
    assert s["out_of_domain"] == ["PA171931.JPG"] and s["n_fields_counted"] == 1
    assert (s["n_rbc"], s["n_infected"]) == (by[DEMO_FIELD.name]["n_rbc"], by[DEMO_FIELD.name]["n_infected"])
    assert any("PA171931.JPG" in w and "calibrate the site" in w for w in s["warnings"])
    assert [e["image"] for e in s["errors"]] == ["coffee.png"] and "not a blood smear field" in s["errors"][0]["error"]
    field_json = json.loads((tmp_path / "a" / "PA171931.json").read_text())
    assert field_json["in_domain"] is False and "calibrate the site" in field_json["domain_note"]
    page = (tmp_path / "a" / "report.html").read_text()
    assert "no: left out" in page and "Cells to confirm by eye" in page
    s2 = run_smear([src], tmp_path / "b", model, domain_reference=ref, include_out_of_domain=True)
    assert s2["n_fields_counted"] == 2 and s2["n_rbc"] == by[DEMO_FIELD.name]["n_rbc"] + by["PA171931.JPG"]["n_rbc"]
