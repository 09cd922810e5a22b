"""Synthetic Parasitized cells: NIH parasites cut as excess optical density and pasted into Chula cells."""

import numpy as np
import pytest

from malaria_screen.data.extra_negatives import point_cell_set
from malaria_screen.data.io import decode_image
from malaria_screen.data.preprocess import letterbox
from malaria_screen.data.synthetic import optical_density, parasite_patch, paste_parasite, synthetic_positives


def _cells(folder, every=50, n=40):
    files = sorted(folder.iterdir())[::every][:n]
    return np.stack([letterbox(decode_image(f), 64) for f in files])


@pytest.fixture(scope="module")
def nih(nih_dir):
    return _cells(nih_dir / "Parasitized"), _cells(nih_dir / "Uninfected")


@pytest.fixture(scope="module")
def chula(chula_dir):
    return point_cell_set(chula_dir, size_px=64, class_names=["Parasitized", "Uninfected"], fields=["1", "2"]).images


def test_a_parasite_is_found_in_parasitized_cells_and_not_in_uninfected_ones(nih):
    par, unf = nih
    found_par = sum(parasite_patch(c) is not None for c in par)
    found_unf = sum(parasite_patch(c) is not None for c in unf)
    assert found_par >= 0.7 * len(par), found_par  # the rest: NIH label noise, or parasites too faint
    assert found_unf <= 0.05 * len(unf), found_unf
    p = next(parasite_patch(c) for c in par if parasite_patch(c) is not None)
    assert p.dtype == np.float32 and p.ndim == 3 and p.shape[2] == 3 and (p >= 0).all() and p.sum(-1).max() > 0.6


def test_pasting_adds_optical_density_inside_the_host_cell_only(nih, chula):
    par, _ = nih
    patches = [p for p in (parasite_patch(c) for c in par) if p is not None]
    rng = np.random.default_rng(0)
    for host, patch in zip(chula[:30], patches):
        out = paste_parasite(host, patch, rng)
        if out is None:
            continue
        changed = out != host
        assert changed.any() and (out <= host).all()  # absorbance only adds: never lighter
        assert (host.max(-1)[changed.any(-1)] > 10).all()  # never on the black padding
        ys, xs = np.nonzero(changed.any(-1))
        assert np.ptp(ys) < max(patch.shape[:2]) and np.ptp(xs) < max(patch.shape[:2])
        gain = (optical_density(out) - optical_density(host)).sum(-1).max()
        assert gain > 0.3


def test_synthetic_positives_are_reproducible_and_refuse_bad_input(nih, chula):
    par, unf = nih
    a, ia = synthetic_positives(chula, par, fraction=0.5, seed=3)
    b, ib = synthetic_positives(chula, par, fraction=0.5, seed=3)
    c, ic = synthetic_positives(chula, par, fraction=0.5, seed=4)
    assert np.array_equal(a, b) and np.array_equal(ia, ib) and not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape[1:] == chula.shape[1:] and len(a) == len(ia)
    assert 0.8 * round(0.5 * len(chula)) <= len(a) <= round(0.5 * len(chula)) and len(set(ia.tolist())) == len(ia)
    with pytest.raises(ValueError, match="fraction"):
        synthetic_positives(chula, par, fraction=0.0, seed=0)
    with pytest.raises(ValueError, match="shows a parasite"):
        synthetic_positives(chula, unf[:5] * 0, fraction=0.5, seed=0)
    with pytest.raises(ValueError, match=r"\(N, S, S, 3\)"):
        synthetic_positives(chula, par[:, :32], fraction=0.5, seed=0)
