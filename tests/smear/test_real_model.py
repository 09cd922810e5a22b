"""The bundled cell model screening real annotated fields: infected-cell sensitivity and PPV, RBC
F1 and the parasitemia error on a fixed subset of the IML development fields.

These bounds document the current behaviour; they are not evaluation results (see
docs/evaluation-protocol.md: the segmentation was designed on all 120 dev fields). The bundled
model is trained on NIH crops only: on IML fields (another site, microscope and stain) it finds
most infected cells but calls many healthy ones Parasitized, so its PPV is very low and its
parasitemia error far above the trivial baseline (a constant parasitemia per field). Issue 19's
work (a stain-robust default model, quantification under label shift) is to raise PPV and cut the
error: tighten these bounds then. To re-measure, run this test with ``-s``: it prints the figures.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

# Every 12th of the 120 dev fields sorted by name (one or two per contiguous block of 24):
# 10 fields, 1,216 RBC boxes, 19 infected.
FIELDS = ["PA171691.JPG", "PA171730.JPG", "PA171759.JPG", "PA171801.JPG", "PA171839.JPG",
          "PA171868.JPG", "PA171901.JPG", "PA171930.JPG", "PA171966.JPG", "PA172003.JPG"]

# Measured with the bundled model of 2026-12-01 (NIH-only cellnet), strict IoU 0.5, cells called
# Parasitized by smear's default estimator (posteriors corrected to a 2 % prior, issue 19 item 1):
#   infected sensitivity 7/19 = 0.368, PPV 7/12 = 0.583, RBC F1 0.908 (1,323 detections),
#   parasitemia MAE 1.26 pp (max 1.77), detection floor (perfect classifier of the detections) 0.24 pp.
#   (At the model's own threshold, --parasitemia-method cc: sensitivity 0.842, PPV 0.057, MAE 21.0 pp.)
# Bounds: sensitivity and PPV lose about 2 infected calls, F1 0.03; the error may not grow by more
# than a fifth. The segmentation is deterministic; the margins allow other changes to it and to decoding.
SENSITIVITY_FLOOR = 0.25   # 0.368 measured (5 of 19 would still pass, 4 would not)
PPV_FLOOR = 0.40           # 0.583 measured
RBC_F1_FLOOR = 0.88        # 0.908 measured
PARASITEMIA_MAE_CEILING_PP = 1.6  # 1.26 measured; a constant parasitemia per field still does better


def test_bundled_model_on_real_fields(iml_dir):
    from malaria_screen.inference import load_model
    from malaria_screen.smear.evaluate import evaluate_dataset
    from malaria_screen.smear.labels import load_iml_annotations

    ann = load_iml_annotations(iml_dir / "annotations.json")
    assert set(FIELDS) <= set(ann)
    m = evaluate_dataset(iml_dir / "images", ann, load_model(), names=FIELDS)
    print({k: m[k] for k in ("n_gt_rbc", "n_pred_rbc", "rbc_f1", "n_gt_infected", "n_pred_infected", "infected_sensitivity",
                             "infected_ppv", "parasitemia_mae_pp", "parasitemia_max_abs_err_pp",
                             "parasitemia_mae_pp_perfect_classifier")})
    assert m["n_fields"] == 10 and m["n_failed"] == 0
    assert m["n_gt_rbc"] == 1216 and m["n_gt_infected"] == 19
    assert m["infected_sensitivity"] >= SENSITIVITY_FLOOR
    assert m["infected_ppv"] >= PPV_FLOOR
    assert m["rbc_f1"] >= RBC_F1_FLOOR
    assert m["parasitemia_mae_pp"] <= PARASITEMIA_MAE_CEILING_PP
    # the detection alone would allow far better: a perfect classifier of the detections
    assert m["parasitemia_mae_pp_perfect_classifier"] <= 0.5
