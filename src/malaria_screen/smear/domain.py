"""Self-check of a field: is it a blood smear at all, and do its cells look like the model's training cells?

Two checks, both cheap next to segmentation and the classifier:

1. :func:`check_smear` (before segmentation, on a copy downsampled to at most
   :data:`GATE_SIDE` px and one native-resolution patch): a blank or single-colour image, pixel
   noise, or an image whose stained pixels are not Giemsa-coloured (natural photos, text) is
   "not a blood smear field" and gets no parasitemia. The rule: in a Giemsa thin smear the
   green channel is the most absorbed one in stained pixels (red cells are pink, parasites and
   nuclei purple); in photos of people, animals, food or landscapes, and in black text, it is
   not. Its thresholds (:data:`GATE_LIMITS`) were set on the 54 Chula-RBC-12 fields and the
   bundled demo field with wide margins, and checked on the 120 IML dev fields (all pass) and on
   scikit-image's photos (all fail); ``docs/self-check.md`` has the figures.
2. :func:`domain_check` (after classification, from the same forward pass): the **domain score**
   of a field is the median, over its red cells, of each cell's distance to the model's NIH
   training cells in the model's own feature space (the input of its last linear layer): the
   class-conditional Mahalanobis distance of Lee et al. 2018 (NeurIPS, "A simple unified
   framework for detecting out-of-distribution samples"): per class a mean, one shared
   Ledoit-Wolf covariance (scikit-learn), the distance to the nearest class mean. A field whose
   score exceeds the reference's threshold is outside the domain (``in_domain: false``): the
   model never saw cells like its cells, and its parasitemia is not to be trusted. The threshold
   is set by :func:`fit_reference` on NIH held-out (validation + test) patients' fields and the
   54 Chula fields (a different microscope, no malaria): the larger of the 99th percentile of the
   NIH held-out scores and the largest Chula score, so every Chula field passes and defines the
   boundary. It is then only *checked* on the IML dev fields (``benchmarks/bench_domain.py``).
   A colour-statistics score (Mahalanobis distance of the fields' median cell optical density)
   was tried first and dropped: on the IML dev fields the fields it flagged had the *smaller*
   parasitemia errors (``docs/self-check.md``).

The reference is a small safetensors file, :data:`DOMAIN_FILE` (class means, precision matrix;
threshold and calibration in its JSON metadata; never pickle), beside the model's
``config.json``. ``malaria-screen domain-fit --model DIR --data ../shared/data`` regenerates it
from the model's ``split.json`` and weights (so it always matches the shipped weights; the
weights' SHA-256 is recorded in it). It needs the PyTorch back-end
(:meth:`~malaria_screen.inference.predictor.Predictor.predict_with_features`); other back-ends get
``in_domain: null``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from malaria_screen.data.extra_negatives import point_cell_set, trained_fields
from malaria_screen.data.io import decode_image
from malaria_screen.data.patients import parse_nih_patient_id
from malaria_screen.fileio import file_sha256
from malaria_screen.inference import load_model
from malaria_screen.smear.crops import cell_crops
from malaria_screen.smear.segment import segment_field

logger = logging.getLogger(__name__)

__all__ = [
    "DOMAIN_FILE", "GATE_LIMITS", "GATE_SIDE", "OUT_OF_DOMAIN_ADVICE", "DomainCheck", "DomainReference",
    "NotASmearError", "SmearCheck", "UNCHECKED", "check_smear", "domain_check", "fit_reference", "load_reference",
    "model_features", "nih_field_id", "reference_path_for", "require_smear",
]

#: File name of the reference statistics beside a model's ``config.json``.
DOMAIN_FILE = "domain.safetensors"
#: Long side, px, of the downsampled copy :func:`check_smear` looks at.
GATE_SIDE = 256
#: :func:`check_smear`'s limits. Observed on the 54 Chula fields + demo field (min / max) and the
#: 120 IML dev fields (checked, not used to set them): grey-level std 7.4 / 18.4 (IML 18.5 / 53.6);
#: neighbour difference 1.5 / 2.7 (IML 0.2 / 3.1); green-most-absorbed share 0.84 / 0.99
#: (IML 0.92 / 1.0); stained share 0.14 / 0.52 (IML 0.17 / 0.79).
GATE_LIMITS = {
    "min_grey_std": 2.0,          # below: blank / single colour
    "max_neighbour_diff": 15.0,   # mean |I(x+1) - I(x)| of a native 256 px patch, grey levels; above: noise
    "min_stained_share": 0.02,    # share of pixels with OD (relative to the glass) summed over R, G, B > 0.15
    "min_green_share": 0.5,       # share of stained pixels whose green OD exceeds red and blue
}
#: What the user should do about a field outside the domain.
OUT_OF_DOMAIN_ADVICE = ("cells unlike the model's training cells: its parasitemia is unreliable and is left out "
                        "of the slide total; calibrate the site: label a few hundred cells of this microscope (the web "
                        "app's Labelling tab) and run malaria-screen adapt, then screen with --model SITE_FOLDER; "
                        "see docs/adaptation.md")


class NotASmearError(ValueError):
    """The image is not a blood smear field (blank, noise, a photo, text); ``str(exc)`` is the reason."""


# -- 1. not a blood smear ---------------------------------------------------------------------


@dataclass(frozen=True)
class SmearCheck:
    """Result of :func:`check_smear`: ``ok``; ``reason`` (None when ok); ``stats``, the measured values."""

    ok: bool
    reason: str | None
    stats: dict[str, float]


def check_smear(rgb: np.ndarray, *, limits: dict[str, float] | None = None) -> SmearCheck:
    """Is this image a blood smear field? A cheap check to run before segmentation.

    It looks at a copy downsampled (area interpolation) to at most :data:`GATE_SIDE` px on the
    long side, and at one native-resolution patch of up to 256 x 256 px at the centre, so its
    cost is one resize of the image whatever its size (a 25 Mpx field: ~0.1 s).

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` uint8 RGB image.
    limits : dict, optional
        Overrides of :data:`GATE_LIMITS`.

    Returns
    -------
    SmearCheck
        ``ok=False`` with a reason for: a blank or single-colour image; pixel noise; too little
        stained area; stained pixels not Giemsa-coloured (photos, text).

    Raises
    ------
    ValueError
        If ``rgb`` is not ``(H, W, 3)`` uint8.
    """
    import cv2

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    lim = {**GATE_LIMITS, **(limits or {})}
    h, w = rgb.shape[:2]
    f = GATE_SIDE / max(h, w)
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA) if f < 1 else rgb
    grey = small.astype(np.float32).mean(axis=2)
    cy, cx = h // 2, w // 2
    patch = rgb[max(0, cy - 128) : cy + 128, max(0, cx - 128) : cx + 128].astype(np.float32).mean(axis=2)
    nd = float(np.abs(np.diff(patch, axis=1)).mean()) if patch.shape[1] > 1 else 0.0
    glass = np.percentile(small.reshape(-1, 3), 95, axis=0).astype(np.float32)
    od = np.clip(-np.log10((small.astype(np.float32) + 1.0) / (glass + 1.0)), 0, None)
    stained = od.sum(axis=2) > 0.15
    o = od[stained]
    green = float(np.mean(o[:, 1] > np.maximum(o[:, 0], o[:, 2]))) if len(o) else 0.0
    stats = {"grey_std": float(grey.std()), "neighbour_diff": nd, "stained_share": float(stained.mean()),
             "green_share": green}
    reason = None
    if stats["grey_std"] < lim["min_grey_std"] and nd < lim["max_neighbour_diff"]:
        reason = f"blank or single-colour image (grey-level std {stats['grey_std']:.1f})"
    elif nd > lim["max_neighbour_diff"]:
        reason = (f"pixel noise or fine print, not a microscope field (mean neighbour difference {nd:.0f} grey levels; "
                  f"smear fields: < 4)")
    elif stats["stained_share"] < lim["min_stained_share"]:
        reason = f"almost nothing stained ({stats['stained_share']:.1%} of the image)"
    elif green < lim["min_green_share"]:
        reason = (f"not Giemsa-coloured: green is the most absorbed colour in {green:.0%} of the stained pixels "
                  f"(blood smear fields: > 80 %); a photo, text or another stain")
    if reason is not None:
        reason = "not a blood smear field: " + reason
    return SmearCheck(ok=reason is None, reason=reason, stats={k: round(v, 4) for k, v in stats.items()})


def require_smear(rgb: np.ndarray, **kwargs) -> np.ndarray:
    """Return ``rgb`` if :func:`check_smear` passes it.

    Raises
    ------
    NotASmearError
        With the reason, if it is not a blood smear field.
    """
    chk = check_smear(rgb, **kwargs)
    if not chk.ok:
        raise NotASmearError(chk.reason)
    return rgb


# -- 2. domain score --------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainReference:
    """A model's training cells in its feature space, and the in-domain threshold (:data:`DOMAIN_FILE`).

    Attributes
    ----------
    class_means : np.ndarray
        ``(K, D)`` float64: mean feature of the training cells of each class.
    precision : np.ndarray
        ``(D, D)`` float64: inverse of their shared (class-centred) Ledoit-Wolf covariance.
    threshold : float
        A field whose score (median cell distance) exceeds it is outside the domain.
    threshold_rule : str
        How the threshold was set.
    calibration : dict
        Counts and score quantiles of the data sets it was fitted and set on, and the model's
        weights hash (``model_weights_sha256``).
    """

    class_means: np.ndarray
    precision: np.ndarray
    threshold: float
    threshold_rule: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m, p = np.asarray(self.class_means), np.asarray(self.precision)
        if m.ndim != 2 or p.shape != (m.shape[1], m.shape[1]):
            raise ValueError(f"class_means {m.shape} and precision {p.shape} do not match")
        if not np.isfinite(self.threshold) or self.threshold <= 0:
            raise ValueError(f"threshold must be a positive number, got {self.threshold}")

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(np.asarray(self.class_means).shape[1])

    def cell_distances(self, features: np.ndarray) -> np.ndarray:
        """``(N,)`` Mahalanobis distance of ``(N, D)`` cell features to the nearest class mean.

        Raises ValueError if D does not match the reference (features of another model)."""
        f = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
        if f.shape[1] != self.dim:
            raise ValueError(f"features have {f.shape[1]} dimensions, the reference {self.dim}: another model's reference")
        d2 = [np.einsum("ij,jk,ik->i", f - mu, self.precision, f - mu) for mu in np.asarray(self.class_means)]
        return np.sqrt(np.maximum(np.min(np.stack(d2), axis=0), 0.0))

    def score(self, features: np.ndarray) -> float | None:
        """Field score: median of :meth:`cell_distances` over its cells; None for no cell."""
        return float(np.median(self.cell_distances(features))) if len(features) else None

    def save(self, path: str | Path) -> Path:
        """Write the safetensors file atomically (temporary file + rename); returns the path."""
        from safetensors.numpy import save_file

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        meta = {"format": "malaria-screen domain reference v1", "threshold": repr(float(self.threshold)),
                "threshold_rule": self.threshold_rule, "calibration": json.dumps(self.calibration)}
        try:
            save_file({"class_means": np.ascontiguousarray(self.class_means, dtype=np.float32),
                       "precision": np.ascontiguousarray(self.precision, dtype=np.float32)}, str(tmp), metadata=meta)
            os.chmod(tmp, 0o644)  # shipped beside the model: readable by all, as the other model files
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "DomainReference":
        """Read a :data:`DOMAIN_FILE`. Raises OSError, or ValueError/KeyError on a malformed file."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                arrays = {k: fh.get_tensor(k) for k in ("class_means", "precision")}
        except OSError:
            raise
        except Exception as exc:  # safetensors raises its own error type on a corrupt header
            raise ValueError(f"{path}: not a domain reference ({exc})") from exc
        if not meta.get("format", "").startswith("malaria-screen domain reference"):
            raise ValueError(f"{path}: not a malaria-screen domain reference")
        return cls(class_means=arrays["class_means"].astype(np.float64), precision=arrays["precision"].astype(np.float64),
                   threshold=float(meta["threshold"]), threshold_rule=meta.get("threshold_rule", ""),
                   calibration=json.loads(meta.get("calibration", "{}")))


def reference_path_for(onnx_file: str | Path) -> Path:
    """Where an ONNX file's own reference lives: ``<stem>.domain.safetensors`` beside it
    (``model.int8.onnx`` -> ``model.int8.domain.safetensors``). An int8 network's features are not
    the fp32 network's (activations quantised: a field's score moves by a few units on IML), so
    ``malaria-screen domain-fit --onnx FILE`` fits one for it."""
    p = Path(onnx_file)
    return p.with_name(f"{p.stem}.domain.safetensors")


def load_reference(model: Any) -> DomainReference | None:
    """The self-check reference of a loaded model or of a model folder path: for an ``.onnx`` file,
    its own :func:`reference_path_for` if present, else the folder's :data:`DOMAIN_FILE` (fitted on
    the PyTorch model's features, which an fp32 export reproduces); None when there is none or it
    cannot be read (logged). An int8 model (``precision`` ``int8-...``) never falls back to the
    folder's reference: its quantised features would be scored against another network's
    statistics, and verdicts near the threshold would move, so without its own reference the
    self-check is off, with a warning saying how to fit one."""
    src = model if isinstance(model, (str, os.PathLike)) else getattr(model, "source", None)
    if not src:
        return None
    p = Path(src)
    if not p.exists():
        return None
    own = None if p.is_dir() else reference_path_for(p)
    if own is not None and not own.is_file() and str(getattr(model, "precision", "") or "").startswith("int8"):
        logger.warning("%s is an int8 model without its own self-check reference (%s): the self-check is off; "
                       "fit one with `malaria-screen domain-fit --model RUN_FOLDER --onnx %s`", p, own.name, p)
        return None
    p = own if own is not None and own.is_file() else (p if p.is_dir() else p.parent) / DOMAIN_FILE
    if not p.is_file():
        return None
    try:
        return DomainReference.load(p)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable %s: %s", p, exc)
        return None


def _gives_features(model: Any) -> bool:
    """Whether ``model`` returns features: it has ``predict_with_features`` and does not say it cannot
    (``gives_features`` False: an ONNX file exported without the ``features`` output)."""
    return hasattr(model, "predict_with_features") and getattr(model, "gives_features", True) is not False


def model_features(model: Any, crops: list[np.ndarray], *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray] | None:
    """``(p_parasitized (N,), features (N, D))`` of cell crops from one forward pass, or None when the
    model cannot give features (no ``predict_with_features``: the ensemble back-end; an ONNX file
    exported without a ``features`` output, ``gives_features`` False)."""
    if not _gives_features(model):
        return None
    fn = model.predict_with_features
    ps, fs = [], []
    for s in range(0, len(crops), batch_size):
        p, f = fn(crops[s : s + batch_size])
        ps.append(np.asarray(p, dtype=np.float64).reshape(-1))
        fs.append(np.asarray(f))
    if not ps:
        return np.zeros(0), np.zeros((0, 0), np.float32)
    return np.concatenate(ps), np.concatenate(fs)


@dataclass(frozen=True)
class DomainCheck:
    """Per-field self-check: ``score`` (None if no cell or no reference), ``threshold``,
    ``in_domain`` (None if no cell, no reference or no features), ``n_cells`` scored."""

    score: float | None
    threshold: float | None
    in_domain: bool | None
    n_cells: int

    def to_json(self) -> dict[str, Any]:
        """``{"in_domain", "domain_score", "domain_threshold"}`` for a field's JSON."""
        return {"in_domain": self.in_domain,
                "domain_score": None if self.score is None else round(self.score, 3),
                "domain_threshold": None if self.threshold is None else round(self.threshold, 3)}


#: The check when there is no reference or the model gives no features.
UNCHECKED = DomainCheck(None, None, None, 0)


def domain_check(features: np.ndarray | None, reference: DomainReference | None) -> DomainCheck:
    """Domain score of a field from its cells' features, and whether it is within the threshold.

    Parameters
    ----------
    features : np.ndarray or None
        ``(N, D)`` features of the field's cells (:func:`model_features`), None if unavailable.
    reference : DomainReference or None
        The model's reference; None gives :data:`UNCHECKED`.

    Returns
    -------
    DomainCheck
        ``in_domain`` is None when there is no reference, no features or no cell.

    Raises
    ------
    ValueError
        If the features' dimension is not the reference's.
    """
    if reference is None or features is None:
        return UNCHECKED
    s = reference.score(features)
    return DomainCheck(s, reference.threshold, None if s is None else bool(s <= reference.threshold), len(features))


# -- fitting the reference --------------------------------------------------------------------


def nih_field_id(name: str) -> str:
    """Source image of an NIH crop: its file name up to ``_cell``
    (``C33P1thinF_IMG_20150619_114756a_cell_179.png`` → ``C33P1thinF_IMG_20150619_114756a``)."""
    return Path(name).name.split("_cell")[0]


def _nih_files(cell_dir: Path, patients: set[str], classes: Iterable[str]) -> list[tuple[Path, int]]:
    out = []
    for ci, cls in enumerate(classes):
        d = cell_dir / cls
        if not d.is_dir():
            raise FileNotFoundError(f"not an NIH cell folder: {d} is missing")
        out += [(p, ci) for p in sorted(d.iterdir()) if p.is_file() and parse_nih_patient_id(p.name) in patients]
    return out


def _features_of_files(model: Any, files: list[Path], batch: int = 512) -> np.ndarray:
    fs = []
    for s in range(0, len(files), batch):
        fs.append(model.predict_with_features([decode_image(str(p)) for p in files[s : s + batch]])[1])
    return np.concatenate(fs) if fs else np.zeros((0, 0), np.float32)


def _quantiles(scores: np.ndarray) -> dict[str, float | None]:
    if not len(scores):
        return {k: None for k in ("q50", "q90", "q95", "q99", "max")}
    q = np.percentile(scores, [50, 90, 95, 99, 100])
    return {k: round(float(v), 4) for k, v in zip(("q50", "q90", "q95", "q99", "max"), q)}


def fit_reference(model_dir: str | Path, data_dir: str | Path, *, heldout_quantile: float = 99.0,
                  min_cells: int = 5, progress: Callable[[str], None] | None = None,
                  model: Any | None = None) -> DomainReference:
    """Fit a model folder's reference and set its threshold: one call, no choice left to the caller.

    1. Training cells: every NIH crop of the model's *training* patients (``split.json``), both
       classes, and the extra negatives it was trained on (``config.json``'s ``extra_negatives``
       fields, cut as in training by :func:`~malaria_screen.data.extra_negatives.point_cell_set`);
       the features of the model's last linear layer; one mean per class and source (NIH
       Parasitized, NIH Uninfected, extra-negative Uninfected), and the Ledoit-Wolf covariance
       of the component-centred features (Lee et al. 2018's class-conditional Gaussians, with the
       extra negatives as their own component: they are not NIH cells).
    2. Threshold: the larger of the ``heldout_quantile`` percentile of the scores of the NIH
       validation + test patients' source images (their Uninfected crops, >= ``min_cells`` per
       image: a field is mostly uninfected cells) and the largest score of the Chula-RBC-12
       fields (``data_dir/chula_rbc/images``, segmented and cut as ``smear`` does) that the
       model was **not** trained on.

    Parameters
    ----------
    model_dir : path
        Model folder with ``config.json``, ``weights.safetensors`` and ``split.json``.
    data_dir : path
        The shared data folder (``nih_cell_images/``, ``chula_rbc/images/``).
    heldout_quantile : float
        Percentile of the NIH held-out fields' scores.
    min_cells : int
        Fewest Uninfected crops of an NIH source image for it to count as a field.
    progress : callable, optional
        Called with progress messages.
    model : loaded cell model, optional
        The network whose features are fitted, e.g. an ONNX int8 file of this folder
        (:class:`~malaria_screen.inference.onnx_predictor.OnnxPredictor`); default: the folder's
        PyTorch model.

    Returns
    -------
    DomainReference
        Not yet saved (:meth:`DomainReference.save`).

    Raises
    ------
    FileNotFoundError
        If ``split.json``, the model files, the NIH folder or the Chula folder is missing.
    ValueError
        If the split has no training patients or the model gives no features.
    """
    from sklearn.covariance import LedoitWolf

    say = progress or (lambda m: None)
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    split_path = model_dir / "split.json"
    if not split_path.is_file():
        raise FileNotFoundError(f"{split_path} is missing: the reference is fitted on the model's training patients")
    splits = json.loads(split_path.read_text()).get("splits", {})
    train = set(splits.get("train", {}).get("patients", []))
    held = (set(splits.get("val", {}).get("patients", [])) | set(splits.get("test", {}).get("patients", []))) - train
    if not train:
        raise ValueError(f"{split_path} lists no training patients")
    chula = data_dir / "chula_rbc" / "images"
    if not chula.is_dir():
        raise FileNotFoundError(f"{chula} is missing (the Chula fields set the threshold)")
    nih = data_dir / "nih_cell_images"
    model = model if model is not None else load_model(model_dir, backend="torch")
    if not _gives_features(model):
        raise ValueError(f"{model_dir}: this model gives no features (an ensemble, or an ONNX file exported "
                         "without them: re-export it)")
    classes = list(model.class_names)

    files = _nih_files(nih, train, classes)
    say(f"features of {len(files)} NIH training cells of {len(train)} training groups")
    feats = _features_of_files(model, [p for p, _ in files])
    y = np.array([c for _, c in files])
    present = [c for c in range(len(classes)) if np.any(y == c)]
    if len(feats) < 50 or not present:
        raise ValueError(f"only {len(feats)} NIH training cells found under {nih}")
    parts = [feats[y == c] for c in present]
    components = [classes[c] for c in present]
    extra_fields = trained_fields(model.config, data_dir / "chula_rbc")
    if extra_fields:
        extra = point_cell_set(data_dir / "chula_rbc", size_px=int(model.config.input_size), class_names=classes,
                               fields=extra_fields)
        say(f"features of {len(extra.images)} extra-negative training cells of {len(set(extra.patients))} Chula fields")
        if len(extra.images):
            parts.append(model_features(model, list(extra.images), batch_size=512)[1])
            components.append("Uninfected (Chula-RBC-12 training fields)")
    means = np.stack([f.mean(axis=0) for f in parts]).astype(np.float64)
    centred = np.concatenate([f - means[i] for i, f in enumerate(parts)])
    feats = np.concatenate(parts)
    lw = LedoitWolf().fit(centred)
    ref = DomainReference(class_means=means, precision=lw.precision_, threshold=1.0)
    s_tr = ref.cell_distances(feats)

    groups: dict[str, list[Path]] = defaultdict(list)
    for p, c in _nih_files(nih, held, ["Uninfected"] if "Uninfected" in classes else classes[-1:]):
        groups[nih_field_id(p.name)].append(p)
    groups = {k: v for k, v in groups.items() if len(v) >= min_cells}
    say(f"{len(groups)} held-out NIH fields of {len(held)} patients")
    s_ho = np.array([ref.score(_features_of_files(model, v)) for _, v in sorted(groups.items())])

    s_ch = []
    chula_files = sorted(p for p in chula.iterdir() if p.is_file() and p.stem not in set(extra_fields))
    say(f"{len(chula_files)} Chula fields the model was not trained on")
    for p in chula_files:
        rgb = decode_image(str(p))
        seg = segment_field(rgb)
        props = seg.cells()
        if props:
            s_ch.append(ref.score(model.predict_with_features(cell_crops(rgb, seg.labels, props))[1]))
    s_ch = np.array(s_ch)
    t_ho = float(np.percentile(s_ho, heldout_quantile)) if len(s_ho) else 0.0
    t_ch = float(s_ch.max()) if len(s_ch) else 0.0
    thr = max(t_ho, t_ch)
    if thr <= 0:
        raise ValueError("no held-out NIH field and no Chula field to set the threshold on")
    weights = model_dir / "weights.safetensors"
    cal = {
        "model_weights_sha256": file_sha256(weights) if weights.is_file() else None,
        "feature_dim": ref.dim,
        "classes": components,
        "train_cells": {"n_groups": len(train), "n_cells": len(feats), **_quantiles(s_tr)},
        "nih_heldout_fields": {"n_patients": len(held), "n_fields": len(s_ho), **_quantiles(s_ho),
                               "in_domain": round(float(np.mean(s_ho <= thr)), 4) if len(s_ho) else None},
        "chula_fields": {"n_fields": len(s_ch), "left_out_trained_fields": len(extra_fields), **_quantiles(s_ch),
                         "in_domain": round(float(np.mean(s_ch <= thr)), 4) if len(s_ch) else None},
    }
    rule = (f"max(p{heldout_quantile:g} of {len(s_ho)} NIH held-out (val+test) patients' fields = {t_ho:.3f}, "
            f"max of {len(s_ch)} Chula-RBC-12 fields = {t_ch:.3f})")
    return DomainReference(class_means=means, precision=ref.precision, threshold=round(thr, 4), threshold_rule=rule,
                           calibration=cal)
