"""screen_field with an injected fake model; crops; parasitemia and its binomial interval."""

from __future__ import annotations

import numpy as np
import pytest

from smear_synth import FakeModel, WBC_NUCLEUS, disc, synthetic_field
from malaria_screen.smear.parasitemia import binomial_ci
from malaria_screen.smear.screen import screen_field


def _field_with_parasite():
    img, c = synthetic_field()
    x, y = c["isolated"][0]
    disc(img, x + 5, y - 3, 3, WBC_NUCLEUS)  # ring-stage chromatin dot, far below WBC size
    return img, c


def test_screen_field_counts_and_labels():
    img, c = _field_with_parasite()
    model = FakeModel()
    res = screen_field(img, model, image_name="synthetic.png")
    assert res.n_rbc == 6
    assert res.n_infected == 1
    assert res.parasitemia == pytest.approx(1 / 6)
    lo, hi = res.parasitemia_ci95
    assert lo < 1 / 6 < hi
    infected = [cell for cell in res.cells if cell.label == "Parasitized"]
    assert len(infected) == 1
    x, y, w, h = infected[0].bbox
    px, py = c["isolated"][0]
    assert x <= px <= x + w and y <= py <= y + h
    assert res.n_wbc == 1
    # one batch of six crops
    assert len(model.calls) == 1 and len(model.calls[0]) == 6


def test_crops_black_outside_cell_square_and_centred():
    img, _ = synthetic_field()
    model = FakeModel()
    screen_field(img, model)
    for crop in model.calls[0]:
        assert crop.dtype == np.uint8 and crop.ndim == 3 and crop.shape[0] == crop.shape[1]
        fg = crop.max(axis=2) > 0
        # corners are outside the (round) cell: black
        assert not fg[0, 0] and not fg[-1, -1] and not fg[0, -1] and not fg[-1, 0]
        # no background-glass colour survives inside the crop (mask applied)
        glass = (crop[..., 1] > 235) & (crop[..., 0] > 215)
        assert glass.sum() <= 0.02 * fg.sum()
    # non-border crops: the cell is centred
    centred = [cr for cr in model.calls[0] if cr.shape[0] < 45]
    for crop in centred:
        ys, xs = np.nonzero(crop.max(axis=2) > 0)
        s = crop.shape[0]
        assert abs(xs.mean() - (s - 1) / 2) < 3 and abs(ys.mean() - (s - 1) / 2) < 3


def test_threshold_respected():
    img, _ = _field_with_parasite()
    model = FakeModel()
    model.threshold = 0.95
    res = screen_field(img, model)
    assert res.n_infected == 0 and res.parasitemia == 0.0


def test_border_cells_excluded_from_counts_when_asked():
    img, _ = synthetic_field()
    res = screen_field(img, FakeModel(), count_border_cells=False)
    assert res.n_rbc == 5
    assert len(res.cells) == 6 and sum(c.border for c in res.cells) == 1


def test_no_model_segmentation_only():
    img, _ = synthetic_field()
    res = screen_field(img, None)
    assert res.n_rbc == 6 and res.parasitemia is None and not res.classified
    assert all(c.p_parasitized is None and c.label is None for c in res.cells)


def test_model_with_wrong_output_length_raises():
    class Bad:
        threshold = 0.5

        def predict(self, images):
            return np.zeros(len(images) + 1)

    img, _ = synthetic_field()
    with pytest.raises(ValueError, match="probabilities"):
        screen_field(img, Bad())


@pytest.mark.parametrize("stain", ["reinhard", "macenko"])
def test_stain_options_run(stain):
    img, _ = _field_with_parasite()
    model = FakeModel()
    res = screen_field(img, model, stain=stain, scale_to_nih=True)
    assert res.n_rbc == 6
    # scale normalisation: a 40-px cell crop becomes ~130 px
    sizes = [c.shape[0] for c in model.calls[0]]
    assert 110 <= np.median(sizes) <= 150


def test_unknown_stain_raises():
    img, _ = synthetic_field()
    with pytest.raises(ValueError, match="stain"):
        screen_field(img, FakeModel(), stain="bogus")


def test_binomial_ci_known_values():
    lo, hi = binomial_ci(0, 100)
    assert lo == 0.0 and hi == pytest.approx(0.0370, abs=5e-4)  # Wilson
    lo, hi = binomial_ci(0, 100, method="exact")
    assert hi == pytest.approx(0.0362, abs=5e-4)  # Clopper-Pearson, 1-(0.025)^(1/100)
    lo, hi = binomial_ci(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert binomial_ci(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        binomial_ci(5, 3)


def test_box_scale_matches_annotators_box_convention():
    """IML-style boxes with a margin: tight detections match once scaled by the convention."""
    from malaria_screen.smear.labels import GroundTruthBox
    from malaria_screen.smear.scoring import evaluate_iml_field

    gt = [GroundTruthBox((100.0, 100.0, 90.0, 90.0), "red blood cell"), GroundTruthBox((300.0, 100.0, 90.0, 90.0), "ring")]
    tight = np.array([[115.0, 115.0, 60.0, 60.0], [315.0, 115.0, 60.0, 60.0]])  # IoU (60/90)^2 = 0.44
    strict = evaluate_iml_field("f", tight, np.array([False, True]), gt)
    assert (strict.tp, strict.fp, strict.fn, strict.inf_tp) == (0, 2, 2, 0)
    conv = evaluate_iml_field("f", tight, np.array([False, True]), gt, box_scale=1.5)
    assert (conv.tp, conv.fp, conv.fn, conv.inf_tp) == (2, 0, 0, 1)
    assert strict.extra["size_ratio"] == [] and np.allclose(conv.extra["size_ratio"], [1.5, 1.5])
    with pytest.raises(ValueError):
        evaluate_iml_field("f", tight, None, gt, box_scale=0)


def test_perfect_classifier_floor_counts_matched_infected_boxes():
    """The detection floor: a ring cell that was detected counts, a missed gametocyte does not,
    whatever the classifier said."""
    from malaria_screen.smear.labels import GroundTruthBox
    from malaria_screen.smear.scoring import evaluate_iml_field, summarize_iml

    gt = [GroundTruthBox((0.0, 0.0, 50.0, 50.0), "red blood cell"), GroundTruthBox((100.0, 0.0, 50.0, 50.0), "ring"),
          GroundTruthBox((200.0, 0.0, 50.0, 50.0), "gametocyte"), GroundTruthBox((300.0, 0.0, 50.0, 50.0), "red blood cell")]
    pred = np.array([[0.0, 0.0, 50.0, 50.0], [100.0, 0.0, 50.0, 50.0], [300.0, 0.0, 50.0, 50.0]])  # gametocyte missed
    m = evaluate_iml_field("f", pred, np.array([False, False, False]), gt)
    assert (m.inf_gt, m.inf_matched, m.inf_tp) == (2, 1, 0)
    s = summarize_iml([m])
    assert s["infected_matched"] == 1
    # perfect classifier: 1 of 3 detections vs 2 of 4 annotated cells
    assert s["parasitemia_mae_pp_perfect_classifier"] == pytest.approx(abs(1 / 3 - 2 / 4) * 100)
    assert s["parasitemia_mae_pp"] == pytest.approx(50.0)  # what the all-Uninfected classifier got
    assert s["infected_sensitivity_perfect_classifier"] == pytest.approx(1 / 2)
    assert np.isnan(s["parasitemia_r_perfect_classifier"])  # one field: no correlation


def test_perfect_classifier_r_over_fields():
    """The ceiling's r correlates the detected share of infected cells with the annotated share, per field."""
    from malaria_screen.smear.labels import GroundTruthBox
    from malaria_screen.smear.scoring import evaluate_iml_field, summarize_iml

    def field(name, infected, missed):
        gt = [GroundTruthBox((100.0 * i, 0.0, 50.0, 50.0), "ring" if i < infected else "red blood cell") for i in range(4)]
        pred = np.array([[100.0 * i, 0.0, 50.0, 50.0] for i in range(4) if i not in missed])
        return evaluate_iml_field(name, pred, np.zeros(len(pred), bool), gt)

    s = summarize_iml([field("a", 0, ()), field("b", 1, ()), field("c", 2, (1,)), field("d", 3, ())])
    ideal = np.array([0 / 4, 1 / 4, 1 / 3, 3 / 4])  # detected infected over detections; field c missed one
    truth = np.array([0, 1, 2, 3]) / 4
    assert s["infected_sensitivity_perfect_classifier"] == pytest.approx(5 / 6)
    assert s["parasitemia_r_perfect_classifier"] == pytest.approx(np.corrcoef(ideal, truth)[0, 1])
    assert s["parasitemia_mae_pp_perfect_classifier"] == pytest.approx(np.abs(ideal - truth).mean() * 100)


@pytest.mark.parametrize("stain", ["reinhard", "macenko"])
def test_stain_normalisation_does_not_follow_the_lamp(chula_dir, stain):
    """The same real field under a dimmer lamp (every pixel x 0.7) comes out of either stain
    normalisation with about the same cell colours: both map towards the NIH crops, whatever the
    light (Macenko used to rebuild the colours under the field's own, dimmer light)."""
    from malaria_screen.data.io import decode_image
    from malaria_screen.smear.segment import segment_field
    from malaria_screen.smear.stain import normalize_stain

    rgb = decode_image(chula_dir / "images" / "1.jpg")
    mask = segment_field(rgb).labels > 0
    dim = np.clip(rgb.astype(np.float64) * 0.7, 0, 255).astype(np.uint8)
    bright_cells = normalize_stain(rgb, stain, mask=mask)[mask].mean(axis=0)
    dim_cells = normalize_stain(dim, stain, mask=mask)[mask].mean(axis=0)
    assert np.abs(bright_cells - dim_cells).max() < 12, (bright_cells, dim_cells)
