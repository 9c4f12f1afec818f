"""Random and per-kind prune plans for the surgery and export tests."""

from __future__ import annotations

import random

from structlm.plan import LayerPlan, PrunePlan

HIDDEN_FAMILIES = ("llama", "mistral", "qwen2", "phi3")  # RMSNorm without q/k norms: exact hidden pruning


def random_channels(graph, rng: random.Random, lp: LayerPlan, layer: int) -> LayerPlan:
    """Random kept qk_channel / v_channel indices (a different choice per KV group, the same
    count in each) for the layer plan's kept KV groups; qk only where the graph has them."""
    groups = lp.kv_groups if lp.kv_groups is not None else range(graph.n_kv)
    for key, kind in (("qk_channels", "qk_channel"), ("v_channels", "v_channel")):
        if not graph.groups_of(kind, layer) or rng.random() < 0.3:
            continue
        size = graph.groups_of(kind, layer)[0].count
        keep = rng.randint(1, size)
        setattr(lp, key, {g: sorted(rng.sample(range(size), keep)) for g in groups})
    return lp


def random_plan(graph, rng: random.Random, hidden: bool = False, channels: bool = False) -> PrunePlan:
    """Any mix of removed KV groups, query heads, FFN channels, sublayers, one block, hidden channels
    (and with ``channels`` head-dimension units: qk/v channels)."""
    per_group = graph.n_heads // graph.n_kv
    layers = {}
    for i in range(graph.n_layers):
        lp = LayerPlan()
        r = rng.random()
        if r < 0.2:
            lp.attention = False
        elif r < 0.7:
            if graph.n_kv > 1 and rng.random() < 0.6:
                lp.kv_groups = sorted(rng.sample(range(graph.n_kv), rng.randint(1, graph.n_kv)))
            if per_group > 1 and rng.random() < 0.6:
                keep = rng.randint(1, per_group)
                groups = lp.kv_groups if lp.kv_groups is not None else range(graph.n_kv)
                # a different choice of heads in every group, the same number in each
                lp.query_heads = [g * per_group + j for g in groups for j in sorted(rng.sample(range(per_group), keep))]
            if channels and rng.random() < 0.7:
                random_channels(graph, rng, lp, i)
        r = rng.random()
        if r < 0.2:
            lp.ffn = False
        elif r < 0.7:
            lp.ffn_channels = sorted(rng.sample(range(graph.intermediate), rng.randint(1, graph.intermediate)))
        layers[i] = lp
    blocks = [rng.randrange(graph.n_layers)] if graph.n_layers > 2 and rng.random() < 0.5 else []
    for b in blocks:
        layers.pop(b)
    kept_hidden = sorted(rng.sample(range(graph.hidden), rng.randint(graph.hidden // 2, graph.hidden - 1))) \
        if hidden else None
    return PrunePlan(layers=layers, removed_blocks=blocks, hidden_channels=kept_hidden, align=1)


def kind_plan(graph, kind: str, layer: int = 0) -> PrunePlan:
    """A plan that removes units of one kind only."""
    per_group = graph.n_heads // graph.n_kv
    if kind == "kv_group":
        return PrunePlan(layers={layer: LayerPlan(kv_groups=list(range(1, graph.n_kv)) or None)})
    if kind == "query_head":
        keep = [g * per_group + j for g in range(graph.n_kv) for j in range(max(1, per_group - 1))]
        if per_group == 1:  # MHA: a query head is its KV group
            return PrunePlan(layers={layer: LayerPlan(kv_groups=list(range(graph.n_kv - 1)))})
        return PrunePlan(layers={layer: LayerPlan(query_heads=keep)})
    if kind == "ffn_channel":
        return PrunePlan(layers={layer: LayerPlan(ffn_channels=list(range(0, graph.intermediate, 3)))})
    if kind == "attention":
        return PrunePlan(layers={layer: LayerPlan(attention=False)})
    if kind == "ffn":
        return PrunePlan(layers={layer: LayerPlan(ffn=False)})
    if kind == "block":
        return PrunePlan(removed_blocks=[layer])
    if kind == "hidden_channel":
        return PrunePlan(hidden_channels=[c for c in range(graph.hidden) if c % 4 != 1])
    if kind in ("qk_channel", "v_channel"):   # every KV group keeps a different subset of the same size
        size = (graph.groups_of(kind, layer) or graph.groups_of("v_channel", layer))[0].count
        keep = {g: sorted({(g + 2 * j) % size for j in range(max(1, size // 2))}) for g in range(graph.n_kv)}
        return PrunePlan(layers={layer: LayerPlan(**{kind + "s": keep})})
    raise ValueError(kind)


def random_updates(plan: PrunePlan, graph, rng: random.Random, share: float = 0.3) -> PrunePlan:
    """Give ``plan`` new values (in the shrunk shapes) for a random share of the surviving
    parameters: projections, biases and norms alike, as a reconstruction method would."""
    import torch

    shapes = plan.shrunk_shapes(graph)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    names = sorted(shapes)
    for name in rng.sample(names, max(1, int(share * len(names)))):
        plan.updates[name] = torch.randn(shapes[name], generator=gen) * 0.05
    return plan
