"""One typed, frozen configuration for a trained cell model, saved as ``config.json`` beside it.

Inference reads everything it needs (architecture, input size, mean/std, class names, decision
threshold) from this file and hard-codes nothing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from malaria_screen.fileio import atomic_write_text

#: Colour augmentation recipes of training (``TrainConfig.color_augment``,
#: :func:`malaria_screen.data.transforms.train_transform`).
COLOR_AUGMENTS = ("jitter", "stain", "hed")

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run and the model it produces.

    Attributes
    ----------
    model : str
        Registry name (see ``malaria_screen.models.list_models()``).
    input_size : int
        Square model input side, pixels. Cells are letterboxed (aspect kept, black padding).
    channels : int
        Input channels (3, RGB).
    class_names : tuple of str
        Output classes in logit order; sorted class folder names.
    positive_class : str
        Class whose probability is ``p_parasitized`` and whose recall is sensitivity.
    mean, std : tuple of 3 floats
        Per-channel statistics of training-patient cells in [0, 1] units.
    threshold : float
        Decision threshold on the positive-class probability.
    epochs, batch_size : int
    optimizer : {"adam", "adamw"}
    lr, weight_decay : float
        Peak learning rate (one-cycle) or initial rate (plateau); decoupled weight decay.
    scheduler : {"onecycle", "plateau", "none"}
        One-cycle (Smith 2018, seed 003) or ReduceLROnPlateau (factor 0.5, patience 2,
        min_lr 1e-6, seed 000).
    grad_clip : float
        Gradient clipping by value (seed 003 uses 0.1); 0 disables.
    augment : bool
    color_jitter : float
        Strength of the colour augmentation (with ``augment``): brightness, contrast and
        saturation jitter ± this factor, hue ± a fifth of it (torchvision ``ColorJitter``).
        0.1 (mild) suits one data set; stronger jitter (e.g. 0.3) imitates the stain
        differences between slides when a model is adapted to another microscope.
    color_augment : {"jitter", "stain"}
        ``"jitter"``: the colour jitter above. ``"stain"``: strong stain augmentation for
        training across microscopes and stains (``color_jitter`` is then unused; see
        :func:`~malaria_screen.data.transforms.train_transform`). ``"hed"``: stain augmentation
        in haematoxylin-eosin-DAB optical-density space (Tellez et al. 2019; strength
        ``hed_sigma``) plus brightness/contrast jitter ± ``color_jitter``, applied to whole
        uint8 batches (:class:`~malaria_screen.data.transforms.BatchAugment`).
    hed_sigma : float
        ``color_augment="hed"``: each stain channel's optical density is scaled by
        α ~ U(1 - σ, 1 + σ) and shifted by β ~ U(-σ, σ) per cell (Tellez et al. 2019: 0.05
        "HED-light", 0.2 "HED-strong").
    blur_sigma : float
        ``color_augment="hed"``: each training cell is blurred by a Gaussian of standard
        deviation ~ U(0, ``blur_sigma``) px at the model's input size (the "morphology"
        augmentations of Tellez et al. 2019: another microscope's optics and compression blur
        differently); 0 (the default) draws nothing, so runs without it are unchanged.
    test_patients : tuple of str
        Patients forced into the test split (e.g. those of the bundled sample images, so that
        the demo runs on held-out patients); the rest is split as usual, with the test share
        reduced so that about ``test_fraction`` of all patients is tested. Recorded in
        ``split.json`` (``forced_test_patients``).
    extra_negatives : str or None
        A Chula-RBC-12-layout folder (``images/N.jpg``, ``labels/N.txt`` with a point per red
        cell) of fields without malaria: one crop per point is added to the TRAINING split
        only, as Uninfected, one group per field (they are never in val/test). See
        :func:`malaria_screen.data.extra_negatives.point_cell_set`.
    extra_negative_fields : tuple of str
        Field stems of ``extra_negatives`` to use (empty: all); the others stay unseen, e.g.
        to measure specificity on that site.
    synthetic_positives : float
        Share of the extra negatives that also join the training split as a synthetic
        Parasitized copy, an NIH training parasite pasted into the cell in optical density
        (:func:`malaria_screen.data.synthetic.synthetic_positives`); 0 (default) adds none.
        Needs ``extra_negatives``.
    early_stopping_patience : int
        Epochs without val-loss improvement before stopping; 0 disables.
    val_fraction, test_fraction : float
        Share of patients held out for validation and test.
    seed : int
        Seeds initialisation, shuffling and augmentation, and the split unless ``split_seed``.
    split_seed : int or None
        Seed of the patient split; None: ``seed``. Runs that differ only in ``seed`` but share
        ``split_seed`` train on the same patients (an ensemble, the teachers of a distillation).
    label_smoothing : float
    num_workers : int
        DataLoader worker processes (0 = decode in the main process; cells are pre-decoded).
    pretrained_weights : str or None
        Initial backbone weights: a local ImageNet weights file (safetensors, or a torch state
        dict read with ``weights_only=True``), ``"imagenet"`` for the weights bundled by a model
        (EfficientNet-Lite0), or None (random initialisation). Only used when training starts;
        the trained weights live in ``weights.safetensors``.
    freeze_backbone : bool
        Train only the classifier head; the backbone (parameters and BatchNorm statistics) stays
        fixed: the pretrained network is a feature extractor.
    backbone_lr_scale : float
        Fine-tuning: the backbone's learning rate is ``lr * backbone_lr_scale`` (the head's is
        ``lr``); 1 trains all layers alike.
    unfreeze_at_epoch : int or None
        With ``freeze_backbone``: unfreeze the backbone at this (0-based) epoch and fine-tune it
        from then on at ``lr * backbone_lr_scale`` (head first, then everything; gradual
        unfreezing after Howard & Ruder 2018). None keeps it frozen throughout.
    init_from : str or None
        Fine-tuning from a trained malaria-screen run: a run folder (``config.json`` +
        ``weights.safetensors``). Every weight and the input normalisation (``mean``, ``std``)
        are copied from it; its model, input size and classes must match. This is how the cell
        model is adapted to another microscope (fields → ``malaria-screen crops`` → ``train
        --init-from``). Only used when training starts.
    distill_from : tuple of str
        Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a
        neural network"): run folders of trained teachers (same classes and input size). Their
        mean class probabilities on each un-augmented training cell, mixed with the cell's label,
        are the training targets; validation and test keep the plain labels. A teacher must not
        have trained on a patient of this run's validation or test split (checked). Empty: none.
    distill_weight : float
        With ``distill_from``: the target is ``(1 - w) * one_hot(label) + w * teacher_probs``.
    weight_average_from : float or None
        Weight averaging (stochastic weight averaging, Izmailov et al. 2018, "Averaging weights
        leads to wider optima and better generalization"; averaged after every step as in SWAD,
        Cha et al. 2021, a domain-generalisation method): from this share of the training steps
        on (in ``[0, 1)``), an equal-weight running average of the weights and BatchNorm buffers
        (Lightning's ``WeightAveraging`` callback) is what validation scores, checkpoints hold
        and the run keeps. None: off (the last or best weights themselves).
    mixstyle : float
        MixStyle (Zhou et al. 2021, "Domain generalization with MixStyle", a
        domain-generalisation method): while training, with this probability per batch and
        layer, each cell's channel-wise feature mean and standard deviation after the
        ``mixstyle_layers`` are replaced by a random mix of its own and another cell's
        (:mod:`malaria_screen.models.mixstyle`); identity at evaluation, so the weights and the
        ONNX graph are those of a plain run. 0 (default): off, nothing drawn.
    mixstyle_layers : tuple of str
        The sub-modules (``named_modules`` names) after which MixStyle mixes; the default is
        ``cellnet``'s stem and first stage (the paper's "first stages").
    """

    model: str = "cellnet"
    input_size: int = 64
    channels: int = 3
    class_names: tuple[str, ...] = ("Parasitized", "Uninfected")
    positive_class: str = "Parasitized"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    threshold: float = 0.5
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 4e-3
    weight_decay: float = 5e-4
    scheduler: str = "onecycle"
    grad_clip: float = 0.1
    augment: bool = True
    color_jitter: float = 0.1
    color_augment: str = "jitter"
    hed_sigma: float = 0.05
    blur_sigma: float = 0.0
    test_patients: tuple[str, ...] = ()
    extra_negatives: str | None = None
    extra_negative_fields: tuple[str, ...] = ()
    synthetic_positives: float = 0.0
    early_stopping_patience: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    split_seed: int | None = None
    label_smoothing: float = 0.0
    num_workers: int = 0
    pretrained_weights: str | None = None
    freeze_backbone: bool = False
    backbone_lr_scale: float = 1.0
    unfreeze_at_epoch: int | None = None
    init_from: str | None = None
    distill_from: tuple[str, ...] = ()
    distill_weight: float = 0.5
    weight_average_from: float | None = None
    mixstyle: float = 0.0
    mixstyle_layers: tuple[str, ...] = ("features.0", "features.2")
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.scheduler not in ("onecycle", "plateau", "none"):
            raise ValueError(f"scheduler must be 'onecycle', 'plateau' or 'none', got {self.scheduler!r}")
        if self.input_size < 8:
            raise ValueError(f"input_size must be >= 8 px, got {self.input_size}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {self.color_jitter}")
        if self.color_augment not in COLOR_AUGMENTS:
            raise ValueError(f"color_augment must be one of {COLOR_AUGMENTS}, got {self.color_augment!r}")
        if not 0.0 <= self.hed_sigma < 1.0:
            raise ValueError(f"hed_sigma must be in [0, 1), got {self.hed_sigma}")
        if not 0.0 <= self.blur_sigma <= 4.0:
            raise ValueError(f"blur_sigma must be in [0, 4] px, got {self.blur_sigma}")
        if self.blur_sigma and self.color_augment != "hed":
            raise ValueError("blur_sigma needs color_augment='hed' (the batched augmentation)")
        if self.extra_negative_fields and self.extra_negatives is None:
            raise ValueError("extra_negative_fields needs extra_negatives (the folder they come from)")
        if not 0.0 <= self.synthetic_positives <= 1.0:
            raise ValueError(f"synthetic_positives must be in [0, 1], got {self.synthetic_positives}")
        if self.synthetic_positives and self.extra_negatives is None:
            raise ValueError("synthetic_positives needs extra_negatives (the cells the parasites are pasted into)")
        if not self.backbone_lr_scale > 0:
            raise ValueError(f"backbone_lr_scale must be > 0, got {self.backbone_lr_scale}")
        if self.unfreeze_at_epoch is not None and (not self.freeze_backbone or self.unfreeze_at_epoch < 1):
            raise ValueError(f"unfreeze_at_epoch={self.unfreeze_at_epoch} needs freeze_backbone=True and a value >= 1")
        if self.init_from is not None and self.pretrained_weights is not None:
            raise ValueError("init_from (a trained run) and pretrained_weights (ImageNet) are exclusive")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if self.weight_average_from is not None and not 0.0 <= self.weight_average_from < 1.0:
            raise ValueError(f"weight_average_from must be in [0, 1) or None, got {self.weight_average_from}")
        if not 0.0 <= self.mixstyle <= 1.0:
            raise ValueError(f"mixstyle must be in [0, 1], got {self.mixstyle}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {self.mean} / {self.std}")

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(class_names)`` (2 for Parasitized/Uninfected)."""
        return len(self.class_names)

    @property
    def positive_index(self) -> int | None:
        """Index of ``positive_class`` in ``class_names``, or None if absent."""
        return self.class_names.index(self.positive_class) if self.positive_class in self.class_names else None

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (tuples stay tuples; :meth:`to_json` writes them as lists)."""
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text; written atomically to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict; unknown keys raise ``ValueError``; lists become tuples."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        """Read a ``config.json`` written by :meth:`to_json`; raises ``ValueError`` on unknown keys,
        ``OSError`` if unreadable and ``json.JSONDecodeError`` if not JSON."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
