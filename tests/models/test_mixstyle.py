"""MixStyle (Zhou et al. 2021) on the bundled sample cells: a style swap that keeps the content."""

import numpy as np
import pytest
import torch

from malaria_screen.data.io import decode_image
from malaria_screen.data.preprocess import letterbox
from malaria_screen.models import build_model
from malaria_screen.models.mixstyle import attach_mixstyle


def _batch(samples_dir) -> torch.Tensor:
    files = sorted(samples_dir.glob("*/*.png"))
    x = np.stack([letterbox(decode_image(f), 64) for f in files]).astype(np.float32)
    return (torch.from_numpy(x).permute(0, 3, 1, 2) - 128.0) / 64.0


def _stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t.mean(dim=(2, 3)), (t.var(dim=(2, 3)) + 1e-6).sqrt()


def test_mixstyle_swaps_statistics_keeps_content_and_is_off_in_eval(samples_dir):
    """While training (p=1), each cell's feature map after the stem keeps its normalised content
    and gets mean and standard deviation that are one convex mix (the same λ for both) of its own
    and one other cell's; in eval mode the network's output is bit-identical to the plain one."""
    torch.manual_seed(0)
    net = build_model("cellnet")
    x = _batch(samples_dir)
    net.eval()
    plain_logits = net(x)
    seen = {}
    net.features[0].register_forward_hook(lambda m, i, out: seen.__setitem__("raw", out.detach().clone()))
    handles = attach_mixstyle(net, ("features.0", "features.2"), p=1.0)
    net.features[0].register_forward_hook(lambda m, i, out: seen.__setitem__("mixed", out.detach().clone()))
    assert torch.equal(net(x), plain_logits)

    net.train()
    torch.manual_seed(1)
    net(x)
    raw, mixed = seen["raw"], seen["mixed"]
    assert not torch.allclose(raw, mixed)
    mu, sig = _stats(raw)
    mu_m, sig_m = _stats(mixed)
    norm = (raw - mu[..., None, None]) / sig[..., None, None]
    norm_m = (mixed - mu_m[..., None, None]) / sig_m[..., None, None]
    assert torch.allclose(norm, norm_m, atol=2e-3)
    for i in range(len(x)):
        fits = []
        for j in range(len(x)):
            d = torch.cat([mu[i] - mu[j], sig[i] - sig[j]])
            target = torch.cat([mu_m[i] - mu[j], sig_m[i] - sig[j]])
            lam = float((d @ target) / (d @ d)) if float(d @ d) > 0 else 1.0
            fits.append((float((lam * d - target).abs().max()), lam))
        err, lam = min(fits)
        assert err < 1e-3 and -1e-3 <= lam <= 1 + 1e-3, (i, err, lam)

    torch.manual_seed(1)
    net(x)
    assert torch.equal(seen["mixed"], mixed)  # seeded: the same draws
    for h in handles:
        h.remove()
    torch.manual_seed(1)
    net(x)
    assert torch.equal(seen["mixed"], seen["raw"])  # detached: the plain layer again


def test_mixstyle_rejects_unknown_layers_and_bad_probabilities():
    net = build_model("cellnet")
    with pytest.raises(ValueError, match="not sub-modules of CellNet"):
        attach_mixstyle(net, ("stem.0",), p=0.5)
    with pytest.raises(ValueError, match="not sub-modules"):
        attach_mixstyle(net, (), p=0.5)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
        attach_mixstyle(net, ("features.0",), p=0.0)


def test_train_refuses_unknown_mixstyle_layers_before_it_reads_cells_or_makes_the_folder(tmp_path):
    from malaria_screen.config import TrainConfig
    from malaria_screen.training.run import train

    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"\['stem'\] are not sub-modules of CellNet"):
        train(tmp_path / "no_such_data", out, TrainConfig(mixstyle=0.5, mixstyle_layers=("stem",)))
    assert not out.exists()
