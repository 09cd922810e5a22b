"""LightningModule: a cell classifier *system* that receives a plain ``nn.Module``.

Loss is cross-entropy over ``num_classes`` logits (two for Parasitized/Uninfected). Optimisers:
Adam or AdamW (decoupled weight decay). Schedules: one-cycle (Smith & Topin 2018; seed 003)
stepped per batch, or ReduceLROnPlateau on validation loss (factor 0.5, patience 2,
min_lr 1e-6; seed 000) stepped per epoch.

Transfer learning (Yosinski et al. 2014; Rajaraman et al. 2018): the network's **head** is its
``classifier`` (or ``head``) sub-module and its ``dropout``; every other child module is the
**backbone**. ``freeze_backbone`` trains the head only, with the backbone's BatchNorm layers kept
in eval mode (running statistics fixed); ``backbone_lr_scale`` gives the backbone a smaller
learning rate when fine-tuning; ``unfreeze_at_epoch`` trains the head first and the whole
network from that epoch on (gradual unfreezing, Howard & Ruder 2018).

MixStyle (Zhou et al. 2021, :mod:`malaria_screen.models.mixstyle`): ``mixstyle > 0`` mixes the
feature statistics of the training instances after the named layers; identity at evaluation.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from malaria_screen.models.mixstyle import attach_mixstyle

__all__ = ["CellClassifier", "split_backbone_head"]

log = logging.getLogger(__name__)

_HEAD_NAMES = ("classifier", "head", "dropout")


def split_backbone_head(net: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """Backbone and head modules of a network (direct children).

    The head is the child named ``classifier`` or ``head`` (plus ``dropout``); the backbone is
    every other child.

    Raises
    ------
    ValueError
        If ``net`` has neither a ``classifier`` nor a ``head`` child.
    """
    children = dict(net.named_children())
    if "classifier" not in children and "head" not in children:
        raise ValueError(f"{type(net).__name__} has no 'classifier' or 'head' sub-module: cannot tell backbone from head")
    head = [m for n, m in children.items() if n in _HEAD_NAMES]
    backbone = [m for n, m in children.items() if n not in _HEAD_NAMES]
    return backbone, head


class CellClassifier(L.LightningModule):
    """Train, validate and test a cell network.

    Parameters
    ----------
    net : nn.Module
        Maps ``(B, 3, S, S) float32`` to logits ``(B, num_classes)``.
    num_classes : int, default=2
    positive_index : int, default=0
        Logit index of the positive class (Parasitized) for ROC-AUC.
    optimizer : {"adam", "adamw"}, default="adamw"
    lr : float, default=4e-3
    weight_decay : float, default=5e-4
    scheduler : {"onecycle", "plateau", "none"}, default="onecycle"
    label_smoothing : float, default=0.0
    freeze_backbone : bool, default=False
        Train the head only; backbone parameters get ``requires_grad=False`` and its BatchNorm
        layers stay in eval mode (see :func:`split_backbone_head`).
    backbone_lr_scale : float, default=1.0
        Backbone learning rate = ``lr * backbone_lr_scale`` (two parameter groups when != 1).
    unfreeze_at_epoch : int, optional
        With ``freeze_backbone``: unfreeze the backbone at the start of this 0-based epoch.
        Not supported with DDP (parameters unfrozen later are not synchronised).
    mixstyle : float, default=0.0
        Probability per batch and layer of MixStyle (Zhou et al. 2021) while training; 0: off
        (nothing attached, nothing drawn).
    mixstyle_layers : tuple of str, default=()
        Sub-modules of ``net`` (``named_modules`` names) whose outputs MixStyle mixes.

    Raises
    ------
    ValueError
        If freezing is asked of a network without a ``classifier``/``head``,
        ``unfreeze_at_epoch`` is given without ``freeze_backbone``, or ``mixstyle_layers``
        names no sub-module of ``net``.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        num_classes: int = 2,
        positive_index: int = 0,
        optimizer: str = "adamw",
        lr: float = 4e-3,
        weight_decay: float = 5e-4,
        scheduler: str = "onecycle",
        label_smoothing: float = 0.0,
        freeze_backbone: bool = False,
        backbone_lr_scale: float = 1.0,
        unfreeze_at_epoch: int | None = None,
        mixstyle: float = 0.0,
        mixstyle_layers: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        if unfreeze_at_epoch is not None and not freeze_backbone:
            raise ValueError(f"unfreeze_at_epoch={unfreeze_at_epoch} needs freeze_backbone=True")
        if not backbone_lr_scale > 0:
            raise ValueError(f"backbone_lr_scale must be > 0, got {backbone_lr_scale}")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        if mixstyle:
            attach_mixstyle(net, mixstyle_layers, p=mixstyle)
        self._backbone_frozen = False
        if freeze_backbone or backbone_lr_scale != 1.0:
            self._backbone, self._head = split_backbone_head(net)
        if freeze_backbone:
            self.set_backbone_frozen(True)
        task = "binary" if num_classes == 2 else "multiclass"
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_auroc = torchmetrics.AUROC(task=task, num_classes=None if task == "binary" else num_classes)
        self._task = task

    # -- freezing -------------------------------------------------------------------------------
    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._backbone for p in m.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._head for p in m.parameters()]

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Freeze (or unfreeze) the backbone: ``requires_grad`` and BatchNorm mode."""
        for p in self.backbone_parameters():
            p.requires_grad_(not frozen)
        self._backbone_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True):
        """As ``nn.Module.train``, but a frozen backbone stays in eval mode (fixed BatchNorm statistics)."""
        super().train(mode)
        if self._backbone_frozen:
            for m in self._backbone:
                m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of a normalised ``(B, 3, S, S)`` batch."""
        return self.net(x)

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y, *soft = batch  # (x, y) or, when distilling, (x, y, soft targets (B, C))
        logits = self(x)
        loss = self._loss(logits, soft[0] if soft else y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _auroc_input(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        probs = logits.softmax(-1)
        if self._task == "binary":
            pos = self.hparams.positive_index
            return probs[:, pos], (y == pos).long()
        return probs, y

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.val_auroc.update(*self._auroc_input(logits, y))
        self.log("val_loss", self._loss(logits, y), on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True)
        self.log("val_auroc", self.val_auroc, on_epoch=True)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc.update(logits, y)
        self.log("test_loss", self._loss(logits, y), on_epoch=True, sync_dist=True)
        self.log("test_acc", self.test_acc, on_epoch=True)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities ``(B, num_classes)`` float32."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(-1)

    def configure_optimizers(self):
        hp = self.hparams
        frozen_for_good = hp.freeze_backbone and hp.unfreeze_at_epoch is None
        if frozen_for_good:
            groups = [{"params": self.head_parameters(), "lr": hp.lr}]
        elif hp.backbone_lr_scale != 1.0 or hp.freeze_backbone:
            groups = [{"params": self.backbone_parameters(), "lr": hp.lr * hp.backbone_lr_scale},
                      {"params": self.head_parameters(), "lr": hp.lr}]
        else:
            groups = [{"params": list(self.net.parameters()), "lr": hp.lr}]
        if hp.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.Adam(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "onecycle":
            max_lr = [g["lr"] for g in groups]
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=int(self.trainer.estimated_stepping_batches))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if hp.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=2, min_lr=1e-6)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", "interval": "epoch"}}
        return opt

    def on_train_epoch_start(self) -> None:
        ep = self.hparams.unfreeze_at_epoch
        if self._backbone_frozen and ep is not None and self.current_epoch >= ep:
            log.info("epoch %d: unfreezing the backbone (lr x %g)", self.current_epoch, self.hparams.backbone_lr_scale)
            self.set_backbone_frozen(False)
