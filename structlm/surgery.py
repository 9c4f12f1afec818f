"""Apply a plan: ``mask`` zeroes the plan's units in the unshrunk model, ``shrink`` removes them
physically (smaller tensors, removed sublayers replaced by weightless placeholders, removed
blocks deleted, config updated).  Both give the same logits; the tests hold them to it.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import torch
from torch import nn

from .families import get_adapter
from .graph import build_graph
from .layout import apply_layout, sync_module_sizes
from .plan import PlanError, PrunePlan

HIDDEN_PRUNABLE_NORMS = ("rmsnorm",)


def removed_units(plan: PrunePlan, graph):
    """The graph units the plan removes (sublayer/block units as whole groups)."""
    units = []
    per_group = graph.n_heads // graph.n_kv
    for i in range(graph.n_layers):
        if i in plan.removed_blocks:
            units.append(graph.group("block", i))
            continue
        lp = plan.layer(i)
        if not lp.attention:
            units.append(graph.group("attention", i))
        else:
            kept_groups = set(plan.kept_kv_groups(graph, i))
            kept_heads = set(plan.kept_heads(graph, i))
            kv = graph.group("kv_group", i)
            units += [kv.unit(g) for g in range(graph.n_kv) if g not in kept_groups]
            qh = graph.group("query_head", i)
            units += [qh.unit(h) for h in range(graph.n_heads) if h // per_group in kept_groups and h not in kept_heads]
            units += channel_units(plan, graph, i)
        if not lp.ffn:
            units.append(graph.group("ffn", i))
        elif lp.ffn_channels is not None:
            ffn = graph.group("ffn_channel", i)
            kept = set(lp.ffn_channels)
            units += [ffn.unit(c) for c in range(graph.intermediate) if c not in kept]
    if plan.hidden_channels is not None:
        hidden = graph.group("hidden_channel", None)
        kept = set(plan.hidden_channels)
        units += [hidden.unit(c) for c in range(graph.hidden) if c not in kept]
    return units


def channel_units(plan: PrunePlan, graph, i: int) -> list:
    """The ``qk_channel`` / ``v_channel`` units the plan removes in layer ``i`` (kept KV groups only)."""
    lp = plan.layer(i)
    units = []
    for key, kind in (("qk_channels", "qk_channel"), ("v_channels", "v_channel")):
        chans = getattr(lp, key)
        if chans is None or not lp.attention or i in plan.removed_blocks:
            continue
        for g in plan.kept_kv_groups(graph, i):
            grp = graph.channel_group(kind, i, g)
            kept = set(chans[g])
            units += [grp.unit(c) for c in range(grp.count) if c not in kept]
    return units


def channel_maps(plan: PrunePlan, graph, adapter) -> dict[str, dict]:
    """Where head-dimension pruning leaves attention projections narrower than their heads.

    For each q/k/v projection (or fused qkv tensor) that lost rows to ``qk_channel`` /
    ``v_channel`` units: ``{"out_index": [...], "out_size": n}``, the positions of its kept rows
    inside the output it would have with only the plan's head/group removals (the width the
    stock attention code views as heads x head_dim); for the output projection
    ``{"in_index": [...], "in_size": n}`` likewise for its input columns.  The layout scatters
    the narrow output back into that width (zeros at removed dims: q.k and attention x v see
    exactly what the masked model computes) and gathers o_proj's kept inputs.  Keys are module
    names (original layer numbers)."""
    maps: dict[str, dict] = {}
    for i in range(graph.n_layers):
        units = channel_units(plan, graph, i)
        if not units:
            continue
        head_units = [graph.group("kv_group", i).unit(g) for g in range(graph.n_kv)
                      if g not in set(plan.kept_kv_groups(graph, i))]
        kept_heads = set(plan.kept_heads(graph, i))
        qh = graph.group("query_head", i)
        head_units += [qh.unit(h) for h in range(graph.n_heads) if h not in kept_heads]
        gone_h: dict[tuple[str, int], set] = defaultdict(set)
        gone_c: dict[tuple[str, int], set] = defaultdict(set)
        for gone, us in ((gone_h, head_units), (gone_c, units)):
            for u in us:
                for name, dim, a, b in u.slices:
                    gone[(name, dim)].update(range(a, b))
        projs = [adapter.q(i), adapter.k(i), adapter.v(i)]
        o = adapter.o(i)
        shapes = {m.param: m.shape for g in graph.groups_of("attention", i) for m in g.members}
        for p in projs + [o]:
            if not p.weight.endswith(".weight"):
                continue
            dim = p.in_dim if p is o else p.out_dim
            if (p.weight, dim) not in gone_c:
                continue
            n = shapes[p.weight][dim]
            after_heads = [r for r in range(n) if r not in gone_h[(p.weight, dim)]]
            position = {r: j for j, r in enumerate(after_heads)}
            kept = [position[r] for r in after_heads if r not in gone_c[(p.weight, dim)]]
            key = ("in" if p is o else "out")
            maps[p.weight[:-len(".weight")]] = {f"{key}_index": kept, f"{key}_size": len(after_heads)}
    return maps


@torch.no_grad()
def mask(model, plan: PrunePlan, graph=None):
    """Zero every unit the plan removes, in place, in the unshrunk model."""
    from .graph import mask_units

    graph = graph or build_graph(model)
    plan.validate(graph)
    units = removed_units(plan, graph)
    mask_units(model, units)
    if plan.updates:  # new values, expanded to the unshrunk shape (zero where removed)
        removed: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
        for unit in units:
            if unit.kind in ("attention", "ffn", "block"):   # whole groups: no updates survive there
                continue
            for name, dim, a, b in unit.slices:
                removed[(name, dim)].append((a, b))
        params = dict(model.named_parameters())
        kept_hidden = torch.tensor(plan.kept_hidden(graph))
        for name, value in plan.updates.items():
            if name not in params:   # a new output bias: one value per kept hidden channel
                module = model.get_submodule(name.rpartition(".")[0])
                full = torch.zeros(graph.hidden, dtype=module.weight.dtype, device=module.weight.device)
                full[kept_hidden] = value.to(full)
                _set_bias(module, full)
                continue
            p = params[name]
            full = torch.zeros_like(p)
            index = [_keep_index(n, removed.get((name, d), [])) for d, n in enumerate(p.shape)]
            full[torch.meshgrid(*index, indexing="ij")] = value.to(p)
            p.data.copy_(full)
    return model


def _set_bias(module, value: torch.Tensor) -> None:
    if getattr(module, "bias", None) is not None:
        module.bias.data = value.to(module.bias.dtype).clone()
    else:
        module.bias = nn.Parameter(value.clone(), requires_grad=module.weight.requires_grad)


# families whose config can switch on biases for every projection of a sublayer: flag per sublayer
BIAS_FLAGS = {"llama": {"attention": "attention_bias", "ffn": "mlp_bias"}}


def _apply_updates(model, plan: PrunePlan, graph, adapter) -> None:
    """Write the plan's updates (shrunk coordinates) into the shrunk model; create new output
    biases where the model has none.  Llama turns on ``attention_bias``/``mlp_bias`` and gives every
    other projection of the kept sublayers a zero bias, so that the stock config rebuilds the model."""
    params = dict(model.named_parameters())
    missing = [n for n in plan.updates if n not in params]
    if missing:
        flags = BIAS_FLAGS.get(graph.family)
        if flags is None:
            raise PlanError(f"the plan adds biases {missing[:2]} that {graph.family} models do not have and its "
                            f"config cannot express; bias compensation needs an output projection with a bias "
                            f"(or a family with bias flags: {', '.join(BIAS_FLAGS)})")
        owner = {m.param: g.kind for g in graph.groups if g.kind in ("attention", "ffn") for m in g.members}
        kinds = {owner[n[:-len(".bias")] + ".weight"] for n in missing}
        for i in range(graph.n_layers):
            if i in plan.removed_blocks:
                continue
            lp = plan.layer(i)
            projs = []
            if "attention" in kinds and lp.attention:
                projs += [adapter.q(i), adapter.k(i), adapter.v(i), adapter.o(i)]
            if "ffn" in kinds and lp.ffn:
                projs += adapter.ffn_in(i) + [adapter.ffn_out(i)]
            for proj in projs:
                module = model.get_submodule(proj.weight.rpartition(".")[0])
                if module.bias is None:
                    out = module.weight.shape[proj.out_dim]
                    _set_bias(module, torch.zeros(out, dtype=module.weight.dtype, device=module.weight.device))
        for kind in kinds:
            setattr(model.config, flags[kind], True)
    params = dict(model.named_parameters())
    for name, value in plan.updates.items():
        p = params[name]
        if tuple(p.shape) != tuple(value.shape):   # validate() checked the plan's shapes; this is the model's
            raise PlanError(f"updates: {name!r} has shape {tuple(value.shape)}, the shrunk model's is "
                            f"{tuple(p.shape)}")
        p.data.copy_(value.to(p))


def hidden_pruning_refusal(adapter) -> str | None:
    """Why hidden channels of this family cannot be pruned exactly, or None if they can."""
    if adapter.norm_kind not in HIDDEN_PRUNABLE_NORMS or adapter.embed_projections() or adapter.qk_norm_modules:
        return (f"hidden-channel pruning is exact only for plain RMSNorm families without q/k norms (llama, "
                f"mistral, qwen2, phi3); {adapter.family} uses {adapter.norm_kind}"
                + (" with q/k norms" if adapter.qk_norm_modules else "")
                + ". Prune heads, FFN channels, sublayers or blocks instead.")
    return None


def _check_hidden_supported(adapter, plan):
    refusal = hidden_pruning_refusal(adapter) if plan.hidden_channels is not None else None
    if refusal:
        raise PlanError(refusal)


def _keep_index(size: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    for start, stop in spans:
        keep[start:stop] = False
    return keep.nonzero().flatten()


# ---- family facts for the attributes of a narrower attention -----------------------------

def attention_attrs(adapter, heads: int, kv_heads: int) -> dict:
    """Attributes the family's attention module reads in forward that depend on head counts."""
    family = adapter.family
    if family == "gpt2":
        return {"num_heads": heads, "split_size": heads * adapter.head_dim}
    if family == "opt":
        return {"num_heads": heads}
    attrs = {"num_key_value_groups": heads // kv_heads}
    if family == "phi3":
        attrs["num_key_value_heads"] = kv_heads
        attrs["config"] = {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    return attrs


def _layer_container(model, adapter):
    return model.get_submodule(adapter.layer_prefix.rsplit(".", 1)[0])


@torch.no_grad()
def shrink(model, plan: PrunePlan, graph=None, *, verbose: bool = False):
    """Remove the plan's units physically, in place.  Returns the model, whose
    ``structlm_layout`` attribute records what a stock config cannot express."""
    start = time.perf_counter()
    graph = graph or build_graph(model)
    plan.validate(graph)
    adapter = get_adapter(model.config).bind({n: tuple(p.shape) for n, p in model.named_parameters()})
    _check_hidden_supported(adapter, plan)
    removed_blocks = set(plan.removed_blocks)

    # 1. which parameters disappear with whole sublayers/blocks
    dropped: set[str] = set()
    placeholders: dict[str, str] = {}
    for i in range(graph.n_layers):
        if i in removed_blocks:
            dropped |= {m.param for m in graph.group("block", i).members}
            continue
        lp = plan.layer(i)
        if not lp.attention:
            dropped |= {m.param for m in graph.group("attention", i).members}
            placeholders[adapter.attn(i)] = "attention"
            if adapter.pre_norm:
                placeholders.update({f"{adapter.layer(i)}.{n}": "identity" for n in adapter.attn_norm_modules})
        if not lp.ffn:
            dropped |= {m.param for m in graph.group("ffn", i).members}
            if adapter.mlp_module:
                placeholders[adapter.mlp(i)] = "zero"
            else:  # OPT keeps fc1/fc2 in the decoder layer itself
                placeholders[f"{adapter.mlp(i)}.{adapter.ffn_in_modules[0]}"] = "identity"
                placeholders[f"{adapter.mlp(i)}.{adapter.ffn_out_module}"] = "zero"
            if adapter.pre_norm:
                placeholders.update({f"{adapter.layer(i)}.{n}": "identity" for n in adapter.ffn_norm_modules})

    # 2. slice every surviving parameter along every dim the removed units touch
    spans: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    for unit in removed_units(plan, graph):
        if unit.kind in ("attention", "ffn", "block"):
            continue
        for name, dim, a, b in unit.slices:
            if name not in dropped:
                spans[(name, dim)].append((a, b))
    params = dict(model.named_parameters())
    for (name, dim), sl in spans.items():
        p = params[name]
        p.data = p.data.index_select(dim, _keep_index(p.shape[dim], sl))
    for module in model.modules():
        sync_module_sizes(module)

    # 2b. weight updates (reconstruction; FLAP's new output biases), in the shrunk coordinates,
    # before the hidden-channel rescaling below, which applies to updated norm weights as to any
    if plan.updates:
        _apply_updates(model, plan, graph, adapter)

    # 3. hidden channels: RMSNorm over fewer channels, made exact by rescaling weight and eps
    config = model.config
    if plan.hidden_channels is not None:
        d, d_new = graph.hidden, len(plan.hidden_channels)
        scale = math.sqrt(d / d_new)
        residual_norms = {m.param.rpartition(".")[0] for m in graph.group("hidden_channel", None).members}
        for name, module in model.named_modules():
            if hasattr(module, "variance_epsilon"):  # every RMSNorm reads the same config eps on reload
                module.variance_epsilon *= d / d_new
                if name in residual_norms:
                    module.weight.data.mul_(scale)
        config.rms_norm_eps = config.rms_norm_eps * d / d_new
        config.hidden_size = d_new
        if graph.is_tied:
            model.tie_weights()


    # 3b. head-dimension pruning: record which narrow projections scatter/gather (applied in 5)
    maps = channel_maps(plan, graph, adapter)

    # 4. placeholders for removed sublayers, then delete removed blocks
    layers = _layer_container(model, adapter)
    apply_layout(model, {"placeholders": placeholders})
    kept_layers = [i for i in range(graph.n_layers) if i not in removed_blocks]
    if removed_blocks:
        new_layers = nn.ModuleList([layers[i] for i in kept_layers])
        parent_name, _, child = adapter.layer_prefix.rsplit(".", 1)[0].rpartition(".")
        setattr(model.get_submodule(parent_name), child, new_layers)
        for new_i, layer in enumerate(new_layers):
            for sub in layer.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = new_i
        _set_layer_count(config, adapter, kept_layers)

    # 5. attention attributes and the layout record for export
    module_attrs: dict[str, dict] = {}
    rows = []
    for new_i, old_i in enumerate(kept_layers):
        heads = len(plan.kept_heads(graph, old_i))
        kv_heads = len(plan.kept_kv_groups(graph, old_i))
        ffn = len(plan.kept_ffn(graph, old_i))
        rows.append({"layer": new_i, "source_layer": old_i, "heads": heads, "kv_heads": kv_heads, "ffn": ffn})
        if heads and (heads, kv_heads) != (graph.n_heads, graph.n_kv):
            name = adapter.layer_prefix.format(i=new_i) + f".{adapter.attn_module}"
            module_attrs[name] = attention_attrs(adapter, heads, kv_heads)
    maps = _renumber(maps, adapter, kept_layers)
    apply_layout(model, {"module_attrs": module_attrs, "channel_maps": maps})
    for row in rows:
        row["qk_head_dim"], row["v_head_dim"] = plan.head_dims(graph, row["source_layer"])
    model.structlm_layout = {"family": graph.family, "layers": rows,
                             "placeholders": _renumber(placeholders, adapter, kept_layers),
                             "module_attrs": module_attrs}
    if maps:
        model.structlm_layout["channel_maps"] = maps
    model.structlm_plan = plan
    if verbose:
        print(f"structlm: shrunk in {time.perf_counter() - start:.2f} s")
    return model


def _renumber(placeholders: dict, adapter, kept_layers: list[int]) -> dict:
    """Placeholder names use original layer numbers; after block removal they shift."""
    new_index = {old: new for new, old in enumerate(kept_layers)}
    prefix = adapter.layer_prefix.split("{i}")[0]
    out = {}
    for name, kind in placeholders.items():
        rest = name[len(prefix):]
        old, _, tail = rest.partition(".")
        out[f"{prefix}{new_index[int(old)]}.{tail}"] = kind
    return out


def _set_layer_count(config, adapter, kept_layers):
    for field in ("num_hidden_layers", "n_layer"):
        if hasattr(config, field) and getattr(config, field) is not None:
            setattr(config, field, len(kept_layers))
    types = getattr(config, "layer_types", None)
    if types:
        config.layer_types = [types[i] for i in kept_layers]
    if getattr(config, "max_window_layers", None) is not None:  # qwen2: the first N layers use full attention
        config.max_window_layers = sum(1 for i in kept_layers if i < config.max_window_layers)
