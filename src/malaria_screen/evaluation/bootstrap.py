"""The cluster bootstrap (Field & Welsh 2007), numpy only: resample whole groups (patients,
fields), never single cells of one group, because cells of one patient or field are not
independent. :func:`~malaria_screen.evaluation.metrics.patient_bootstrap_ci` and the prevalence
intervals of :mod:`malaria_screen.evaluation.quantify` draw their replicates here.

Field, C. A. & Welsh, A. H. (2007). Bootstrapping clustered data. JRSS B 69(3), 369-390.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["cluster_bootstrap_weights"]


def cluster_bootstrap_weights(groups: Sequence, *, n_boot: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Replicates of the cluster bootstrap (Field & Welsh 2007): how often each group is drawn.

    Each replicate draws as many groups as there are, with replacement; a cell's weight in a
    replicate is its group's count, so any statistic that takes weights is bootstrapped without
    copying cells (``weights[:, group_index]`` is ``(n_boot, n_cells)``).

    Parameters
    ----------
    groups : sequence of length n_cells
        Group (patient, field) of each cell; each cell its own group gives the ordinary bootstrap.
    n_boot : int, default=1000
    seed : int, default=0

    Returns
    -------
    weights : ndarray of shape (n_boot, n_groups), int64
    group_index : ndarray of shape (n_cells,), int
        Index of each cell's group (groups in sorted order).
    """
    _, gid = np.unique(np.asarray(groups), return_inverse=True)
    n_g = int(gid.max()) + 1 if gid.size else 0
    draws = np.random.default_rng(seed).integers(0, max(n_g, 1), size=(n_boot, n_g))
    # one bincount over all replicates, each offset by its row: the counts of a per-row loop
    offsets = (np.arange(n_boot, dtype=np.int64) * n_g)[:, None]
    weights = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_g).reshape(n_boot, n_g).astype(np.int64)
    return weights, gid.reshape(-1)
