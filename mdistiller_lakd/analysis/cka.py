"""Linear centered kernel alignment (Kornblith et al., 2019) between two sets of features.

Features of ``n`` examples are compared through their ``n x n`` Gram matrices, so a stage output of
any shape (flattened per example) costs ``n^2`` memory, whatever its width. Sums run in float64:
the Gram matrices of wide conv features have large entries whose centering loses float32 digits.
"""
from __future__ import annotations

from typing import Sequence

import torch


def gram_linear(features: torch.Tensor) -> torch.Tensor:
    """``K = X X^T`` for ``features`` (n, ...) flattened to ``X`` (n, d), in float64."""
    flat = features.reshape(features.shape[0], -1).double()
    return flat @ flat.T


def center_gram(gram: torch.Tensor) -> torch.Tensor:
    """``H K H`` with ``H = I - 11^T / n``: the Gram matrix of the mean-centred features."""
    gram = gram - gram.mean(dim=0, keepdim=True)
    return gram - gram.mean(dim=1, keepdim=True)


def cka_from_grams(gram_x: torch.Tensor, gram_y: torch.Tensor) -> float:
    """``<HKH, HLH>_F / (||HKH||_F ||HLH||_F)``; 0 when either set of features is constant."""
    if gram_x.shape != gram_y.shape:
        raise ValueError(f"CKA needs features of the same examples; got Gram matrices "
                         f"{tuple(gram_x.shape)} and {tuple(gram_y.shape)}")
    centered_x, centered_y = center_gram(gram_x), center_gram(gram_y)
    denominator = centered_x.norm() * centered_y.norm()
    if denominator == 0:
        return 0.0
    return float((centered_x * centered_y).sum() / denominator)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between ``x`` (n, ...) and ``y`` (n, ...), features of the same ``n`` examples."""
    return cka_from_grams(gram_linear(x), gram_linear(y))


def cka_matrix(grams_rows: Sequence[torch.Tensor], grams_cols: Sequence[torch.Tensor]) -> list[list[float]]:
    """CKA of every (row, column) pair of Gram matrices: ``result[i][j]`` compares row i, column j."""
    return [[cka_from_grams(row, col) for col in grams_cols] for row in grams_rows]
