"""optical_density's one-pass lookup (OpenCV) gives the numpy per-channel lookup's values on every real field."""

import numpy as np

from malaria_screen.data.io import decode_image
from malaria_screen.smear.density import optical_density


def _numpy_od(rgb: np.ndarray, bg_percentile: float = 97.0) -> np.ndarray:
    """The implementation before the OpenCV lookup: three numpy fancy-indexing passes."""
    h, w = rgb.shape[:2]
    step = max(1, int(max(h, w) // 400))
    sub = rgb[::step, ::step].reshape(-1, 3).astype(np.float32)
    grey = sub.mean(axis=1)
    bright = sub[grey >= np.percentile(grey, bg_percentile)]
    bg = np.maximum(np.median(bright, axis=0) if len(bright) else sub.max(axis=0), 1.0)
    od = np.empty(rgb.shape, np.float32)
    levels = np.arange(256, dtype=np.float32)
    for c in range(3):
        od[..., c] = np.clip(-np.log((levels + 1.0) / (bg[c] + 1.0)), 0.0, None).astype(np.float32)[rgb[..., c]]
    return od


def test_optical_density_equals_the_numpy_lookup_on_every_field(data_dir):
    files = sorted((data_dir / "iml_malaria_dev" / "images").iterdir()) + sorted((data_dir / "chula_rbc" / "images").iterdir())
    assert len(files) >= 174
    for f in files:
        rgb = decode_image(f)
        got = optical_density(rgb)
        assert got.dtype == np.float32 and got.shape == rgb.shape
        np.testing.assert_array_equal(got, _numpy_od(rgb), err_msg=str(f))
    view = decode_image(files[0])[::2, ::3]  # a non-contiguous view too
    np.testing.assert_array_equal(optical_density(view), _numpy_od(np.ascontiguousarray(view)))
