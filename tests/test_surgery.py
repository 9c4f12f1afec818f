"""Shrinking is exact: the physically smaller model gives the logits of the masked one."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plans import HIDDEN_FAMILIES, kind_plan, random_plan, random_updates
from structlm import surgery
from structlm.graph import build_graph
from structlm.models import count_parameters
from structlm.plan import LayerPlan, PlanError, PrunePlan, align_count, align_kept, align_plan
from tiny_models import FAMILIES, tiny_inputs, tiny_model

KINDS = ("kv_group", "query_head", "qk_channel", "v_channel", "ffn_channel", "attention", "ffn", "block",
         "hidden_channel")
QK_NORM_FAMILIES = ("qwen3", "gemma3")  # q/k norms over the head dim: qk_channel is refused


def assert_shrink_equals_mask(model, plan, graph=None):
    graph = graph or build_graph(model)
    ids = tiny_inputs(model.config)
    masked = surgery.mask(copy.deepcopy(model), plan, graph)
    shrunk = surgery.shrink(copy.deepcopy(model), plan, graph)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(ids).logits, masked(ids).logits, atol=1e-5, rtol=0)
    return shrunk


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_unit_kind_in_every_family(family, kind):
    model = tiny_model(family, num_hidden_layers=3) if kind == "block" else tiny_model(family)
    graph = build_graph(model)
    plan = kind_plan(graph, kind, layer=1)
    if kind == "qk_channel" and family in QK_NORM_FAMILIES:
        for apply in (surgery.shrink, surgery.mask):
            with pytest.raises(PlanError, match="qk_channel pruning is not exact on"):
                apply(copy.deepcopy(model), plan, graph)
        return
    if kind == "hidden_channel" and family not in HIDDEN_FAMILIES:
        with pytest.raises(PlanError, match="hidden-channel pruning is exact only for"):
            surgery.shrink(copy.deepcopy(model), plan, graph)
        return
    before = count_parameters(model)
    shrunk = assert_shrink_equals_mask(model, plan, graph)
    assert count_parameters(shrunk) < before
    if kind != "hidden_channel":  # the dry-run count is exact for everything but hidden channels
        assert plan.cost(graph)["params"] == count_parameters(shrunk)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(FAMILIES), seed=st.integers(0, 10_000), layers=st.integers(1, 4))
def test_random_plans_on_random_tiny_models(family, seed, layers):
    model = tiny_model(family, seed=seed % 7, num_hidden_layers=layers)
    graph = build_graph(model)
    rng = random.Random(seed)
    plan = random_plan(graph, rng, hidden=family in HIDDEN_FAMILIES and seed % 3 == 0)
    if len(plan.removed_blocks) == graph.n_layers:
        return
    if seed % 2:   # weight updates (reconstruction) in the shrunk coordinates keep mask == shrink
        random_updates(plan, graph, rng)
    assert_shrink_equals_mask(model, plan, graph)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(FAMILIES), seed=st.integers(0, 10_000), layers=st.integers(1, 3))
def test_random_plans_with_head_dim_channels(family, seed, layers):
    """qk/v channels mixed with removed groups, heads, FFN channels, sublayers, blocks and updates:
    mask == shrink, and the dry-run parameter count is the shrunk model's."""
    model = tiny_model(family, seed=seed % 7, num_hidden_layers=layers)
    graph = build_graph(model)
    rng = random.Random(seed)
    plan = random_plan(graph, rng, channels=True)
    if len(plan.removed_blocks) == graph.n_layers:
        return
    if seed % 2:
        random_updates(plan, graph, rng)
    shrunk = assert_shrink_equals_mask(model, plan, graph)
    assert plan.cost(graph)["params"] == count_parameters(shrunk)


def test_channel_plans_are_checked():
    model = tiny_model("llama")
    graph = build_graph(model)
    size = graph.channel_group("qk_channel", 0, 0).count
    bad = [({"qk_channels": {0: [0, 1], 1: [0], 2: [1]}}, "kept channels per KV group differ"),
           ({"v_channels": {0: [0], 1: [0]}}, "lists KV groups"),
           ({"qk_channels": {0: [size], 1: [0], 2: [0]}}, "out of range"),
           ({"v_channels": {0: [], 1: [], 2: []}}, "no channel kept")]
    for layer, message in bad:
        with pytest.raises(PlanError, match=message):
            PrunePlan(layers={0: LayerPlan(**layer)}).validate(graph)
    with pytest.raises(PlanError, match="must be an object"):
        PrunePlan.from_dict({"layers": {"0": {"qk_channels": [1, 2]}}})
    plan = PrunePlan(layers={0: LayerPlan(kv_groups=[0, 2], qk_channels={0: [1, 2], 2: [0, 3]},
                                          v_channels={0: [0, 1, 2], 2: [5, 6, 7]})})
    again = PrunePlan.from_dict(plan.to_dict()).validate(graph)   # JSON keys are strings; they come back as ints
    assert again.layer(0).qk_channels == {0: [1, 2], 2: [0, 3]}
    assert again.head_dims(graph, 0) == (4, 3)
    assert "d4/3" in again.summary_text(graph)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "hidden_channel"] + ["hidden_channel"])
def test_every_unit_kind_with_weight_updates(family, kind):
    model = tiny_model(family, num_hidden_layers=3) if kind == "block" else tiny_model(family)
    graph = build_graph(model)
    if (kind == "hidden_channel" and family not in HIDDEN_FAMILIES) or (kind == "qk_channel" and family in QK_NORM_FAMILIES):
        return
    plan = random_updates(kind_plan(graph, kind, layer=1), graph, random.Random(7), share=0.5)
    assert plan.updates
    shrunk = assert_shrink_equals_mask(model, plan, graph)
    params = dict(shrunk.named_parameters())
    for name, value in plan.updates.items():   # the shrunk model holds exactly the updates
        if name in params and kind != "hidden_channel":   # (hidden pruning rescales the residual norms after)
            torch.testing.assert_close(params[name].detach(), value, atol=0, rtol=0)


def test_generation_with_layer0_attention_removed_matches_masked():
    # transformers reads the cache length from layer 0: the placeholder must keep it advancing
    model = tiny_model("llama", num_hidden_layers=3)
    graph = build_graph(model)
    plan = PrunePlan(layers={0: LayerPlan(attention=False), 1: LayerPlan(ffn_channels=list(range(64)))},
                     removed_blocks=[2])
    masked = surgery.mask(copy.deepcopy(model), plan, graph)
    shrunk = surgery.shrink(copy.deepcopy(model), plan, graph)
    ids = tiny_inputs(model.config, batch=1)
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(shrunk.generate(ids, **kw), masked.generate(ids, **kw))


def test_cache_of_removed_attention_follows_batch_selection():
    # zero-shot scoring runs a shared context once, then picks its rows per choice from the cache
    model = tiny_model("llama", num_hidden_layers=3)
    graph = build_graph(model)
    plan = PrunePlan(layers={0: LayerPlan(attention=False), 2: LayerPlan(attention=False)})
    shrunk = surgery.shrink(copy.deepcopy(model), plan, graph)
    ids = tiny_inputs(model.config, batch=2, seq=12)
    rows = torch.tensor([1, 1, 0])
    with torch.no_grad():
        cache = shrunk(ids[:, :8], use_cache=True).past_key_values
        cache.batch_select_indices(rows)
        assert cache.get_seq_length() == 8
        tail = shrunk(ids[rows, 8:], past_key_values=cache, use_cache=True).logits
        full = shrunk(ids[rows]).logits[:, 8:]
    torch.testing.assert_close(tail, full, atol=1e-5, rtol=1e-5)


def test_shrink_updates_modules_and_config():
    model = tiny_model("llama", num_hidden_layers=3)
    graph = build_graph(model)
    plan = PrunePlan(layers={i: LayerPlan(kv_groups=[0, 2], ffn_channels=list(range(96))) for i in (0, 2)},
                     removed_blocks=[1])
    shrunk = surgery.shrink(model, plan, graph)
    assert shrunk.config.num_hidden_layers == 2 and len(shrunk.model.layers) == 2
    attn = shrunk.model.layers[1].self_attn
    assert attn.layer_idx == 1 and attn.num_key_value_groups == 3
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (48, 16, 48)
    assert shrunk.model.layers[0].mlp.down_proj.in_features == 96
    assert shrunk.lm_head.weight is shrunk.model.embed_tokens.weight


@pytest.mark.parametrize("plan, message", [
    (PrunePlan(removed_blocks=[0, 1]), "removes every block"),
    (PrunePlan(layers={0: LayerPlan(kv_groups=[])}), "no KV group kept"),
    (PrunePlan(layers={0: LayerPlan(kv_groups=[5])}), "out of range"),
    (PrunePlan(layers={0: LayerPlan(kv_groups=[0, 0])}), "listed twice"),
    (PrunePlan(layers={0: LayerPlan(kv_groups=[0], query_heads=[0, 3])}), "belong to removed KV groups"),
    (PrunePlan(layers={0: LayerPlan(query_heads=[0, 1, 3])}), "per KV group differ"),
    (PrunePlan(layers={0: LayerPlan(ffn_channels=[])}), "no FFN channel kept"),
    (PrunePlan(layers={7: LayerPlan(ffn=False)}), "layers 0..1"),
    (PrunePlan(layers={0: LayerPlan(ffn=False)}, removed_blocks=[0]), "cannot also have a layer plan"),
    (PrunePlan(hidden_channels=[]), "keep at least one residual channel"),
])
def test_invalid_plans_are_refused_with_a_reason(plan, message):
    graph = build_graph(tiny_model("llama"))
    with pytest.raises(PlanError, match=message):
        plan.validate(graph)


def test_plan_json_round_trip_and_unknown_keys():
    plan = PrunePlan(layers={1: LayerPlan(kv_groups=[0], ffn=False)}, removed_blocks=[0], family="llama",
                     meta={"method": "hand"})
    again = PrunePlan.from_dict(__import__("json").loads(plan.to_json()))
    assert again.to_dict() == plan.to_dict()
    with pytest.raises(PlanError, match="unknown keys"):
        PrunePlan.from_dict({"layers": {"0": {"heads": [1]}}})


def test_alignment_rounds_toward_keeping_more():
    assert [align_count(n, 8, 1536) for n in (0, 1, 8, 9, 1529, 1535)] == [0, 8, 8, 16, 1536, 1536]
    scores = [0.0, 5.0, 1.0, 4.0, 3.0, 2.0]
    assert align_kept([0], scores, 4, 6) == [0, 1, 3, 4]  # best-scored removed channels come back
    assert align_kept([0], None, 4, 6) == [0, 1, 2, 3]
    graph = build_graph(tiny_model("llama"))
    plan = align_plan(PrunePlan(layers={0: LayerPlan(ffn_channels=list(range(13)))}), graph, 8)
    assert len(plan.layers[0].ffn_channels) == 16
