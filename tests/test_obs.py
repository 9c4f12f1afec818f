"""Structured OBS (structlm.obs) against hand-computable answers: least squares, error increase,
one-by-one removal vs recomputing the inverse from scratch."""

from __future__ import annotations

import torch

from structlm.obs import OBSPath, dampen, least_squares


def _layer(seed=0, n_in=24, n_out=7, tokens=200):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g, dtype=torch.float64)
    x[:, 3] *= 0.01                                      # an almost silent input
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    return w, x


def _sq_error(w, x, kept, new):
    return float(((x @ w.T - x[:, kept] @ new.T) ** 2).sum() / x.shape[0])


def test_least_squares_refit_equals_lstsq_optimum():
    w, x = _layer()
    h = dampen(x.T @ x / x.shape[0], damp=0.0)
    kept = torch.tensor([0, 1, 2, 5, 8, 9, 13, 20, 21, 23])
    ours = least_squares(w, h, kept)
    ref = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T    # argmin ||X W^T - X_K W'^T||
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=1e-9)


def test_obs_removal_matches_lstsq_and_saliency_is_the_error_increase():
    w, x = _layer(1)
    h = dampen(x.T @ x / x.shape[0], damp=0.0)
    path = OBSPath(w, h)
    structures = [[4, 5, 6], [10], [0, 17], [22, 23]]
    removed: list[int] = []
    for cols in structures:
        before = path.error
        predicted = path.saliency(cols)
        path.remove(cols)
        removed += cols
        kept = torch.tensor([c for c in range(w.shape[1]) if c not in removed])
        ref = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T
        # the updated weight is the least-squares optimum on the kept columns ...
        torch.testing.assert_close(path.weight(), ref, atol=1e-8, rtol=1e-8)
        assert path.ids.tolist() == kept.tolist()
        # ... and the saliency was exactly the increase of the squared error
        err = _sq_error(w, x, kept, ref)
        assert abs(path.error - err) < 1e-8 * max(1.0, err)
        assert abs((path.error - before) - predicted) < 1e-8 * max(1.0, err)


def test_inverse_updates_equal_recomputing_the_inverse_on_kept_columns():
    w, x = _layer(2)
    h = dampen(x.T @ x / x.shape[0], damp=0.01)
    path = OBSPath(w, h)
    for cols in ([1, 2], [7], [11, 12, 13]):
        path.remove(cols)
    kept = path.ids
    fresh = torch.linalg.inv(h.index_select(0, kept).index_select(1, kept))
    torch.testing.assert_close(path.hinv, fresh, atol=1e-8, rtol=1e-7)


def test_dampening_and_dead_inputs():
    w, x = _layer(3)
    x[:, 5] = 0.0                                        # a dead input: H_55 = 0
    h = dampen(x.T @ x / x.shape[0], damp=0.01)
    assert h[5, 5] > 0 and torch.linalg.eigvalsh(h).min() > 0
    path = OBSPath(w, h)
    # a dead input carries no signal: its squared-error cost is only the dampening's share
    typical = float(path.column_saliencies().median())
    assert path.saliency([5]) < 0.05 * typical
    assert torch.isfinite(path.column_saliencies()).all()
