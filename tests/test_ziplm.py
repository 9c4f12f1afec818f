"""ZipLM: level database, allocation, sequential reconstruction (tiny models)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from structlm.graph import build_graph
from structlm.methods import get
from structlm.methods import ziplm as Z
from structlm import surgery
from tiny_models import tiny_model

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")


def _calib(model, n=16, length=24, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


def _with_updates(model, plan, graph):
    """The unshrunk model with the plan's units zeroed and its updates written in (expanded) by
    hand, independently of surgery.mask's own expansion."""
    bare = copy.copy(plan)
    bare.updates = {}
    masked = surgery.mask(copy.deepcopy(model), bare, graph)
    hd = graph.head_dim
    for name, new in plan.updates.items():
        i = int(name.split(".layers.")[1].split(".")[0])
        cols = ([h * hd + d for h in plan.kept_heads(graph, i) for d in range(hd)] if name.endswith("o_proj.weight")
                else plan.kept_ffn(graph, i))
        p = masked.get_parameter(name)
        p.data.zero_()
        p.data[:, cols] = new
    return masked


@pytest.mark.parametrize("family", FAMILIES)
def test_ziplm_meets_the_target_and_reconstruction_lowers_the_error(family):
    model = tiny_model(family, num_hidden_layers=3)
    graph = build_graph(model)
    calib = _calib(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan, info = get("ziplm")(model, graph, "params=0.8", calib, progress=False)
    # the method leaves the model as it was
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    plan.validate(graph)
    cost = plan.cost(graph)
    assert cost["params"] <= 0.8 * graph.total_params
    assert graph.total_params - cost["params"] == info["planned_removed_params"]   # accounting == plan.cost
    assert plan.updates, "a pruned sublayer gets re-fitted weights"
    with torch.no_grad():
        dense = model(calib).logits
        bare = copy.copy(plan)
        bare.updates = {}
        removed_only = surgery.mask(copy.deepcopy(model), bare, graph)(calib).logits
        rebuilt = _with_updates(model, plan, graph)(calib).logits
        masked = surgery.mask(copy.deepcopy(model), plan, graph)(calib).logits
        shrunk = surgery.shrink(copy.deepcopy(model), plan, graph)(calib).logits
    assert (rebuilt - dense).square().mean() < (removed_only - dense).square().mean()
    torch.testing.assert_close(masked, rebuilt, atol=1e-5, rtol=0)     # mask writes the updates expanded
    torch.testing.assert_close(shrunk, masked, atol=1e-5, rtol=0)      # exactness holds with updates


def test_level_paths_are_monotone_and_end_removed():
    model = tiny_model("llama", num_hidden_layers=2)
    graph = build_graph(model)
    db = Z.build_levels(model, graph, _calib(model), progress=False)
    assert [(s.layer, s.kind) for s in db.sublayers] == [(0, "attention"), (0, "ffn"), (1, "attention"), (1, "ffn")]
    per_group = graph.n_heads // graph.n_kv
    for sub in db.sublayers:
        errors = [lv.error for lv in sub.levels]
        assert errors[0] == 0 and all(b >= a - 1e-9 for a, b in zip(errors, errors[1:]))
        assert sub.levels[-1].removed and not any(lv.removed for lv in sub.levels[:-1])
        if sub.kind == "ffn":
            assert [lv.ffn_kept for lv in sub.levels[:-1]] == list(range(graph.intermediate, 0, -8))
            assert sorted(sub.order) == list(range(graph.intermediate))
        else:
            for lv in sub.levels[:-1]:   # GQA rule: the same number of heads in every kept group
                counts = {g: sum(1 for h in lv.query_heads if h // per_group == g) for g in lv.kv_groups}
                assert len(set(counts.values())) == 1


def test_level_database_round_trip_and_reuse(tmp_path):
    model = tiny_model("qwen3", num_hidden_layers=2)
    graph = build_graph(model)
    calib = _calib(model)
    plan_a, _ = get("ziplm")(model, graph, "params=0.85", calib, progress=False, save_levels=str(tmp_path / "lv"))
    assert (tmp_path / "lv" / "levels.json").is_file()
    plan_b, _ = get("ziplm")(model, graph, "params=0.85", calib, progress=False, levels=str(tmp_path / "lv"))
    assert plan_a.to_dict()["layers"] == plan_b.to_dict()["layers"]
    for name in plan_a.updates:
        torch.testing.assert_close(plan_a.updates[name], plan_b.updates[name])
    other = tiny_model("llama", num_hidden_layers=2)
    with pytest.raises(Z.ZipLMError, match="built for another model"):
        get("ziplm")(other, build_graph(other), "params=0.85", _calib(other), progress=False,
                     levels=str(tmp_path / "lv"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(Z.ZipLMError, match="not a readable level database"):
        Z.LevelDatabase.load(tmp_path / "bad.json")


def test_dp_choice_is_optimal_on_small_problems():
    rng = random.Random(0)
    from itertools import product
    for _ in range(30):
        options = [[(0, 0.0)] + sorted((rng.randint(1, 50), rng.random() * 10) for _ in range(3)) for _ in range(4)]
        need = rng.randint(10, 120)
        best = min((sum(o[j][1] for o, j in zip(options, ch)), ch) for ch in product(range(4), repeat=4)
                   if sum(o[j][0] for o, j in zip(options, ch)) >= need)
        # with one bucket per parameter the rounding is exact: the DP finds the optimum
        ch = Z.dp_choice(options, need, buckets=need)
        assert sum(o[j][0] for o, j in zip(options, ch)) >= need
        assert abs(sum(o[j][1] for o, j in zip(options, ch)) - best[0]) < 1e-9


def test_uniform_allocation_and_sequential_option():
    model = tiny_model("llama", num_hidden_layers=3)
    graph = build_graph(model)
    calib = _calib(model)
    plan_u, info = get("ziplm")(model, graph, "params=0.8", calib, progress=False, allocation="uniform")
    assert info["allocation"] == "uniform" and plan_u.cost(graph)["params"] <= 0.8 * graph.total_params
    widths = {len(plan_u.kept_ffn(graph, i)) for i in range(graph.n_layers)}
    assert len(widths) == 1                              # the same width in every layer
    plan_s, _ = get("ziplm")(model, graph, "params=0.8", calib, progress=False)
    plan_n, _ = get("ziplm")(model, graph, "params=0.8", calib, progress=False, sequential=False)
    assert plan_s.to_dict()["layers"] == plan_n.to_dict()["layers"]   # same levels, other inputs
    assert any(not torch.allclose(plan_s.updates[k], plan_n.updates[k]) for k in plan_s.updates)


@pytest.mark.parametrize("options, message", [
    ({"damp": -1}, "damp must be a positive number"),
    ({"allocation": "greedy"}, "unknown allocation"),
    ({"error_scale": "log"}, "unknown error_scale"),
    ({"bogus": 1}, "unknown option"),
    ({"ffn_step": 0}, "ffn_step must be >= 1"),
])
def test_bad_options_are_refused(options, message):
    model = tiny_model("llama", num_hidden_layers=2)
    with pytest.raises(Z.ZipLMError, match=message):
        get("ziplm")(model, build_graph(model), "params=0.8", _calib(model), progress=False, **options)


def test_unreachable_and_non_params_targets():
    model = tiny_model("llama", num_hidden_layers=2)
    graph = build_graph(model)
    with pytest.raises(Z.ZipLMError, match="params target"):
        get("ziplm")(model, graph, "blocks=1", _calib(model), progress=False)
    with pytest.raises(Z.ZipLMError, match="out of reach"):
        get("ziplm")(model, graph, "params=0.05", _calib(model), progress=False)


def test_unsupported_family_is_refused_before_scoring():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="does not support family"):
        get("ziplm")(model, build_graph(model), "params=0.8", _calib(model), progress=False)


def test_ziplm_checkpoint_saves_updates_and_reloads_with_the_in_memory_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from structlm import export
    from structlm.plan import PrunePlan
    model = tiny_model("llama", num_hidden_layers=3)
    graph = build_graph(model)
    calib = _calib(model)
    plan, _ = get("ziplm")(model, graph, "params=0.75", calib, progress=False)
    surgery.shrink(model, plan, graph)
    out = export.save(model, None, tmp_path / "z", plan=plan)
    assert (out / "updates.safetensors").is_file()
    again = PrunePlan.load(out / "plan.json")
    assert all(torch.equal(again.updates[n], plan.updates[n]) for n in plan.updates)
    with torch.no_grad():
        ref = model(calib).logits
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
        torch.testing.assert_close(loaded(calib).logits, ref, atol=1e-5, rtol=0)
