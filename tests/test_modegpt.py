"""MoDeGPT: each decomposition on hand-computable cases, the allocation, and the method end to end
on tiny models (mask == shrink, target met, save -> reload -> same logits)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from structlm import export, surgery
from structlm.graph import build_graph
from structlm.methods import modegpt as M
from structlm.pipeline import make_plan
from tiny_models import tiny_inputs, tiny_model

logging.getLogger("transformers").setLevel(logging.ERROR)


def random_psd(n, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rank or 3 * n, n, generator=g, dtype=torch.float64)
    return x.T @ x / x.shape[0]


# ---- Type I -------------------------------------------------------------------------------------

def test_ridge_leverage_of_a_diagonal_correlation_is_c_over_c_plus_lambda():
    c = torch.diag(torch.tensor([4.0, 1.0, 0.25, 0.0], dtype=torch.float64))
    lam = 0.5 * float(c.diagonal().mean())                  # ridge 0.5 -> lam = 0.65625
    expect = torch.tensor([4.0, 1.0, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(M.ridge_leverage(c, 0.5), expect / (expect + lam))


def test_nystrom_with_every_channel_kept_is_exact_and_keeps_the_top_scores():
    c = random_psd(12)
    w = torch.randn(5, 12, dtype=torch.float64)
    kept, new, _ = M.nystrom(w, c, 12, ridge=1e-2, damp=1e-4)
    assert kept.tolist() == list(range(12))
    torch.testing.assert_close(new, w, atol=1e-10, rtol=0)
    # fewer channels: the top leverage scores, and down_proj re-fitted as W C[:, J] C[J, J]^-1
    c = torch.diag(torch.tensor([5.0, 0.1, 3.0, 0.2, 2.0], dtype=torch.float64))
    w = torch.randn(3, 5, dtype=torch.float64)
    kept, new, _ = M.nystrom(w, c, 3, ridge=1e-2, damp=1e-12)
    assert kept.tolist() == [0, 2, 4]
    torch.testing.assert_close(new, w[:, [0, 2, 4]], atol=1e-9, rtol=0)   # uncorrelated: no mixing
    c = random_psd(6, seed=3)
    kept, new, _ = M.nystrom(w := torch.randn(2, 6, dtype=torch.float64), c, 4, ridge=1e-2, damp=1e-12)
    j = kept
    torch.testing.assert_close(new, w @ c[:, j] @ torch.linalg.inv(c[j][:, j]), atol=1e-8, rtol=0)


# ---- Type II ------------------------------------------------------------------------------------

def test_qk_pair_scores_by_hand():
    # 1 KV group, 2 query heads, head_dim 4: pairs (0, 2) and (1, 3)
    dq = torch.tensor([1.0, 4.0, 9.0, 16.0, 4.0, 1.0, 1.0, 4.0], dtype=torch.float64)
    dk = torch.tensor([1.0, 1.0, 4.0, 1.0], dtype=torch.float64)
    s = M.qk_pair_scores(dq, dk, per_group=2, head_dim=4, pairs=True)
    # sqrt(q k) per dim: head 0 [1, 2, 6, 4], head 1 [2, 1, 2, 2] -> per dim [3, 3, 8, 6]
    assert s.tolist() == [[3.0 + 8.0, 3.0 + 6.0]]
    assert M.qk_pair_scores(dq, dk, 2, 4, pairs=False).tolist() == [[3.0, 3.0, 8.0, 6.0]]


# ---- Type III -----------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [1, 3])
def test_value_output_at_full_rank_is_exact(heads):
    c = random_psd(10, seed=1)
    w_v = torch.randn(10, 4, dtype=torch.float64)
    w_o = torch.randn(4, heads * 10, dtype=torch.float64)
    new_v, new_o, err, total = M.value_output(M.psd_sqrt(c), w_v, w_o, 4)
    torch.testing.assert_close(new_v @ new_o, w_v @ w_o, atol=1e-9, rtol=0)
    assert err < 1e-12 * total


@pytest.mark.parametrize("heads", [1, 3])
def test_value_output_is_the_best_rank_k_approximation(heads):
    c = random_psd(10, seed=2)
    f = M.psd_sqrt(c)
    torch.testing.assert_close(f @ f, c, atol=1e-10, rtol=0)
    w_v = torch.randn(10, 6, dtype=torch.float64)
    w_o = torch.randn(6, heads * 10, dtype=torch.float64)
    for k in (1, 3, 5):
        new_v, new_o, err, total = M.value_output(f, w_v, w_o, k)
        u, s, vt = torch.linalg.svd(f @ w_v @ w_o, full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vt[:k]                           # Eckart-Young
        torch.testing.assert_close(f @ new_v @ new_o, best, atol=1e-9, rtol=0)
        assert new_v.shape == (10, k) and new_o.shape == (k, heads * 10)
        assert err == pytest.approx(float(s[k:].square().sum()), rel=1e-9)
        assert total == pytest.approx(float(s.square().sum()), rel=1e-9)


def test_value_output_with_a_rank_deficient_correlation():
    c = random_psd(8, rank=3, seed=4)                                   # rank 3 < head_dim 4
    w_v, w_o = torch.randn(8, 4, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    f = M.psd_sqrt(c)
    new_v, new_o, err, total = M.value_output(f, w_v, w_o, 3)
    torch.testing.assert_close(f @ new_v @ new_o, f @ w_v @ w_o, atol=1e-8, rtol=0)
    assert torch.isfinite(new_v).all() and err < 1e-12 * total


# ---- allocation ---------------------------------------------------------------------------------

def test_allocation_sums_to_the_target_and_respects_the_cap():
    s = [0.9, 0.05, 0.02, 0.03, 0.3, 0.01]
    for phi_avg in (0.1, 0.3, 0.5, 0.7):
        phi = M.allocate(s, phi_avg, eps=0.02, cap=0.8)
        assert sum(phi) == pytest.approx(len(s) * phi_avg, rel=1e-12)
        assert max(phi) <= 0.8 + 1e-12 and min(phi) >= 0
        # less important blocks (lower BI) are compressed at least as much
        order = sorted(range(len(s)), key=lambda i: s[i])
        assert all(phi[a] >= phi[b] - 1e-12 for a, b in zip(order, order[1:]))
    phi = M.allocate(s, 0.5, eps=0.02, cap=0.8)
    assert sum(p == pytest.approx(0.8) for p in phi) >= 2         # some layers capped, excess spread
    # without the cap: exactly L * phi_avg * softmax(-s / eps)
    w = torch.softmax(-torch.tensor(s, dtype=torch.float64) / 1.0, 0)
    torch.testing.assert_close(torch.tensor(M.allocate(s, 0.1, eps=1.0, cap=0.8), dtype=torch.float64), 6 * 0.1 * w)
    assert M.allocate(s, 0.3, eps=0.02, cap=0.8, allocation="uniform") == [0.3] * 6
    with pytest.raises(M.MoDeGPTError, match="exceeds the cap"):
        M.allocate(s, 0.85, eps=0.1, cap=0.8)


# ---- the method ---------------------------------------------------------------------------------

def calib(n=8, length=16, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "qwen3", "gemma3", "mistral"])
def test_modegpt_end_to_end(family, tmp_path):
    model = tiny_model(family, num_hidden_layers=3)
    graph = build_graph(model)
    dense = copy.deepcopy(model.state_dict())
    plan, info, _ = make_plan(model, method="modegpt", target="params=0.75", calib=calib(), graph=graph,
                              options={"progress": False})
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items()), "the model must be left as it was"
    cost = plan.cost(graph)
    assert cost["params"] <= 0.75 * graph.total_params and cost["params"] >= 0.65 * graph.total_params
    assert plan.updates and all(torch.isfinite(t).all() for t in plan.updates.values())
    refused = family in ("qwen3", "gemma3")
    assert info["modules"] == (["ffn", "vo"] if refused else ["ffn", "qk", "vo"])
    assert any(lp.v_channels for lp in plan.layers.values())
    assert any(lp.qk_channels for lp in plan.layers.values()) != refused
    if refused:
        assert "q_norm" in info["notes"]["qk"]
    ids = tiny_inputs(model.config)
    masked = surgery.mask(copy.deepcopy(model), plan, graph)
    shrunk = surgery.shrink(copy.deepcopy(model), plan, graph)
    with torch.no_grad():
        ref = shrunk(ids).logits
        torch.testing.assert_close(masked(ids).logits, ref, atol=1e-5, rtol=0)
    export.save(shrunk, None, tmp_path / "m", plan=plan)
    loaded = export.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, atol=1e-5, rtol=0)


def test_modegpt_reconstruction_beats_plain_removal():
    """The Type I/III updates fit the kept channels: the compressed model is closer to the dense one
    than the same plan without its updates."""
    model = tiny_model("llama", num_hidden_layers=3)
    graph = build_graph(model)
    c = calib(16, 24)
    plan, _, _ = make_plan(model, method="modegpt", target="params=0.8", calib=c, graph=graph,
                           options={"progress": False, "allocation": "uniform"})
    bare = copy.deepcopy(plan)
    bare.updates = {}
    with torch.no_grad():
        dense = model(c).logits
        fitted = surgery.mask(copy.deepcopy(model), plan, graph)(c).logits
        plain = surgery.mask(copy.deepcopy(model), bare, graph)(c).logits
    assert (fitted - dense).square().mean() < 0.5 * (plain - dense).square().mean()


def test_modegpt_options_and_refusals():
    model = tiny_model("qwen3", num_hidden_layers=2)
    graph = build_graph(model)
    run = lambda target="params=0.8", **o: make_plan(model, method="modegpt", target=target, calib=calib(),  # noqa: E731
                                                     graph=graph, options={"progress": False, **o})
    with pytest.raises(M.MoDeGPTError, match="modules includes qk, but qk_channel pruning is not exact on qwen3"):
        run(modules="ffn,qk")
    plan, info, _ = run("params=0.9", modules="vo")
    assert info["modules"] == ["vo"] and all(lp.ffn_channels is None for lp in plan.layers.values())
    with pytest.raises(M.MoDeGPTError, match="modules includes qk"):
        run(modules="ffn+qk")                     # the + form (benchmark specs) means the same
    with pytest.raises(M.MoDeGPTError, match=r"out of reach.*higher cap \(-O cap=0\.9\)"):
        run("params=0.2")
    with pytest.raises(M.MoDeGPTError, match="out of reach") as refused:
        run("params=0.05", cap=0.95)
    assert "higher cap" not in str(refused.value)   # no fix that is no fix
    with pytest.raises(M.MoDeGPTError, match="unknown option"):
        run(lamda=1)
    with pytest.raises(M.MoDeGPTError, match="allocation"):
        run(allocation="dp")
    with pytest.raises(M.MoDeGPTError, match="eps must be a positive number"):
        run(eps=0)
    with pytest.raises(M.MoDeGPTError, match="params target"):
        run("blocks=1")
    plan, info, _ = run(allocation="uniform")
    assert len({round(row["phi"], 9) for row in info["layers"]}) == 1
