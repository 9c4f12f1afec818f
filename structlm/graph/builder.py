"""Build the coupled-unit graph from a family adapter and parameter shapes (never runs the model)."""

from __future__ import annotations

import copy

import torch

from ..families import get_adapter
from ..families.base import FamilyAdapter, Proj
from .model import (ATTENTION, BLOCK, FFN, FFN_CHANNEL, HIDDEN_CHANNEL, KV_GROUP, QK_CHANNEL, QUERY_HEAD,
                    V_CHANNEL, Graph, Group, Member)
from .render import layer_ranges


class GraphBuildError(ValueError):
    """The model's parameters do not match what its family adapter describes."""


def _meta_model(config):
    """A weightless model with ``config``'s shapes; a heterogeneous structlm config's per-layer
    layout (``config.structlm``) is applied, so the shapes are the checkpoint's, not the stock ones."""
    from transformers import AutoModelForCausalLM

    from ..layout import apply_layout

    layout = getattr(config, "structlm", None)
    if getattr(config, "auto_map", None):  # the checkpoint's remote class is the stock one + the layout
        config = copy.deepcopy(config)
        del config.auto_map
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except TypeError:  # older transformers: torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    return apply_layout(model, layout)


def param_shapes(model) -> dict[str, tuple[int, ...]]:
    """name -> shape for ``model.named_parameters()`` (tied parameters appear once)."""
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def layer_counts(model) -> dict[int, tuple[int, int, int]]:
    """Layer -> (query heads, KV heads, FFN width) where structlm changed a layer's shape (0: the
    sublayer was removed), from the layout a shrink left on the model or a heterogeneous
    checkpoint's config; empty for a model whose config describes every layer."""
    layout = getattr(model, "structlm_layout", None) or getattr(model.config, "structlm", None) or {}
    return {int(row["layer"]): (int(row["heads"]), int(row["kv_heads"]), int(row["ffn"]))
            for row in layout.get("layers", [])}


def describe_layer_counts(ad: FamilyAdapter) -> str:
    """'layers 0-3: 6 query heads / 2 KV heads / FFN 96; layer 4: attention removed / FFN 192'."""
    def shape(i):
        heads, kv, ffn = ad.layer_heads(i), ad.layer_kv(i), ad.layer_ffn(i)
        attention = _heads_text(heads, kv) if heads else "attention removed"
        return f"{attention} / " + (f"FFN {ffn}" if ffn else "FFN removed")

    runs: dict[str, list[int]] = {}
    for i in range(ad.n_layers):
        runs.setdefault(shape(i), []).append(i)
    return "; ".join(f"layer{'s' if len(ls) > 1 else ''} {layer_ranges(ls)}: {text}" for text, ls in runs.items())


def _heads_text(heads: int, kv: int) -> str:
    return f"{heads} query head{'s' * (heads != 1)} / {kv} KV head{'s' * (kv != 1)}"


def _differs_from_config(ad: FamilyAdapter) -> bool:
    stock = (ad.n_heads, ad.n_kv, ad.intermediate)
    return any((ad.layer_heads(i), ad.layer_kv(i), ad.layer_ffn(i)) != stock for i in range(ad.n_layers))


def build_graph(model_or_config, *, adapter: FamilyAdapter | None = None, per_layer_shapes: bool = False) -> Graph:
    """Graph of every prunable coupled unit.

    ``model_or_config`` is a causal-LM ``nn.Module`` on any device (``meta`` included) or a
    transformers config (a weightless ``meta`` model is instantiated to read parameter names
    and shapes).  Every referenced parameter is checked to exist with the expected shape and
    every model parameter must be accounted for, else :class:`GraphBuildError`.

    A model whose layers differ from its config (shrunk by structlm, or a heterogeneous
    checkpoint: per-layer heads and FFN widths, removed sublayers) is refused unless
    ``per_layer_shapes``: plans, methods and shrinking read the config's uniform counts
    (``graph.n_heads``, ``graph.intermediate``), so only a description (``structlm graph``) may
    ask for such a graph; its groups then carry each layer's real counts and
    ``graph.config["per_layer"]`` lists them.
    """
    if isinstance(model_or_config, torch.nn.Module):
        model = model_or_config
        config = model.config
    else:
        config = model_or_config
        get_adapter(config)  # fail early and clearly for unsupported models
        model = _meta_model(config)
    shapes = param_shapes(model)
    layout = getattr(model, "structlm_layout", None) or getattr(config, "structlm", None) or {}
    if layout.get("channel_maps"):
        dims = sorted({(int(r.get("qk_head_dim", 0)), int(r.get("v_head_dim", 0))) for r in layout.get("layers", [])})
        raise GraphBuildError(
            f"this model's attention head dims were pruned (q/k, v head dims per layer: "
            f"{', '.join(f'{q}/{v}' for q, v in dims)}): structlm graphs describe full-width heads only, so it "
            f"cannot be described or pruned again. Prune the original model with a harsher target instead; "
            f"its plan.json lists what was kept.")
    ad = (adapter or get_adapter(config)).bind(shapes, layer_counts(model))
    if _differs_from_config(ad) and not per_layer_shapes:
        raise GraphBuildError(
            f"this model's layers do not have the shapes its config describes ({describe_layer_counts(ad)}; "
            f"the config says {_heads_text(ad.n_heads, ad.n_kv)} / FFN {ad.intermediate}): it is a "
            f"pruned model with per-layer shapes, and structlm plans and prunes only models whose every layer "
            f"has its config's shape. Prune the original model with a harsher target instead (pruning to 0.8 "
            f"and then to 0.9 is params=0.72 of the original). A result with the same shape in every layer "
            f"and no removed sublayers is saved with a config that describes it and can be pruned again; "
            f"`structlm graph` describes this one.")
    return _Builder(ad, shapes).build()


class _Builder:
    def __init__(self, ad: FamilyAdapter, shapes: dict[str, tuple[int, ...]]):
        self.ad = ad
        self.shapes = shapes
        self.used: set[str] = set()
        self.tied: dict[str, str] = {}
        lm = ad.lm_head()
        if lm not in shapes:
            self.tied[lm] = ad.embeddings()
        self.lookup_only = {ad.embeddings()} if not self.tied else set()
        if ad.position_embeddings():
            self.lookup_only.add(ad.position_embeddings())

    # ---- checks --------------------------------------------------------------------------
    def fail(self, msg: str):
        raise GraphBuildError(f"{self.ad.family} graph: {msg}")

    def need(self, name: str, expect: dict[int, int] | tuple | None = None, ndim: int | None = None):
        """Shape of ``name``; ``expect`` maps dims to sizes (or is the full shape)."""
        if name not in self.shapes:
            close = [n for n in self.shapes if n.rsplit(".", 2)[-2:] == name.rsplit(".", 2)[-2:]][:3]
            self.fail(f"parameter {name!r} not found in the model"
                      + (f" (similar: {', '.join(close)})" if close else "")
                      + f"; the {type(self.ad).__name__} adapter expects it")
        shape = self.shapes[name]
        if isinstance(expect, tuple) and shape != expect:
            self.fail(f"parameter {name!r} has shape {shape}, expected {expect}")
        if isinstance(expect, dict):
            for d, s in expect.items():
                if len(shape) <= d or shape[d] != s:
                    self.fail(f"parameter {name!r} has shape {shape}, expected size {s} in dim {d}")
        if ndim is not None and len(shape) != ndim:
            self.fail(f"parameter {name!r} has shape {shape}, expected {ndim} dims")
        self.used.add(name)
        return shape

    def check_proj(self, p: Proj, in_size: int):
        shape = self.need(p.weight, {p.in_dim: in_size}, ndim=2)
        if shape[p.out_dim] < p.offset + p.size:
            self.fail(f"parameter {p.weight!r} has {shape[p.out_dim]} outputs (dim {p.out_dim}), "
                      f"expected at least {p.offset + p.size}")
        if p.bias:
            self.need(p.bias, (shape[p.out_dim],))

    def check_fused(self, projs: list[Proj]):
        """Parts of one fused tensor must tile its whole output dim."""
        by_w: dict[str, list[Proj]] = {}
        for p in projs:
            by_w.setdefault(p.weight, []).append(p)
        for w, ps in by_w.items():
            pos = 0
            for p in sorted(ps, key=lambda p: p.offset):
                if p.offset != pos:
                    self.fail(f"fused parameter {w!r}: parts do not tile it (gap or overlap at {pos})")
                pos += p.size
            if pos != self.shapes[w][ps[0].out_dim]:
                self.fail(f"fused parameter {w!r}: parts cover {pos} of {self.shapes[w][ps[0].out_dim]} outputs")

    # ---- members -------------------------------------------------------------------------
    def m(self, name: str, dim: int, offset: int, width: int) -> Member:
        return Member(name, dim, offset, width, self.shapes[name])

    def whole(self, name: str) -> Member:
        s = self.shapes[name]
        return Member(name, 0, 0, s[0], s, whole=True)

    def out_members(self, p: Proj, offset: int, width: int) -> list[Member]:
        ms = [self.m(p.weight, p.out_dim, p.offset + offset, width)]
        if p.bias:
            ms.append(self.m(p.bias, 0, p.offset + offset, width))
        return ms

    def in_member(self, p: Proj, offset: int, width: int) -> Member:
        return self.m(p.weight, p.in_dim, offset, width)

    def flops(self, members: list[Member]) -> int:
        f = 0
        for mem in members:
            if len(mem.shape) == 2 and mem.param not in self.lookup_only:
                f += 2 * mem.numel_per_unit
        return f

    def group(self, kind, layer, count, members, name="", **kw) -> Group:
        seen, ms = set(), []
        for mem in members:  # one whole member per parameter (fused tensors appear once)
            key = (mem.param, mem.dim, mem.offset, mem.whole)
            if key not in seen:
                seen.add(key)
                ms.append(mem)
        ppu = sum(mem.numel_per_unit for mem in ms)
        tied = {k: v for k, v in self.tied.items() if any(mem.param == v for mem in ms)}
        fl = self.flops(ms)  # a tied embedding member counts the lm_head matmul (not a lookup then)
        return Group(kind, layer, count, ms, ppu, fl, name=name, tied=tied, **kw)

    @staticmethod
    def unique(names):
        out = []
        for n in names:
            if n and n not in out:
                out.append(n)
        return out

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shapes[name]:
            n *= s
        return n

    # ---- build ---------------------------------------------------------------------------
    def layer_groups(self, i: int, hidden_members: list[Member], acc_layers: list[dict]) -> list[Group]:
        """Layer ``i``'s groups (query heads, KV groups, FFN channels, attention, FFN, block), its
        accounting row, and its residual-stream members appended to ``hidden_members``.  The
        counts are the layer's own (``ad.layer_heads(i)`` ...); a count of 0 is a removed
        sublayer, whose parameters are absent and which has no groups."""
        ad = self.ad
        H, KV, I, hd, D = ad.layer_heads(i), ad.layer_kv(i), ad.layer_ffn(i), ad.head_dim, ad.hidden
        groups: list[Group] = []
        an, fn = ad.attn_norms(i), ad.ffn_norms(i)
        window = ad.layer_window(i)
        attn_params, ffn_params, attn_shared, ffn_shared, qkn = [], [], [], [], []
        att = ffg = None
        a_tot = f_tot = 0
        if H:
            if KV <= 0 or H % KV:
                self.fail(f"layer {i}: {H} attention heads are not a multiple of {KV} key/value heads")
            rep = H // KV
            q, k, v, o = ad.q(i), ad.k(i), ad.v(i), ad.o(i)
            for p in (q, k, v):
                self.check_proj(p, D)
            self.check_proj(o, H * hd)
            if self.shapes[o.weight][o.out_dim] != D:
                self.fail(f"{o.weight!r} has {self.shapes[o.weight][o.out_dim]} outputs, expected hidden size {D}")
            self.check_fused([q, k, v])
            for p, size in ((q, H * hd), (k, KV * hd), (v, KV * hd)):
                if p.size != size:
                    self.fail(f"{p.weight!r}: adapter size {p.size} != {size}")
            qh = self.out_members(q, 0, hd) + [self.in_member(o, 0, hd)]
            groups.append(self.group(QUERY_HEAD, i, H, qh, attn_flops_coeff=4 * hd, window=window))
            kvm = (self.out_members(q, 0, rep * hd) + self.out_members(k, 0, hd) + self.out_members(v, 0, hd)
                   + [self.in_member(o, 0, rep * hd)])
            kvg = self.group(KV_GROUP, i, KV, kvm, attn_flops_coeff=4 * hd * rep, window=window)
            groups.append(kvg)
            groups += self.channel_groups(i, q, k, v, o, H, KV, hd, window)
            qkn = ad.qk_norms(i)
            attn_params = self.unique([q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, o.weight, o.bias] + qkn)
            attn_shared = self.unique([o.bias] + qkn)
            a_tot = kvg.params + sum(self.numel(n) for n in attn_shared)
        if I:
            fin, fout = ad.ffn_in(i), ad.ffn_out(i)
            for p in fin:
                self.check_proj(p, D)
            self.check_fused(fin)
            self.check_proj(fout, I)
            if self.shapes[fout.weight][fout.out_dim] != D:
                self.fail(f"{fout.weight!r} has {self.shapes[fout.weight][fout.out_dim]} outputs, expected {D}")
            chm = [mem for p in fin for mem in self.out_members(p, 0, 1)] + [self.in_member(fout, 0, 1)]
            ch = self.group(FFN_CHANNEL, i, I, chm)
            groups.append(ch)
            ffn_params = self.unique([x for p in fin for x in (p.weight, p.bias)] + [fout.weight, fout.bias])
            ffn_shared = self.unique([fout.bias])
            f_tot = ch.params + sum(self.numel(n) for n in ffn_shared)
        for n in qkn:
            self.need(n, (hd,))
        for n in an + fn:
            self.need(n, (D,))
        if H:
            att = self.group(ATTENTION, i, 1, [self.whole(n) for n in attn_params + an],
                             attn_flops_coeff=4 * hd * H, window=window)
            groups.append(att)
        if I:
            ffg = self.group(FFN, i, 1, [self.whole(n) for n in ffn_params + fn])
            groups.append(ffg)
        block_params = attn_params + an + ffn_params + fn
        if block_params:
            groups.append(self.group(BLOCK, i, 1, [self.whole(n) for n in block_params],
                                     attn_flops_coeff=4 * hd * H, window=window))

        if att and a_tot + sum(self.numel(n) for n in an) != att.params_per_unit:
            self.fail(f"layer {i}: attention accounting ({a_tot}) does not match its parameters")
        if ffg and f_tot + sum(self.numel(n) for n in fn) != ffg.params_per_unit:
            self.fail(f"layer {i}: FFN accounting ({f_tot}) does not match its parameters "
                      f"({ffg.params_per_unit - sum(self.numel(n) for n in fn)})")
        norms = sum(self.numel(n) for n in an + fn)
        acc_layers.append({"layer": i, "attention": a_tot, "attention_shared": attn_shared and
                           {n: self.numel(n) for n in attn_shared} or {},
                           "ffn": f_tot, "ffn_shared": {n: self.numel(n) for n in ffn_shared},
                           "norms": norms, "block": a_tot + f_tot + norms})

        # residual-stream members of this layer
        hidden_members += [self.m(n, 0, 0, 1) for n in an]
        if H:
            hidden_members += [self.in_member(p, 0, 1) for p in (q, k, v)]
            hidden_members += self.out_members(o, 0, 1)
        hidden_members += [self.m(n, 0, 0, 1) for n in fn]
        if I:
            hidden_members += [self.in_member(p, 0, 1) for p in fin]
            hidden_members += self.out_members(fout, 0, 1)
        return groups

    def channel_groups(self, i, q: Proj, k: Proj, v: Proj, o: Proj, H: int, KV: int, hd: int, window) -> list[Group]:
        """Head-dimension units of layer ``i``, one group per KV group ``g`` (named ``kv<g>``).

        ``qk_channel``: with RoPE one rotary pair (d, d + hd/2) of the group's key head and of
        each of its query heads (q_proj and k_proj rows; RoPE rotates pairs, so a pair is the
        unit and the kept pairs keep their frequencies); with learned positions a single dim.
        Families with q/k norms over the head dim (Qwen3, Gemma 3) get none: removing a dim
        changes the norm of the others (nor do partial rotary embeddings; see
        ``FamilyAdapter.qk_channel_refusal``).  ``v_channel``: one dim of the group's value head
        (v_proj row) and the matching o_proj input column of every query head in the group."""
        ad = self.ad
        rep = H // KV
        rope = ad.positions == "rope"
        groups = []
        for g in range(KV):
            heads = range(g * rep, (g + 1) * rep)
            if not ad.qk_channel_refusal:
                halves = (0, hd // 2) if rope else (0,)
                qk = [mem for h in heads for half in halves for mem in self.out_members(q, h * hd + half, 1)]
                qk += [mem for half in halves for mem in self.out_members(k, g * hd + half, 1)]
                groups.append(self.group(QK_CHANNEL, i, hd // 2 if rope else hd, qk, name=f"kv{g}",
                                         attn_flops_coeff=2 * len(halves) * rep, window=window))
            vm = self.out_members(v, g * hd, 1) + [self.in_member(o, h * hd, 1) for h in heads]
            groups.append(self.group(V_CHANNEL, i, hd, vm, name=f"kv{g}", attn_flops_coeff=2 * rep, window=window))
        return groups

    def build(self) -> Graph:
        ad = self.ad
        D, V, E = ad.hidden, ad.vocab, ad.embed_dim
        if ad.n_kv <= 0 or ad.n_heads % ad.n_kv:
            self.fail(f"{ad.n_heads} attention heads are not a multiple of {ad.n_kv} key/value heads")
        groups: list[Group] = []
        hidden_members: list[Member] = []
        emb_members: list[Member] = []
        acc_layers = []

        # embeddings, positions, projections
        emb = ad.embeddings()
        self.need(emb, (V, E))
        pos = ad.position_embeddings()
        if pos:
            self.need(pos, {1: D}, ndim=2)
        projs = ad.embed_projections()
        lm = ad.lm_head()
        if lm not in self.tied:
            self.need(lm, (V, E))
        if projs:
            p_in, p_out = projs
            self.check_proj(p_in, E)
            self.check_proj(p_out, D)
            hidden_members += [self.m(p_in.weight, p_in.out_dim, 0, 1)]
            emb_members += [self.m(emb, 1, 0, 1), self.m(p_in.weight, p_in.in_dim, 0, 1),
                            self.m(p_out.weight, p_out.out_dim, 0, 1)]
            if lm not in self.tied:
                emb_members.append(self.m(lm, 1, 0, 1))
        else:
            hidden_members.append(self.m(emb, 1, 0, 1))
        if pos:
            hidden_members.append(self.m(pos, 1, 0, 1))

        for i in range(ad.n_layers):
            groups += self.layer_groups(i, hidden_members, acc_layers)

        fnorm = ad.final_norm()
        for n in fnorm:
            self.need(n, (D,))
        hidden_members += [self.m(n, 0, 0, 1) for n in fnorm]
        if projs:
            hidden_members.append(self.m(projs[1].weight, projs[1].in_dim, 0, 1))
        elif lm not in self.tied:
            hidden_members.append(self.m(lm, 1, 0, 1))
        hid = self.group(HIDDEN_CHANNEL, None, D, hidden_members, name="residual")
        groups.insert(0, hid)
        if projs:
            groups.insert(1, self.group(HIDDEN_CHANNEL, None, E, emb_members, name="embedding"))

        acc = {
            "embeddings": self.numel(emb),
            "position_embeddings": self.numel(pos) if pos else 0,
            "embed_projections": sum(self.numel(p.weight) for p in projs) if projs else 0,
            "final_norm": sum(self.numel(n) for n in fnorm),
            "lm_head": 0 if lm in self.tied else self.numel(lm),
            "lm_head_tied": lm in self.tied,
            "layers": acc_layers,
        }
        acc["total"] = (acc["embeddings"] + acc["position_embeddings"] + acc["embed_projections"]
                        + acc["final_norm"] + acc["lm_head"] + sum(l["block"] for l in acc_layers))
        model_total = sum(self.numel(n) for n in self.shapes)
        unused = [n for n in self.shapes if n not in self.used]
        if unused or acc["total"] != model_total:
            self.fail(f"{len(unused)} parameter(s) not described by the {type(ad).__name__} adapter "
                      f"({', '.join(unused[:5])}{'...' if len(unused) > 5 else ''}); accounted "
                      f"{acc['total']:,} of {model_total:,} parameters")
        acc["model_parameters"] = model_total
        notes = list(ad.notes)
        if not ad.pre_norm:
            notes.append("post-LN: masking a whole sublayer/block is not equivalent to removing it.")
        summary = ad.summary() | {"tied": bool(self.tied)}
        if _differs_from_config(ad):  # the config's heads/kv_heads/intermediate are not what is there
            summary["per_layer"] = [{"heads": ad.layer_heads(i), "kv_heads": ad.layer_kv(i), "ffn": ad.layer_ffn(i)}
                                    for i in range(ad.n_layers)]
            notes.append(f"per-layer shapes (a pruned model): {describe_layer_counts(ad)}; the config's "
                         f"{_heads_text(ad.n_heads, ad.n_kv)} / FFN {ad.intermediate} are the original "
                         f"model's. Such a graph describes the model; it cannot be pruned again.")
        return Graph(ad.family, summary, groups, acc, dict(self.tied), notes)
