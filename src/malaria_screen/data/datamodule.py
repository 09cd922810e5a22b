"""Lightning DataModule over a pre-decoded :class:`CellSet` and a patient-level split."""

from __future__ import annotations

import logging
from typing import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from malaria_screen.data.dataset import CellSet
from malaria_screen.data.split import SplitIndices
from malaria_screen.data.transforms import BatchAugment, eval_transform, train_transform

__all__ = ["BatchCellDataset", "CellDataset", "CellDataModule", "channel_stats"]

log = logging.getLogger(__name__)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``(N, H, W, C) uint8`` images, in [0, 1] units.

    Computed in float64 over all pixels (black letterbox padding included, as the model sees it).
    """
    x = images.reshape(-1, images.shape[-1])
    s1 = np.zeros(x.shape[1]); s2 = np.zeros(x.shape[1])
    for start in range(0, len(x), 4_000_000):  # bounded memory
        chunk = x[start : start + 4_000_000].astype(np.float64) / 255.0
        s1 += chunk.sum(0); s2 += (chunk**2).sum(0)
    n = len(x)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class CellDataset(Dataset):
    """Cells as ``(3, S, S) float32`` tensors with int64 labels.

    Parameters
    ----------
    images : (N, S, S, 3) ndarray of uint8
    labels : (N,) ndarray of int
    transform : callable
        Applied to each ``(3, S, S) uint8`` tensor.
    targets : (N, C) ndarray of float, optional
        Soft training targets (knowledge distillation); items are then ``(x, label, target)``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform, targets: np.ndarray | None = None) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # view, no copy
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.targets = None if targets is None else torch.as_tensor(targets, dtype=torch.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.targets is not None:
            return self.transform(self.images[i]), self.labels[i], self.targets[i]
        return self.transform(self.images[i]), self.labels[i]


class BatchCellDataset(Dataset):
    """Cells served a whole batch at a time: ``ds[list_of_indices]`` → ``(x, y)``.

    ``x`` is ``batch_transform`` applied to the ``(B, 3, S, S) uint8`` batch (one vectorised pass,
    e.g. :class:`~malaria_screen.data.transforms.BatchAugment`), ``y`` the ``(B,)`` int64 labels.
    Used with a :class:`~torch.utils.data.BatchSampler` and ``batch_size=None``.

    Parameters
    ----------
    images : (N, S, S, 3) ndarray of uint8
    labels : (N,) ndarray of int
    batch_transform : callable
    targets : (N, C) ndarray of float, optional
        Soft training targets (knowledge distillation); batches are then ``(x, y, targets)``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_transform, targets: np.ndarray | None = None) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.targets = None if targets is None else torch.as_tensor(targets, dtype=torch.float32)
        self.batch_transform = batch_transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = self.batch_transform(self.images[idx].contiguous())
        if self.targets is not None:
            return x, self.labels[idx], self.targets[idx]
        return x, self.labels[idx]


def _as_is(x: torch.Tensor) -> torch.Tensor:
    return x


class CellDataModule(L.LightningDataModule):
    """Train/val/test loaders of one patient-level split.

    Parameters
    ----------
    cells : CellSet
    split : SplitIndices
    mean, std : sequence of float
        Training-patient channel statistics.
    batch_size : int, default=128
    augment : bool, default=True
    color_jitter : float, default=0.1
        Colour jitter strength of the training augmentation (:func:`~.transforms.train_transform`).
    color_augment : {"jitter", "stain", "hed"}, default="jitter"
        Colour augmentation recipe (:func:`~.transforms.train_transform`); ``"hed"`` augments
        whole uint8 batches (:class:`~.transforms.BatchAugment`, with ``hed_sigma`` and
        ``color_jitter``) and serves every split in batches.
    hed_sigma : float, default=0.05
    blur_sigma : float, default=0.0
        Gaussian blur of the batched augmentation, px (:class:`~.transforms.BatchAugment`).
    num_workers : int, default=0
    seed : int, default=0
        Seeds the training shuffle.
    train_targets : (len(split.train), C) ndarray of float, optional
        Soft targets of the training cells, in ``split.train`` order (knowledge distillation):
        training batches are then ``(x, y, targets)``.
    """

    def __init__(
        self,
        cells: CellSet,
        split: SplitIndices,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        batch_size: int = 128,
        augment: bool = True,
        color_jitter: float = 0.1,
        color_augment: str = "jitter",
        hed_sigma: float = 0.05,
        blur_sigma: float = 0.0,
        num_workers: int = 0,
        seed: int = 0,
        train_targets: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if train_targets is not None and len(train_targets) != len(split.train):
            raise ValueError(f"train_targets has {len(train_targets)} rows for {len(split.train)} training cells")
        self.train_targets = train_targets
        self.cells, self.split = cells, split
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size, self.augment, self.num_workers, self.seed = batch_size, augment, num_workers, seed
        self.color_jitter, self.color_augment, self.hed_sigma = color_jitter, color_augment, hed_sigma
        self.blur_sigma = blur_sigma
        self.batched = color_augment == "hed"
        self._device_augment = None  # BatchAugment run after the batch reaches the device (batched training)

    def setup(self, stage: str | None = None) -> None:
        size = self.cells.size_px
        c = self.cells
        if self.batched:
            ev = eval_transform(self.mean, self.std)
            if self.augment:  # the loader serves uint8 batches; on_after_batch_transfer augments them on the device
                self._device_augment = BatchAugment(size, self.mean, self.std, hed_sigma=self.hed_sigma,
                                                    jitter=self.color_jitter, blur_sigma=self.blur_sigma, seed=self.seed)
            tr = _as_is if self.augment else ev
            self.train_set = BatchCellDataset(c.images[self.split.train], c.labels[self.split.train], tr, self.train_targets)
            self.val_set = BatchCellDataset(c.images[self.split.val], c.labels[self.split.val], ev)
            self.test_set = BatchCellDataset(c.images[self.split.test], c.labels[self.split.test], ev)
            self._log_split()
            return
        tr = train_transform(size, self.mean, self.std, augment=self.augment, color_jitter=self.color_jitter,
                             color_augment=self.color_augment)
        ev = eval_transform(self.mean, self.std)
        self.train_set = CellDataset(c.images[self.split.train], c.labels[self.split.train], tr, self.train_targets)
        self.val_set = CellDataset(c.images[self.split.val], c.labels[self.split.val], ev)
        self.test_set = CellDataset(c.images[self.split.test], c.labels[self.split.test], ev)
        self._log_split()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Augment a training batch where it now is (Lightning hook): on a GPU, on the GPU.

        Only batched training (``color_augment="hed"`` with ``augment``) is served as ``(B, 3, S, S)
        uint8`` and augmented here, by :class:`~malaria_screen.data.transforms.BatchAugment`; on the
        CPU this is the same computation, in the same order, as augmenting in the loader. Every
        other batch passes through.
        """
        trainer = getattr(self, "trainer", None)
        if self._device_augment is None or trainer is None or not trainer.training:
            return batch
        x, *rest = batch
        return (self._device_augment(x), *rest)

    def _log_split(self) -> None:
        c = self.cells
        for name, idx in self.split.as_dict().items():
            pats = {c.patients[i] for i in idx}
            per_class = np.bincount(c.labels[idx], minlength=len(c.class_names)) if len(idx) else []
            log.info("%s: %d patients, %d cells, per class %s", name, len(pats), len(idx), dict(zip(c.class_names, map(int, per_class))))

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        if self.batched:
            sampler = RandomSampler(ds, generator=g) if shuffle else SequentialSampler(ds)
            return DataLoader(ds, batch_size=None, sampler=BatchSampler(sampler, self.batch_size, drop_last=False),
                              num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=g if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)
