"""Text summary and Graphviz rendering of a Graph."""

from __future__ import annotations

from .model import (ATTENTION, BLOCK, CHANNEL_KINDS, FFN, FFN_CHANNEL, HIDDEN_CHANNEL, KV_GROUP, QK_CHANNEL,
                    QUERY_HEAD, V_CHANNEL, Graph)

_LAYER_KINDS = (KV_GROUP, QUERY_HEAD, QK_CHANNEL, V_CHANNEL, FFN_CHANNEL, ATTENTION, FFN, BLOCK)


def layer_ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def summary_text(g: Graph) -> str:
    c = g.config
    if c.get("per_layer"):  # a pruned model: the config's counts are the original model's
        widths = (f"per-layer query heads, KV groups and FFN widths (the units per layer below; head_dim "
                  f"{c['head_dim']}, {c['ffn']} FFN)")
    else:
        widths = (f"{c['heads']} query heads in {c['kv_heads']} KV groups (head_dim {c['head_dim']}), "
                  f"FFN {c['intermediate']} ({c['ffn']})")
    lines = [f"structlm graph: family {g.family} (model_type {c.get('model_type')})",
             f"  {c['layers']} layers, hidden {c['hidden']}, {widths}, vocab {c['vocab']}, "
             f"{'tied' if c['tied'] else 'untied'} lm_head, {c['norm']}, {'pre' if c['pre_norm'] else 'post'}-norm, "
             f"{c['positions']} positions"]
    if c.get("embed_dim") != c["hidden"]:
        lines.append(f"  token embeddings are {c['embed_dim']} wide (project_in/out to {c['hidden']})")
    lines.append("")
    lines.append("units per layer  (units x parameters per unit; FLOPs/token/unit exclude attention scores)")
    rows: dict[tuple, list[int]] = {}
    for layer in range(c["layers"]):
        cells = []
        for kind in _LAYER_KINDS:
            grs = g.groups_of(kind, layer)
            if kind in CHANNEL_KINDS and grs:  # one group per KV group, all alike: one line
                gr = grs[0]
                cells.append((f"{kind} x{len(grs)}", gr.count, gr.params_per_unit, gr.flops_per_token_per_unit))
                continue
            for gr in grs:
                cells.append((kind, gr.count, gr.params_per_unit, gr.flops_per_token_per_unit))
        kind_name = c["layer_types"][layer] if c.get("layer_types") else ""
        window = g.groups_of(ATTENTION, layer)[0].window if g.groups_of(ATTENTION, layer) else None
        if window:
            kind_name += f", window {window}"
        for sublayer in (ATTENTION, FFN):  # only a pruned model's graph lacks a sublayer
            if not g.groups_of(sublayer, layer):
                kind_name += f"{', ' if kind_name else ''}{sublayer} removed"
        rows.setdefault((kind_name, tuple(cells)), []).append(layer)
    for (lt, cells), layers in rows.items():
        lines.append(f"  layers {layer_ranges(layers)}" + (f" ({lt})" if lt else "") + ":")
        for kind, count, ppu, fl in cells:
            lines.append(f"    {kind:<15} {count:>7} x {ppu:>14,} params   {fl:>14,} FLOPs/token")
    lines.append("global units:")
    for gr in g.groups_of(HIDDEN_CHANNEL):
        lines.append(f"    {HIDDEN_CHANNEL + '/' + gr.name:<24} {gr.count:>7} x {ppu_fmt(gr.params_per_unit)} params   "
                     f"{gr.flops_per_token_per_unit:>14,} FLOPs/token   ({len(gr.members)} member slices)")
    totals = {k: g.count(k) for k in (QUERY_HEAD, KV_GROUP, QK_CHANNEL, V_CHANNEL, FFN_CHANNEL, HIDDEN_CHANNEL,
                                      ATTENTION, FFN, BLOCK)}
    lines.append("totals: " + ", ".join(f"{v:,} {k}" for k, v in totals.items()))
    qk_text = {"rope_pair": "a qk_channel is a rotary pair (d, d + head_dim/2) of the group's q and k heads",
               "dim": "a qk_channel is one q/k dim of the group's heads (learned positions)"}.get(
        c.get("qk_channel"), f"no qk_channel units ({c.get('qk_channel_refusal') or 'not described by this graph'})")
    lines.append(f"  ({QK_CHANNEL} xN / {V_CHANNEL} xN: N groups, one per KV group, units counted per group; "
                 f"{qk_text}; a v_channel is one v_proj row with the o_proj columns of the group's query heads)")
    a = g.accounting()
    lines.append("parameter accounting:")
    for k in ("embeddings", "position_embeddings", "embed_projections", "final_norm", "lm_head"):
        if a[k] or k == "lm_head":
            extra = " (tied to embeddings)" if k == "lm_head" and a["lm_head_tied"] else ""
            lines.append(f"  {k:<22} {a[k]:>15,}{extra}")
    blocks = sum(l["block"] for l in a["layers"])
    att = sum(l["attention"] for l in a["layers"])
    ffn = sum(l["ffn"] for l in a["layers"])
    nrm = sum(l["norms"] for l in a["layers"])
    lines.append(f"  {'blocks':<22} {blocks:>15,}  (attention {att:,} + ffn {ffn:,} + norms {nrm:,})")
    lines.append(f"  {'total':<22} {a['total']:>15,}  (model: {a['model_parameters']:,})")
    for n in g.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines) + "\n"


def ppu_fmt(n: int) -> str:
    return f"{n:>14,}"


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(g: Graph) -> str:
    """Graphviz: one cluster per layer; nodes are groups (label: kind, count, params per unit and
    member slices); edges say 'contains' (block > sublayer > kv_group > query_head / ffn_channel)
    and 'crosses' (hidden channels touch every block)."""
    out = [f"digraph {_q('structlm_' + g.family)} {{", "  rankdir=LR;", "  node [shape=box, fontsize=9];"]

    def node_id(gr):
        return f"{gr.kind}_{'g' if gr.layer is None else gr.layer}{'_' + gr.name if gr.name else ''}"

    def label(gr):
        parts = [f"{gr.kind}{'/' + gr.name if gr.name else ''}: {gr.count} x {gr.params_per_unit:,} params"]
        for m in gr.members[:40]:
            parts.append(f"{m.param} {'whole' if m.whole else f'dim {m.dim} [{m.offset}+i*{m.width}]'}")
        if len(gr.members) > 40:
            parts.append(f"... {len(gr.members) - 40} more members")
        return "\\l".join(p.replace('"', "'") for p in parts) + "\\l"

    for gr in g.groups_of(HIDDEN_CHANNEL):
        out.append(f"  {node_id(gr)} [label=\"{label(gr)}\", style=filled, fillcolor=lightyellow];")
    for layer in range(g.n_layers):
        out.append(f"  subgraph cluster_{layer} {{ label=\"layer {layer}\";")
        for kind in _LAYER_KINDS:
            for gr in g.groups_of(kind, layer):
                out.append(f"    {node_id(gr)} [label=\"{label(gr)}\"];")
        out.append("  }")
        ids = {k: node_id(g.groups_of(k, layer)[0]) for k in _LAYER_KINDS if g.groups_of(k, layer)}
        for a, b in ((BLOCK, ATTENTION), (BLOCK, FFN), (ATTENTION, KV_GROUP), (KV_GROUP, QUERY_HEAD),
                     (KV_GROUP, QK_CHANNEL), (KV_GROUP, V_CHANNEL), (FFN, FFN_CHANNEL)):
            if a in ids and b in ids:
                out.append(f"  {ids[a]} -> {ids[b]} [label=contains];")
        for gr in g.groups_of(HIDDEN_CHANNEL):
            if gr.name == "residual" and BLOCK in ids:
                out.append(f"  {node_id(gr)} -> {ids[BLOCK]} [style=dashed, label=crosses];")
    out.append("}")
    return "\n".join(out) + "\n"
