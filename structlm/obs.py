"""Structured Optimal Brain Surgeon (OBS) on one linear layer: the math of ZipLM's reconstruction.

A linear layer ``y = W x`` (W: outputs x inputs) sees calibration inputs X (tokens x inputs).
With the Gram matrix ``H = X^T X`` (dampened, see :func:`dampen`), removing a set M of input
columns and re-fitting the kept ones K to reproduce ``W x`` in least squares gives

    W'_K     = W H[:, K] H[K, K]^-1                       (the optimum)
    rho_M    = tr( W[:, M] ((H^-1)_MM)^-1 W[:, M]^T )     (its squared-error increase)

and OBS reaches the same optimum one structure at a time on the inverse, without refactoring:

    delta W  = - W[:, M] ((H^-1)_MM)^-1 (H^-1)_{M,:}
    H^-1    <- H^-1 - (H^-1)_{:,M} ((H^-1)_MM)^-1 (H^-1)_{M,:}

(Kurtic, Frantar, Alistarh 2023, ZipLM; Frantar & Alistarh 2022, OBC).  The squared error is
``sum_t ||W x_t - W' x_t||^2`` over the calibration tokens divided by their number, so errors of
different layers writing into the same residual stream are comparable and can be summed.
Everything is float64: the inverse updates lose precision fast in float32.
"""

from __future__ import annotations

import torch


def dampen(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` in float64.  Dead inputs (``H_jj == 0``: always zero) keep
    only the dampening on their diagonal (so H stays invertible and their removal costs about
    ``damp`` of a typical column: nothing, as they carry no signal); the mean is over live inputs."""
    h = gram.double().clone()
    diag = h.diagonal()
    live = diag > 0
    mean = diag[live].mean() if live.any() else torch.tensor(1.0, dtype=h.dtype)
    diag += damp * mean
    if damp <= 0:   # undampened (tests): dead inputs still need a positive diagonal
        diag[~live] = 1e-8 * mean
    return h


def least_squares(weight: torch.Tensor, h: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``W H[:, K] H[K, K]^-1``: the kept columns re-fitted to the full layer's output (float64)."""
    w = weight.double()
    hk = h.index_select(1, kept)
    rhs = w @ hk                                       # [out, |K|]
    chol = torch.linalg.cholesky(h.index_select(0, kept).index_select(1, kept))
    return torch.cholesky_solve(rhs.T, chol).T


def error(weight: torch.Tensor, new_kept: torch.Tensor, h: torch.Tensor, kept: torch.Tensor) -> float:
    """``tr((W - W'_pad) H (W - W'_pad)^T)``: the squared output error of a re-fitted layer."""
    w = weight.double()
    d = w.clone()
    d[:, kept] -= new_kept.double()
    return float(torch.einsum("oi,ij,oj->", d, h, d))


class OBSPath:
    """Remove input structures of one layer one after another, keeping W and H^-1 up to date.

    Structures are lists of input-column indices (of the original layer).  :meth:`saliency`
    prices removing one (or a union of several) given everything removed so far, :meth:`remove`
    removes it and updates W and H^-1; :attr:`error` is the summed saliency, which equals the
    squared error of the least-squares optimum on the columns still alive (tests/test_obs.py
    holds it to that).  The arrays are compacted to the alive columns after every removal, so a
    path that empties a layer costs about a third of what full-size updates would."""

    def __init__(self, weight: torch.Tensor, h: torch.Tensor):
        n = h.shape[0]
        self.w = weight.double().clone()
        self.hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        self.ids = torch.arange(n)                          # original index of each alive column
        self.position = torch.arange(n)                     # original index -> alive position, -1 if removed
        self.error = 0.0

    @property
    def alive(self) -> torch.Tensor:
        return self.position >= 0

    def _positions(self, cols) -> torch.Tensor:
        pos = self.position[torch.as_tensor(cols, dtype=torch.long)]
        if bool((pos < 0).any()):
            raise ValueError("a column is removed twice")
        return pos

    def _block(self, pos: torch.Tensor):
        w_m = self.w.index_select(1, pos)                                     # [out, m]
        inv_mm = torch.linalg.inv(self.hinv.index_select(0, pos).index_select(1, pos))
        return w_m, inv_mm

    def saliency(self, cols) -> float:
        w_m, inv_mm = self._block(self._positions(cols))
        return float(torch.einsum("oi,ij,oj->", w_m, inv_mm, w_m))

    def column_saliencies(self) -> torch.Tensor:
        """Saliency of each alive single column, ``||W[:, j]||^2 / (H^-1)_jj``, by alive position
        (``self.ids`` gives their original indices)."""
        return self.w.square().sum(0) / self.hinv.diagonal()

    def remove(self, cols) -> float:
        """Remove columns ``cols`` (one structure or a union), update W and H^-1; return the saliency."""
        pos = self._positions(cols)
        w_m, inv_mm = self._block(pos)
        rho = float(torch.einsum("oi,ij,oj->", w_m, inv_mm, w_m))
        rows = self.hinv.index_select(0, pos)                                 # (H^-1)_{M,:}
        coupling = inv_mm @ rows                                              # ((H^-1)_MM)^-1 (H^-1)_{M,:}
        keep = torch.ones(len(self.ids), dtype=torch.bool)
        keep[pos] = False
        keep_pos = keep.nonzero().flatten()
        # update only the surviving block: the removed columns are dropped anyway
        self.w = self.w.index_select(1, keep_pos) - w_m @ coupling.index_select(1, keep_pos)
        rows_k = rows.index_select(1, keep_pos)
        self.hinv = (self.hinv.index_select(0, keep_pos).index_select(1, keep_pos)
                     - rows_k.T @ inv_mm @ rows_k)
        self.position[self.ids[pos]] = -1
        self.ids = self.ids[keep_pos]
        self.position[self.ids] = torch.arange(len(self.ids))
        self.error += rho
        return rho

    def weight(self) -> torch.Tensor:
        """The re-fitted weight of the alive columns, in their original order: [out, alive]."""
        return self.w
