"""A site model: the cell model adapted to one lab's microscope and stain by ``malaria-screen adapt``.

A site folder wraps a copy of the cell model it was adapted from (``model/``) with what was
fitted on the site's labelled cells (:class:`SiteConfig` in ``site.json``):

- always a **calibration** of the model's posterior: ``p_site = sigmoid(a * logit(p) + b)``
  (Platt 1999; logistic regression of the labels on the model's logit), with a count-matched
  decision threshold, used by every command that sees crops only (``predict``, ``evaluate``,
  ``/v1/classify``, the web app's cell tab);
- optionally a **second stage** over the cells' field-relative colour/shape features
  (``rescorer/``, :class:`~malaria_screen.smear.rescore.CellRescorer`: logistic regression for a
  few hundred labels, gradient-boosted trees for thousands) used by the whole-field commands
  (``smear``, ``/v1/field``, the web app's whole-field tab), which have the field;
- ``quantify.json`` (the calibrated threshold and the labelled cells' prevalence, for the
  parasitemia estimators) and ``domain.safetensors`` (the self-check's reference, from the
  site's own cells when the labels came with fields), and ``labels.csv``: the labels it was fitted on.

:class:`SitePredictor` loads such a folder and behaves as the wrapped model does (same
``predict`` / ``predict_files`` / ``predict_with_features``), with the site's probabilities and
threshold. Fitting is :mod:`malaria_screen.smear.adapt`; this module only applies (numpy only
besides the wrapped model's back-end, so the torch-free runtime loads site folders too).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from malaria_screen.fileio import atomic_write_json
from malaria_screen.inference.base import CellClassifierBase, seen_patients

__all__ = ["SITE_FILE", "SiteConfig", "SitePredictor", "is_site_dir", "platt"]

#: The site's configuration file; its presence makes a folder a site folder.
SITE_FILE = "site.json"
#: Sub-folder holding the copy of the cell model the site was adapted from.
MODEL_DIR = "model"
#: Sub-folder holding the optional second stage.
RESCORER_DIR = "rescorer"


@dataclass(frozen=True)
class SiteConfig:
    """What ``site.json`` holds (written by :func:`malaria_screen.smear.adapt.adapt`).

    Attributes
    ----------
    method : str
        ``"calibration"`` (posterior calibration only), ``"linear"`` or ``"trees"`` (calibration
        plus a second stage of that kind in ``rescorer/``).
    calibration_a, calibration_b : float
        Platt scaling of the model's logit: ``p = sigmoid(a * logit(p_model) + b)``.
    threshold : float
        Decision threshold on the calibrated probability (count-matched on the labelled cells:
        as many called Parasitized as labelled Parasitized).
    labelled_prevalence : float
        Fraction of the labelled cells that are Parasitized (the prior the calibrated
        probabilities refer to; cells chosen by active learning over-represent infected cells).
    n_parasitized, n_uninfected, n_not_a_cell : int
        Labels used (``not a cell`` counts as not Parasitized in every fit).
    n_fields : int
        Distinct fields the labelled cells came from (0 for crop files).
    n_rows_skipped : int
        Label rows left out (a box no segmented cell matches), see ``adapt_report.json``.
    base_model : str
        The cell model adapted (``"default"`` or the path given), and ``base_model_sha256`` its
        weights' hash.
    labels_source : str
        Where the labels came from (a CSV or an annotations file, as given) and
        ``labels_sha256`` the hash of that file.
    created : str
        UTC ISO time of the fit.
    version : str
        malaria-screen version that wrote it.
    """

    method: str
    calibration_a: float
    calibration_b: float
    threshold: float
    labelled_prevalence: float
    n_parasitized: int
    n_uninfected: int
    n_not_a_cell: int = 0
    n_fields: int = 0
    n_rows_skipped: int = 0
    base_model: str = "default"
    base_model_sha256: str = ""
    labels_source: str = ""
    labels_sha256: str = ""
    created: str = ""
    version: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in ("calibration", "linear", "trees"):
            raise ValueError(f"unknown site method {self.method!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not (np.isfinite(self.calibration_a) and np.isfinite(self.calibration_b)):
            raise ValueError("calibration coefficients must be finite")

    def to_json(self, path: str | Path) -> None:
        """Write atomically as indented JSON."""
        atomic_write_json(path, dataclasses.asdict(self))

    @classmethod
    def from_json(cls, path: str | Path) -> "SiteConfig":
        """Read ``site.json``.

        Raises
        ------
        ValueError
            On unknown keys or invalid values.
        """
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**d)


def is_site_dir(path: str | Path) -> bool:
    """True if ``path`` is a folder with a :data:`SITE_FILE`."""
    return (Path(path) / SITE_FILE).is_file()


def platt(p: np.ndarray, a: float, b: float) -> np.ndarray:
    """Platt-scaled probabilities ``sigmoid(a * logit(p) + b)``, same shape, float64.

    ``p`` is clipped to ``[1e-6, 1 - 1e-6]`` before the logit (Platt 1999, "Probabilistic outputs
    for support vector machines").
    """
    q = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    z = a * np.log(q / (1 - q)) + b
    return 1.0 / (1.0 + np.exp(-z))


class SitePredictor(CellClassifierBase):
    """A cell model with a site's calibration (see module doc); load with :meth:`from_dir`.

    Parameters
    ----------
    base : CellClassifierBase
        The wrapped cell model (a binary Parasitized/Uninfected model).
    site : SiteConfig
    source : str
        The site folder.

    Attributes
    ----------
    rescorer_dir : str or None
        The second stage's folder, for the whole-field commands (None for ``"calibration"``).
    default_parasitemia_method : str
        ``"cc"``: a site's parasitemia is its calls at the site threshold (count-matched on its labels).
    backend : str
        The wrapped model's back-end (``"torch"`` or ``"onnx"``).
    seen_patients : dict
        The wrapped model's training and validation patients (``split.json``), so that commands
        that score only held-out patients still know them.
    """

    default_parasitemia_method = "cc"

    def __init__(self, base: CellClassifierBase, site: SiteConfig, *, source: str) -> None:
        if base.positive_index is None or len(base.class_names) != 2:
            raise ValueError(f"a site model needs a binary model, got classes {base.class_names}")
        config = dataclasses.replace(base.config, threshold=float(site.threshold))
        super().__init__(config, metrics=dict(site.extra.get("metrics", {})), batch_size=base.batch_size, source=source)
        self.base = base
        self.site = site
        self.backend = getattr(base, "backend", "torch")  # what loads the folder again (serve's field workers)
        self.seen_patients = {k: sorted(v) for k, v in seen_patients(base).items()}  # the wrapped model's split
        r = Path(source) / RESCORER_DIR
        self.rescorer_dir = str(r) if site.method != "calibration" and r.is_dir() else None
        if getattr(base, "predict_with_features", None) is None:
            self.predict_with_features = None  # the self-check then skips, as with the wrapped model

    @classmethod
    def from_dir(cls, site_dir: str | Path, *, backend: str = "auto", **kwargs: Any) -> "SitePredictor":
        """Load a site folder; its ``model/`` loads with ``backend`` and ``kwargs``
        (:func:`malaria_screen.inference.load_model`).

        Raises
        ------
        FileNotFoundError
            If ``site.json`` or ``model/`` is missing.
        ValueError
            If ``site.json`` is invalid, or the model is not binary.
        """
        from malaria_screen.inference import load_model  # the package imports this module inside load_model

        p = Path(site_dir)
        if not is_site_dir(p):
            raise FileNotFoundError(f"{p} is not a site folder ({SITE_FILE} is missing)")
        if not (p / MODEL_DIR).is_dir():
            raise FileNotFoundError(f"{p} is a site folder without its {MODEL_DIR}/ (the adapted cell model)")
        site = SiteConfig.from_json(p / SITE_FILE)
        return cls(load_model(p / MODEL_DIR, backend=backend, **kwargs), site, source=str(p))

    def calibrate(self, p: np.ndarray) -> np.ndarray:
        """The site's probability of Parasitized from the wrapped model's, same shape (:func:`platt`)."""
        return platt(p, self.site.calibration_a, self.site.calibration_b)

    def prepare(self, image):
        """The wrapped model's :meth:`~CellClassifierBase.prepare`."""
        return self.base.prepare(image)

    def prepare_file(self, image):
        """The wrapped model's :meth:`~CellClassifierBase.prepare_file`."""
        return self.base.prepare_file(image)

    def predict_proba_prepared(self, cells: np.ndarray) -> np.ndarray:
        """``(N, 2) float32`` class probabilities of letterboxed cells, calibrated to the site."""
        probs = np.asarray(self.base.predict_proba_prepared(cells), np.float64)
        pos = self.positive_index
        out = np.empty_like(probs)
        out[:, pos] = self.calibrate(probs[:, pos])
        out[:, 1 - pos] = 1.0 - out[:, pos]
        return out.astype(np.float32)

    def predict_with_features(self, images) -> tuple[np.ndarray, np.ndarray]:
        """The site's p_parasitized ``(N,)`` and the wrapped model's features ``(N, D)``.

        Raises
        ------
        AttributeError
            If the wrapped model gives no features (ONNX and ensemble back-ends).
        """
        p, f = self.base.predict_with_features(images)
        return self.calibrate(p).astype(np.float32), f
