"""Data model of the coupled-unit graph: Member, Unit, Group, Graph (plain dataclasses)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from math import prod

FORMAT = "structlm-graph/1"

QUERY_HEAD = "query_head"
KV_GROUP = "kv_group"
FFN_CHANNEL = "ffn_channel"
HIDDEN_CHANNEL = "hidden_channel"
QK_CHANNEL = "qk_channel"
V_CHANNEL = "v_channel"
ATTENTION = "attention"
FFN = "ffn"
BLOCK = "block"
KINDS = (QUERY_HEAD, KV_GROUP, QK_CHANNEL, V_CHANNEL, FFN_CHANNEL, HIDDEN_CHANNEL, ATTENTION, FFN, BLOCK)
# head-dimension kinds: one group per (layer, KV group), named "kv<g>"
CHANNEL_KINDS = (QK_CHANNEL, V_CHANNEL)
SUBLAYER_KINDS = (ATTENTION, FFN, BLOCK)


@dataclass
class Member:
    """Slices of one parameter: unit ``i`` covers ``[offset + i*width, offset + (i+1)*width)``
    along ``dim``.  ``shape`` is the parameter's full shape.  ``whole`` marks a member of a
    sublayer/block group: the whole parameter (dim 0, offset 0, width = shape[0])."""

    param: str
    dim: int
    offset: int
    width: int
    shape: tuple[int, ...]
    whole: bool = False

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)

    def span(self, i: int) -> tuple[int, int]:
        start = self.offset + i * self.width
        return start, start + self.width

    @property
    def numel_per_index(self) -> int:
        """Elements per index along ``dim`` (product of the other dims)."""
        return prod(self.shape) // self.shape[self.dim] if self.shape[self.dim] else 0

    @property
    def numel_per_unit(self) -> int:
        return self.width * self.numel_per_index

    def to_dict(self) -> dict:
        d = {"param": self.param, "dim": self.dim, "offset": self.offset, "width": self.width,
             "shape": list(self.shape)}
        if self.whole:
            d["whole"] = True
        return d


@dataclass
class Unit:
    """One prunable unit: everything that must go together.  ``slices`` are
    ``(param, dim, start, stop)``."""

    kind: str
    layer: int | None
    index: int
    slices: list[tuple[str, int, int, int]]
    params: int = 0
    tied: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        where = "global" if self.layer is None else f"layer {self.layer}"
        lines = [f"{self.kind} #{self.index} ({where}), {self.params:,} parameters:"]
        lines += [f"  {p}[{'' if d == 0 else ':, ' * d}{a}:{b}]" for p, d, a, b in self.slices]
        return "\n".join(lines)


@dataclass
class Group:
    """A run of ``count`` identically shaped units of one kind in one layer (None: global).

    ``params_per_unit`` counts parameter elements removed with one unit (a tied lm_head counts
    once).  ``flops_per_token_per_unit`` is 2 x multiply-adds per token of the weight matmuls
    touched by one unit (embedding lookups, norms, biases and activations count 0; a tied
    lm_head's matmul is counted on the embedding).  Attention score/value FLOPs depend on the
    sequence length: see :meth:`attention_flops_per_token`.
    """

    kind: str
    layer: int | None
    count: int
    members: list[Member]
    params_per_unit: int = 0
    flops_per_token_per_unit: int = 0
    name: str = ""
    # attention score+value FLOPs per token per unit = attn_flops_coeff * context length
    attn_flops_coeff: int = 0
    window: int | None = None
    tied: dict[str, str] = field(default_factory=dict)  # absent param -> the param it shares storage with

    @property
    def params(self) -> int:
        return self.count * self.params_per_unit

    @property
    def label(self) -> str:
        where = "global" if self.layer is None else f"layer {self.layer}"
        return f"{self.kind}{'/' + self.name if self.name else ''} ({where})"

    def attention_flops_per_token(self, seq_len: int) -> int:
        """Score (QK^T) + value (AV) FLOPs per token per unit for a token seeing ``seq_len``
        positions (capped by the sliding window); a causal sequence averages about half."""
        ctx = min(seq_len, self.window) if self.window else seq_len
        return self.attn_flops_coeff * ctx

    def unit(self, i: int) -> Unit:
        if not 0 <= i < self.count:
            raise IndexError(f"{self.label} has {self.count} units, no unit {i}")
        return Unit(self.kind, self.layer, i, [(m.param, m.dim, *m.span(i)) for m in self.members],
                    self.params_per_unit, dict(self.tied))

    def units(self):
        for i in range(self.count):
            yield self.unit(i)

    def details(self, i: int | None = None) -> str:
        """What removing unit ``i`` (or any one unit when None) touches: each parameter's slice
        and its shape before -> after."""
        head = (f"{self.label}: {self.count} unit(s) x {self.params_per_unit:,} params, "
                f"{self.flops_per_token_per_unit:,} FLOPs/token each")
        lines = [head]
        if i is None:
            lines.append("  removing unit i touches:")
        else:
            lines.append(f"  removing unit {i} touches:")
        after: dict[str, list[int]] = {}
        for m in self.members:
            if m.whole:
                rng = "whole"
            elif i is None:
                rng = f"dim {m.dim} [{m.offset} + i*{m.width} : +{m.width}]"
            else:
                a, b = m.span(i)
                rng = f"dim {m.dim} [{a}:{b}]"
            shape_after = after.setdefault(m.param, list(m.shape))
            if m.whole:
                shape_after[:] = [0]
            else:
                shape_after[m.dim] -= m.width
            lines.append(f"    {m.param:<58} {rng}")
        lines.append("  shapes:")
        for m in self.members:
            if m.param in after:
                b = tuple(after.pop(m.param))
                lines.append(f"    {m.param:<58} {tuple(m.shape)} -> {'removed' if b == (0,) else b}")
        for absent, same in self.tied.items():
            lines.append(f"    ({absent} is tied to {same}: it shrinks with it)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.details()

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "layer": self.layer, "count": self.count}
        if self.name:
            d["name"] = self.name
        d["params_per_unit"] = self.params_per_unit
        d["flops_per_token_per_unit"] = self.flops_per_token_per_unit
        if self.attn_flops_coeff:
            d["attn_flops_coeff"] = self.attn_flops_coeff
            d["window"] = self.window
        if self.tied:
            d["tied"] = dict(self.tied)
        d["members"] = [m.to_dict() for m in self.members]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Group":
        return cls(kind=d["kind"], layer=d["layer"], count=d["count"],
                   members=[Member(m["param"], m["dim"], m["offset"], m["width"], tuple(m["shape"]),
                                   m.get("whole", False)) for m in d["members"]],
                   params_per_unit=d["params_per_unit"], flops_per_token_per_unit=d["flops_per_token_per_unit"],
                   name=d.get("name", ""), attn_flops_coeff=d.get("attn_flops_coeff", 0),
                   window=d.get("window"), tied=dict(d.get("tied", {})))


@dataclass
class Graph:
    """Every prunable coupled unit of one model, plus its parameter accounting."""

    family: str
    config: dict
    groups: list[Group]
    accounting_data: dict = field(default_factory=dict, repr=False)
    tied: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    # ---- config summary shortcuts ----
    @property
    def n_layers(self) -> int:
        return self.config["layers"]

    @property
    def hidden(self) -> int:
        return self.config["hidden"]

    @property
    def n_heads(self) -> int:
        return self.config["heads"]

    @property
    def n_kv(self) -> int:
        return self.config["kv_heads"]

    @property
    def head_dim(self) -> int:
        return self.config["head_dim"]

    @property
    def intermediate(self) -> int:
        return self.config["intermediate"]

    @property
    def vocab(self) -> int:
        return self.config["vocab"]

    @property
    def is_tied(self) -> bool:
        return self.config["tied"]

    # ---- lookups ----
    def groups_of(self, kind: str, layer: int | None = None) -> list[Group]:
        """Groups of ``kind``; with ``layer``, only that layer's (hidden channels have layer None)."""
        if kind not in KINDS:
            raise ValueError(f"unknown unit kind {kind!r}; kinds are {', '.join(KINDS)}")
        return [g for g in self.groups if g.kind == kind and (layer is None or g.layer == layer)]

    def group(self, kind: str, layer: int | None = None) -> Group:
        """The single group of ``kind`` in ``layer`` (the residual-stream one for hidden channels)."""
        gs = [g for g in self.groups_of(kind, layer) if g.layer == layer and (kind != HIDDEN_CHANNEL or g.name == "residual")]
        if len(gs) != 1:
            raise KeyError(f"{len(gs)} groups of kind {kind!r} in layer {layer}")
        return gs[0]

    def channel_group(self, kind: str, layer: int, kv_group: int) -> Group:
        """The ``qk_channel`` / ``v_channel`` group of one KV group of ``layer``."""
        gs = [g for g in self.groups_of(kind, layer) if g.name == f"kv{kv_group}"]
        if len(gs) != 1:
            raise KeyError(f"{len(gs)} groups of kind {kind!r} for KV group {kv_group} in layer {layer}")
        return gs[0]

    def units(self, kind: str, layer: int | None = None):
        for g in self.groups_of(kind, layer):
            yield from g.units()

    def count(self, kind: str, layer: int | None = None) -> int:
        return sum(g.count for g in self.groups_of(kind, layer))

    # ---- accounting ----
    def accounting(self) -> dict:
        """Where every parameter is: embeddings, position_embeddings, embed_projections, final_norm,
        lm_head (0 if tied) and per layer attention (kv groups + attention_shared), ffn (channels +
        ffn_shared), norms and block = attention + ffn + norms; ``total`` counts tied weights once."""
        return self.accounting_data

    @property
    def total_params(self) -> int:
        return self.accounting_data["total"]

    # ---- serialization ----
    def to_dict(self) -> dict:
        return {"format": FORMAT, "family": self.family, "config": self.config, "tied": self.tied,
                "notes": self.notes, "accounting": self.accounting_data,
                "groups": [g.to_dict() for g in self.groups]}

    def to_json(self, indent: bool = True) -> str:
        """JSON text; one member per line so that diffs of the golden files stay readable."""
        if not indent:
            return json.dumps(self.to_dict(), separators=(",", ":"))
        d = self.to_dict()
        groups = d.pop("groups")
        out = ["{"]
        for k, v in d.items():
            out.append(f" {json.dumps(k)}: {json.dumps(v)},")
        out.append(' "groups": [')
        for gi, g in enumerate(groups):
            members = g.pop("members")
            head = json.dumps(g)[:-1]
            out.append(f"  {head}, \"members\": [")
            out += [f"   {json.dumps(m)}{',' if mi < len(members) - 1 else ''}" for mi, m in enumerate(members)]
            out.append(f"  ]}}{',' if gi < len(groups) - 1 else ''}")
        out.append(" ]")
        out.append("}")
        return "\n".join(out) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "Graph":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} graph (format={d.get('format')!r})")
        return cls(family=d["family"], config=d["config"], groups=[Group.from_dict(g) for g in d["groups"]],
                   accounting_data=d["accounting"], tied=dict(d.get("tied", {})), notes=list(d.get("notes", [])))

    @classmethod
    def from_json(cls, text: str) -> "Graph":
        return cls.from_dict(json.loads(text))

    # ---- human-readable ----
    def summary_text(self) -> str:
        from .render import summary_text
        return summary_text(self)

    def to_dot(self) -> str:
        from .render import to_dot
        return to_dot(self)

    def __str__(self) -> str:
        return self.summary_text()


def as_plain(obj):
    """dataclass -> dict (for callers that want plain data)."""
    return asdict(obj)
