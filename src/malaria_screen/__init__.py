"""malaria-screen: find Plasmodium-parasitized red blood cells in thin blood smear images.

Research use only; not a medical device.

>>> import malaria_screen
>>> model = malaria_screen.load_model()          # bundled default model
>>> p = model.predict(["cell.png"])              # doctest: +SKIP  (p_parasitized per image)
"""

__version__ = "0.1.0"

__all__ = ["load_model", "__version__"]

from malaria_screen.inference import load_model as _load  # a lazy package: loads no back-end


def load_model(path=None, **kwargs):
    """Load a cell model (bundled default if ``path`` is None); see
    :func:`malaria_screen.inference.load_model`."""
    return _load(path, **kwargs)
