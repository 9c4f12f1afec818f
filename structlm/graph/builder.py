"""Build the coupled-unit graph from a family adapter and parameter shapes (never runs the model)."""

from __future__ import annotations

import torch

from ..families import get_adapter
from ..families.base import FamilyAdapter, Proj
from .model import (ATTENTION, BLOCK, FFN, FFN_CHANNEL, HIDDEN_CHANNEL, KV_GROUP, QUERY_HEAD, Graph,
                    Group, Member)


class GraphBuildError(ValueError):
    """The model's parameters do not match what its family adapter describes."""


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except TypeError:  # older transformers: torch_dtype
            return AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)


def param_shapes(model) -> dict[str, tuple[int, ...]]:
    """name -> shape for ``model.named_parameters()`` (tied parameters appear once)."""
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def build_graph(model_or_config, *, adapter: FamilyAdapter | None = None) -> Graph:
    """Graph of every prunable coupled unit.

    ``model_or_config`` is a causal-LM ``nn.Module`` on any device (``meta`` included) or a
    transformers config (a weightless ``meta`` model is instantiated to read parameter names
    and shapes).  Every referenced parameter is checked to exist with the expected shape and
    every model parameter must be accounted for, else :class:`GraphBuildError`.
    """
    if isinstance(model_or_config, torch.nn.Module):
        model = model_or_config
        config = model.config
    else:
        config = model_or_config
        ad = adapter or get_adapter(config)  # fail early and clearly for unsupported models
        model = _meta_model(config)
    shapes = param_shapes(model)
    ad = (adapter or get_adapter(config)).bind(shapes)
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
    def build(self) -> Graph:
        ad = self.ad
        H, KV, hd, D, I, V, E = ad.n_heads, ad.n_kv, ad.head_dim, ad.hidden, ad.intermediate, ad.vocab, ad.embed_dim
        if KV <= 0 or H % KV:
            self.fail(f"{H} attention heads are not a multiple of {KV} key/value heads")
        rep = H // KV
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
            fin, fout = ad.ffn_in(i), ad.ffn_out(i)
            for p in fin:
                self.check_proj(p, D)
            self.check_fused(fin)
            self.check_proj(fout, I)
            if self.shapes[fout.weight][fout.out_dim] != D:
                self.fail(f"{fout.weight!r} has {self.shapes[fout.weight][fout.out_dim]} outputs, expected {D}")
            qkn = ad.qk_norms(i)
            for n in qkn:
                self.need(n, (hd,))
            an, fn = ad.attn_norms(i), ad.ffn_norms(i)
            for n in an + fn:
                self.need(n, (D,))

            window = ad.layer_window(i)
            qh = self.out_members(q, 0, hd) + [self.in_member(o, 0, hd)]
            groups.append(self.group(QUERY_HEAD, i, H, qh, attn_flops_coeff=4 * hd, window=window))
            kvm = (self.out_members(q, 0, rep * hd) + self.out_members(k, 0, hd) + self.out_members(v, 0, hd)
                   + [self.in_member(o, 0, rep * hd)])
            kvg = self.group(KV_GROUP, i, KV, kvm, attn_flops_coeff=4 * hd * rep, window=window)
            groups.append(kvg)
            chm = [mem for p in fin for mem in self.out_members(p, 0, 1)] + [self.in_member(fout, 0, 1)]
            ch = self.group(FFN_CHANNEL, i, I, chm)
            groups.append(ch)

            attn_params = self.unique([q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, o.weight, o.bias] + qkn)
            ffn_params = self.unique([x for p in fin for x in (p.weight, p.bias)] + [fout.weight, fout.bias])
            att = self.group(ATTENTION, i, 1, [self.whole(n) for n in attn_params + an],
                             attn_flops_coeff=4 * hd * H, window=window)
            ffg = self.group(FFN, i, 1, [self.whole(n) for n in ffn_params + fn])
            blk = self.group(BLOCK, i, 1, [self.whole(n) for n in attn_params + an + ffn_params + fn],
                             attn_flops_coeff=4 * hd * H, window=window)
            groups += [att, ffg, blk]

            attn_shared = self.unique([o.bias] + qkn)
            ffn_shared = self.unique([fout.bias])
            a_sh = sum(self.numel(n) for n in attn_shared)
            f_sh = sum(self.numel(n) for n in ffn_shared)
            norms = sum(self.numel(n) for n in an + fn)
            a_tot = kvg.params + a_sh
            f_tot = ch.params + f_sh
            if a_tot + sum(self.numel(n) for n in an) != att.params_per_unit:
                self.fail(f"layer {i}: attention accounting ({a_tot}) does not match its parameters")
            if f_tot + sum(self.numel(n) for n in fn) != ffg.params_per_unit:
                self.fail(f"layer {i}: FFN accounting ({f_tot}) does not match its parameters "
                          f"({ffg.params_per_unit - sum(self.numel(n) for n in fn)})")
            acc_layers.append({"layer": i, "attention": a_tot, "attention_shared": attn_shared and
                               {n: self.numel(n) for n in attn_shared} or {},
                               "ffn": f_tot, "ffn_shared": {n: self.numel(n) for n in ffn_shared},
                               "norms": norms, "block": a_tot + f_tot + norms})

            # residual-stream members of this layer
            hidden_members += [self.m(n, 0, 0, 1) for n in an]
            hidden_members += [self.in_member(p, 0, 1) for p in (q, k, v)]
            hidden_members += self.out_members(o, 0, 1)
            hidden_members += [self.m(n, 0, 0, 1) for n in fn]
            hidden_members += [self.in_member(p, 0, 1) for p in fin]
            hidden_members += self.out_members(fout, 0, 1)

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
        return Graph(ad.family, ad.summary() | {"tied": bool(self.tied)}, groups, acc, dict(self.tied), notes)
