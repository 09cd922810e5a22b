import pytest
import torch

from malaria_screen.models import build_model, count_flops, count_parameters, default_input_size, list_models

CORE = ["basic_cnn", "bn_cnn", "cellnet", "resnet9"]


def test_registry_has_core_models_and_rejects_unknown():
    assert set(CORE) <= set(list_models())
    with pytest.raises(ValueError, match="cellnet"):
        build_model("no_such_net")


@pytest.mark.parametrize("name", CORE)
def test_forward_shape_finite_and_head_split(name):
    torch.manual_seed(0)
    s = default_input_size(name)
    m = build_model(name, num_classes=2, input_size=s).eval()
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        y = m(x)
        assert y.shape == (2, 2) and torch.isfinite(y).all()
        torch.testing.assert_close(m.forward_head(m.forward_features(x)), y)
    m3 = build_model(name, num_classes=5, input_size=s).eval()
    with torch.no_grad():
        assert m3(x).shape == (2, 5)


@pytest.mark.parametrize(
    "name, params",
    [
        ("bn_cnn", 310_412),  # seed 004's Keras summary: 310,412 trainable (+320 BN running stats)
        ("basic_cnn", 9_794_626),
        ("resnet9", 6_569_026),
    ],
)
def test_parameter_counts_match_the_seeds(name, params):
    m = build_model(name, input_size=default_input_size(name))
    assert count_parameters(m) == params


def test_default_model_meets_its_budget():
    m = build_model("cellnet")
    assert count_parameters(m) <= 100_000
    assert count_flops(m, 64) <= 20_000_000  # FLOPs (2 per multiply-add) per 64x64 cell
