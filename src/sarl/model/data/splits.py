"""Seeded train/validation splits carved from a training set.

Model selection uses a validation split taken from the training data, never the test set
(SARL.md); the split is a pure function of (num_items, val_fraction, seed) so every run and
every data-parallel worker agrees on it.
"""

from __future__ import annotations

import numpy as np


def train_val_split(num_items: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(num_items)`` into disjoint, sorted train and validation index arrays.

    Args:
        num_items: size of the training set.
        val_fraction: share for validation, in [0, 1); ``round(num_items * val_fraction)``
            items, at least one when the fraction is positive and there are two items or more.
        seed: seed of ``np.random.default_rng``.

    Returns:
        ``(train_idx, val_idx)``, ``np.int64`` arrays whose union is ``range(num_items)``.
    """
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    num_val = int(round(num_items * val_fraction))
    if val_fraction > 0 and num_items >= 2:
        num_val = min(max(num_val, 1), num_items - 1)
    order = np.random.default_rng(seed).permutation(num_items)
    return np.sort(order[num_val:]).astype(np.int64), np.sort(order[:num_val]).astype(np.int64)
