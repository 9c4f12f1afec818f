"""A prune plan: what to keep and what to remove, in the graph's units, as plain JSON data.

Methods produce plans; :mod:`structlm.surgery` applies them (``mask`` zeroes the units in the
unshrunk model, ``shrink`` removes them physically).  A plan is validated against the graph and
can report the resulting shapes, parameter count and FLOPs before anything is touched.

JSON form::

    {"format": "structlm-plan/1", "family": "llama",
     "layers": {"3": {"kv_groups": [0, 2], "ffn_channels": [0, 5, ...]},
                "7": {"attention": false}},
     "removed_blocks": [12, 13], "hidden_channels": null, "align": 8, "meta": {...}}

Per layer (every key optional; absent means "keep all"): ``kv_groups`` kept KV groups,
``query_heads`` kept query heads (layer-global head indices; under GQA every kept KV group
must keep the same number of its heads), ``ffn_channels`` kept FFN channels, ``attention`` /
``ffn`` false to remove the whole sublayer.  ``removed_blocks`` lists whole blocks removed;
``hidden_channels`` the kept residual channels (null = all).

Head-dimension units (MoDeGPT): ``qk_channels`` / ``v_channels`` map each kept KV group (a JSON
key "0", "1", ...) to its kept ``qk_channel`` / ``v_channel`` indices (graph units: a rotary pair
``d`` = dims (d, d + head_dim/2) of the group's q and k heads, or one dim with learned
positions; a v dim with the o_proj columns of the group's query heads).  When present, every
kept KV group of the layer is listed, with the same count in each.  ``qk_channels`` is refused on
families whose q/k norms act over the head dim (Qwen3, Gemma 3).

Optional ``updates`` (weight reconstruction: ZipLM's re-fitted projections, FLAP's bias
compensation): ``{param name: tensor}``, new values of surviving parameters in the *shrunk*
coordinates (the shape the parameter has after ``shrink``).  They are saved beside ``plan.json``
as ``updates.safetensors`` (``plan.json`` names the file and lists each parameter's shape), never
as JSON numbers.  ``shrink`` writes them after slicing; ``mask`` writes them expanded into the
unshrunk model (zeros at removed positions), so both still give the same logits.  A new output
bias that the model lacks is created where the family's config can express it (Llama:
``attention_bias``/``mlp_bias`` turned on, the other projections' new biases zero).  Plans of
format 1 with a ``biases`` key (values as JSON lists) still load, as updates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .graph import Graph

FORMAT = "structlm-plan/1"
UPDATES_FILE = "updates.safetensors"


class PlanError(ValueError):
    """A plan that does not fit the model's graph."""


@dataclass
class LayerPlan:
    kv_groups: list[int] | None = None
    query_heads: list[int] | None = None
    ffn_channels: list[int] | None = None
    attention: bool = True
    ffn: bool = True
    qk_channels: dict[int, list[int]] | None = None
    v_channels: dict[int, list[int]] | None = None

    def to_dict(self) -> dict:
        d = {}
        for key in ("kv_groups", "query_heads", "ffn_channels"):
            if getattr(self, key) is not None:
                d[key] = sorted(int(i) for i in getattr(self, key))
        for key in ("qk_channels", "v_channels"):
            if getattr(self, key) is not None:
                d[key] = {str(g): sorted(int(i) for i in kept) for g, kept in sorted(getattr(self, key).items())}
        if not self.attention:
            d["attention"] = False
        if not self.ffn:
            d["ffn"] = False
        return d

    @property
    def is_identity(self) -> bool:
        return not self.to_dict()


@dataclass
class PrunePlan:
    layers: dict[int, LayerPlan] = field(default_factory=dict)
    removed_blocks: list[int] = field(default_factory=list)
    hidden_channels: list[int] | None = None
    family: str | None = None
    align: int = 8
    meta: dict = field(default_factory=dict)
    updates: dict[str, torch.Tensor] = field(default_factory=dict)

    def layer(self, i: int) -> LayerPlan:
        return self.layers.get(i) or LayerPlan()

    # ---- serialization ----
    def to_dict(self) -> dict:
        layers = {str(i): lp.to_dict() for i, lp in sorted(self.layers.items()) if not lp.is_identity}
        d = {"format": FORMAT, "family": self.family, "layers": layers,
             "removed_blocks": sorted(int(b) for b in self.removed_blocks),
             "hidden_channels": None if self.hidden_channels is None else sorted(int(c) for c in self.hidden_channels),
             "align": self.align, "meta": self.meta}
        if self.updates:
            d["updates"] = {"file": UPDATES_FILE,
                            "params": {name: list(t.shape) for name, t in sorted(self.updates.items())}}
        return d

    def save(self, folder) -> Path:
        """Write ``plan.json`` (and ``updates.safetensors`` when there are updates) into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if self.updates:
            save_file({n: t.detach().contiguous().cpu() for n, t in self.updates.items()}, str(folder / UPDATES_FILE))
        path = folder / "plan.json"
        path.write_text(self.to_json())
        return path

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        """A plan from its JSON object, every value type-checked (a PlanError names the key)."""
        if not isinstance(d, dict):
            raise PlanError(f"a plan is a JSON object {{\"format\": \"{FORMAT}\", \"layers\": {{...}}, ...}}, "
                            f"not a {type(d).__name__}")
        if d.get("format", FORMAT) != FORMAT:
            raise PlanError(f"not a {FORMAT} plan (format={d.get('format')!r})")
        unknown = set(d) - {"format", "family", "layers", "removed_blocks", "hidden_channels", "align", "meta",
                            "biases", "updates"}
        if unknown:
            raise PlanError(f"unknown plan keys {sorted(unknown)}")
        raw_layers = d.get("layers") or {}
        if not isinstance(raw_layers, dict):
            raise PlanError("layers must be an object {\"LAYER\": {...}}, e.g. {\"3\": {\"ffn\": false}}")
        layers = {}
        for key, lp in raw_layers.items():
            if not (isinstance(key, str) and key.strip().lstrip("-").isdigit()):
                raise PlanError(f"layers: key {key!r} must be a layer number")
            if not isinstance(lp, dict):
                raise PlanError(f"layer {key}: must be an object like {{\"ffn_channels\": [...], \"attention\": false}}, "
                                f"not {lp!r}")
            bad = set(lp) - {"kv_groups", "query_heads", "ffn_channels", "attention", "ffn", "qk_channels",
                             "v_channels"}
            if bad:
                raise PlanError(f"layer {key}: unknown keys {sorted(bad)} (allowed: kv_groups, query_heads, "
                                f"ffn_channels, qk_channels, v_channels, attention, ffn)")
            lp = dict(lp)
            for chan in ("qk_channels", "v_channels"):
                if lp.get(chan) is not None:
                    lp[chan] = _check_channel_map(f"layer {key} {chan}", lp[chan])
            for flag in ("attention", "ffn"):
                if flag in lp and not isinstance(lp[flag], bool):
                    raise PlanError(f"layer {key} {flag}: must be true or false, not {lp[flag]!r}")
            for idx in ("kv_groups", "query_heads", "ffn_channels"):
                if idx in lp and lp[idx] is not None:
                    _check_int_list(f"layer {key} {idx}", lp[idx])
            layers[int(key)] = LayerPlan(**lp)
        blocks = d.get("removed_blocks") or []
        _check_int_list("removed_blocks", blocks)
        hidden = d.get("hidden_channels")
        if hidden is not None:
            _check_int_list("hidden_channels", hidden)
        align = d.get("align", 8)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1:
            raise PlanError(f"align must be a whole number >= 1 (got {align!r})")
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise PlanError(f"meta must be an object, not {meta!r}")
        family = d.get("family")
        if family is not None and not isinstance(family, str):
            raise PlanError(f"family must be a family name such as \"llama\", not {family!r}")
        return cls(layers=layers, removed_blocks=list(blocks), hidden_channels=hidden, family=family,
                   align=align, meta=dict(meta), updates=_legacy_biases(d.get("biases")))

    @classmethod
    def load(cls, path) -> "PrunePlan":
        """Read ``plan.json`` and, if it names one, the updates file beside it."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON: {e}") from e
        except UnicodeDecodeError as e:
            raise PlanError(f"{path} is not a text (JSON) file: {e}") from e
        except FileNotFoundError as e:
            raise PlanError(f"plan file {path} not found") from e
        except IsADirectoryError as e:
            raise PlanError(f"{path} is a folder; give the plan.json file in it") from e
        plan = cls.from_dict(d)
        if isinstance(d, dict) and d.get("updates"):
            plan.updates = _read_updates(path, d["updates"])
        return plan

    # ---- derived numbers ----
    def kept_heads(self, graph: Graph, i: int) -> list[int]:
        """Kept query heads of layer ``i`` (layer-global indices)."""
        lp = self.layer(i)
        if not lp.attention or i in self.removed_blocks:
            return []
        per_group = graph.n_heads // graph.n_kv
        groups = range(graph.n_kv) if lp.kv_groups is None else lp.kv_groups
        in_groups = [h for g in sorted(groups) for h in range(g * per_group, (g + 1) * per_group)]
        return in_groups if lp.query_heads is None else [h for h in in_groups if h in set(lp.query_heads)]

    def kept_kv_groups(self, graph: Graph, i: int) -> list[int]:
        lp = self.layer(i)
        if not lp.attention or i in self.removed_blocks:
            return []
        return sorted(range(graph.n_kv) if lp.kv_groups is None else lp.kv_groups)

    def kept_ffn(self, graph: Graph, i: int) -> list[int]:
        lp = self.layer(i)
        if not lp.ffn or i in self.removed_blocks:
            return []
        return list(range(graph.intermediate)) if lp.ffn_channels is None else sorted(lp.ffn_channels)

    def kept_hidden(self, graph: Graph) -> list[int]:
        return list(range(graph.hidden)) if self.hidden_channels is None else sorted(self.hidden_channels)

    # ---- validation ----
    def validate(self, graph: Graph) -> "PrunePlan":
        """Raise PlanError naming the first problem; return self when the plan fits ``graph``."""
        if self.family and self.family != graph.family:
            raise PlanError(f"the plan is for family {self.family!r}, the model is {graph.family!r}")
        n = graph.n_layers
        _check_indices("removed_blocks", self.removed_blocks, n)
        if len(set(self.removed_blocks)) == n:
            raise PlanError("the plan removes every block; keep at least one")
        per_group = graph.n_heads // graph.n_kv
        for i, lp in self.layers.items():
            where = f"layer {i}"
            if not 0 <= i < n:
                raise PlanError(f"{where}: the model has layers 0..{n - 1}")
            if i in self.removed_blocks and not lp.is_identity:
                raise PlanError(f"{where}: the block is removed, so it cannot also have a layer plan")
            if lp.kv_groups is not None:
                _check_indices(f"{where} kv_groups", lp.kv_groups, graph.n_kv)
                if not lp.kv_groups and lp.attention:
                    raise PlanError(f"{where}: no KV group kept; remove the attention sublayer instead "
                                    f"(\"attention\": false)")
            if lp.query_heads is not None:
                _check_indices(f"{where} query_heads", lp.query_heads, graph.n_heads)
                groups = set(range(graph.n_kv) if lp.kv_groups is None else lp.kv_groups)
                stray = sorted(h for h in lp.query_heads if h // per_group not in groups)
                if stray:
                    raise PlanError(f"{where}: query heads {stray} belong to removed KV groups")
                counts = {g: sum(1 for h in lp.query_heads if h // per_group == g) for g in groups}
                if len(set(counts.values())) > 1:
                    raise PlanError(f"{where}: kept query heads per KV group differ ({counts}); stock "
                                    f"attention needs the same number in every kept group")
                if lp.attention and not lp.query_heads:
                    raise PlanError(f"{where}: no query head kept; remove the attention sublayer instead")
            self._validate_channels(graph, i, lp)
            if lp.ffn_channels is not None:
                _check_indices(f"{where} ffn_channels", lp.ffn_channels, graph.intermediate)
                if not lp.ffn_channels and lp.ffn:
                    raise PlanError(f"{where}: no FFN channel kept; remove the FFN sublayer instead (\"ffn\": false)")
        if self.hidden_channels is not None:
            _check_indices("hidden_channels", self.hidden_channels, graph.hidden)
            if not self.hidden_channels:
                raise PlanError("hidden_channels is empty; keep at least one residual channel")
        if self.align < 1:
            raise PlanError(f"align must be >= 1 (got {self.align})")
        if self.updates:
            self._validate_updates(graph)
        return self

    def _validate_channels(self, graph: Graph, i: int, lp: LayerPlan) -> None:
        where = f"layer {i}"
        for key, kind in (("qk_channels", "qk_channel"), ("v_channels", "v_channel")):
            chans = getattr(lp, key)
            if chans is None or not lp.attention:
                continue
            if not graph.groups_of(kind, i):
                if kind == "qk_channel" and graph.config.get("qk_channel_refusal"):
                    raise PlanError(f"{where}: {graph.config['qk_channel_refusal']}")
                raise PlanError(f"{where}: the graph has no {kind} units")
            kept_groups = self.kept_kv_groups(graph, i)
            if sorted(chans) != kept_groups:
                raise PlanError(f"{where} {key}: lists KV groups {sorted(chans)}, the layer keeps {kept_groups}; "
                                f"give the kept channels of every kept KV group")
            size = graph.channel_group(kind, i, kept_groups[0]).count
            for g, kept in chans.items():
                _check_indices(f"{where} {key} group {g}", kept, size)
            counts = {g: len(kept) for g, kept in chans.items()}
            if len(set(counts.values())) > 1:
                raise PlanError(f"{where} {key}: kept channels per KV group differ ({counts}); every KV group "
                                f"of a layer keeps the same number")
            if not next(iter(counts.values())):
                raise PlanError(f"{where} {key}: no channel kept; remove the attention sublayer instead "
                                f"(\"attention\": false)")

    def kept_channels(self, graph: Graph, i: int, kind: str, kv_group: int) -> list[int]:
        """Kept ``qk_channel`` / ``v_channel`` indices of one kept KV group (all when the plan is silent)."""
        chans = getattr(self.layer(i), "qk_channels" if kind == "qk_channel" else "v_channels")
        if chans is not None and kv_group in chans:
            return sorted(chans[kv_group])
        gs = [g for g in graph.groups_of(kind, i) if g.name == f"kv{kv_group}"]
        return list(range(gs[0].count)) if gs else []

    def head_dims(self, graph: Graph, i: int) -> tuple[int, int]:
        """(q/k head dim, v head dim) of layer ``i`` after the plan (the original head_dim when kept)."""
        groups = self.kept_kv_groups(graph, i)
        if not groups:
            return 0, 0
        g = groups[0]
        qk = graph.groups_of("qk_channel", i)
        per = graph.head_dim // qk[0].count if qk else 1
        qk_dim = per * len(self.kept_channels(graph, i, "qk_channel", g)) if qk else graph.head_dim
        return qk_dim, len(self.kept_channels(graph, i, "v_channel", g))

    def shrunk_shapes(self, graph: Graph) -> dict[str, tuple[int, ...]]:
        """The shape every surviving parameter of the graph has after the plan (removed ones left out)."""
        from .surgery import removed_units

        dense: dict[str, tuple] = {}
        for g in graph.groups:
            for m in g.members:
                dense.setdefault(m.param, tuple(m.shape))
        gone = set()
        for i in range(graph.n_layers):
            lp = self.layer(i)
            for kind in ("attention", "ffn"):
                if i in self.removed_blocks or not getattr(lp, kind):
                    gone |= {m.param for m in graph.group(kind, i).members}
        removed: dict[tuple[str, int], set] = {}
        for unit in removed_units(self, graph):
            if unit.kind in ("attention", "ffn", "block"):
                continue
            for name, dim, a, b in unit.slices:
                removed.setdefault((name, dim), set()).update(range(a, b))
        out = {}
        for name, shape in dense.items():
            if name in gone:
                continue
            out[name] = tuple(n - len(removed.get((name, d), ())) for d, n in enumerate(shape))
        return out

    def _validate_updates(self, graph: Graph) -> None:
        """Each update is for a surviving parameter and has its shrunk shape; a new bias (one the
        model lacks) must belong to an output projection (a residual-stream writer) of a kept sublayer."""
        shapes = self.shrunk_shapes(graph)
        writer_dim = 1 if graph.family == "gpt2" else 0  # GPT-2 Conv1D weights are [in, out]
        writers = {m.param for m in graph.group("hidden_channel", None).members
                   if len(m.shape) == 2 and m.dim == writer_dim}
        owner = {m.param: (g.layer, g.kind) for g in graph.groups if g.kind in ("attention", "ffn") for m in g.members}
        n_hidden = len(self.kept_hidden(graph))
        for name, value in self.updates.items():
            if not isinstance(value, torch.Tensor):
                raise PlanError(f"updates: {name!r} is not a tensor")
            if not bool(torch.isfinite(value).all()):
                raise PlanError(f"updates: {name!r} has NaN or Inf values")
            if name in owner and name not in shapes:
                i, kind = owner[name]
                raise PlanError(f"updates: {name!r} belongs to a removed {kind} sublayer of layer {i}")
            if name in shapes:
                if tuple(value.shape) != shapes[name]:
                    raise PlanError(f"updates: {name!r} has shape {tuple(value.shape)}; after the plan it has "
                                    f"shape {shapes[name]} (updates are in the shrunk coordinates)")
                continue
            weight = name[:-len(".bias")] + ".weight" if name.endswith(".bias") else None
            if weight not in writers or owner.get(weight) is None:
                raise PlanError(f"updates: {name!r} is not a parameter of this model (nor a new bias of a layer's "
                                f"output projection)")
            i, kind = owner[weight]
            if weight not in shapes:
                raise PlanError(f"updates: {name!r} belongs to a removed {kind} sublayer of layer {i}")
            if tuple(value.shape) != (n_hidden,):
                raise PlanError(f"updates: {name!r} has shape {tuple(value.shape)} for {n_hidden} kept hidden channels")

    # ---- shapes and costs ----
    def shapes(self, graph: Graph) -> list[dict]:
        """Per original layer: kept heads, KV heads, FFN width, sublayers (after the plan)."""
        rows = []
        for i in range(graph.n_layers):
            removed = i in self.removed_blocks
            rows.append({"layer": i, "block": not removed,
                         "attention": not removed and self.layer(i).attention,
                         "ffn": not removed and self.layer(i).ffn,
                         "heads": len(self.kept_heads(graph, i)), "kv_heads": len(self.kept_kv_groups(graph, i)),
                         "ffn_channels": len(self.kept_ffn(graph, i)),
                         "qk_head_dim": self.head_dims(graph, i)[0], "v_head_dim": self.head_dims(graph, i)[1]})
        return rows

    def cost(self, graph: Graph) -> dict:
        """Parameters and weight-matmul FLOPs per token after the plan (from the graph's units)."""
        acc = graph.accounting()
        hidden_kept = len(self.kept_hidden(graph))
        hidden_scale = hidden_kept / graph.hidden
        params = 0
        flops = 0
        dense_flops = 0
        for i in range(graph.n_layers):
            layer_acc = acc["layers"][i]
            kv = graph.group("kv_group", i)
            qh = graph.group("query_head", i)
            ffn = graph.group("ffn_channel", i)
            per_group = graph.n_heads // graph.n_kv
            # a KV group's cost includes its query heads; extra removed heads inside kept groups
            # subtract their own q/o cost
            heads, groups = len(self.kept_heads(graph, i)), len(self.kept_kv_groups(graph, i))
            attn_p = groups * kv.params_per_unit - (groups * per_group - heads) * qh.params_per_unit
            attn_f = groups * kv.flops_per_token_per_unit - (groups * per_group - heads) * qh.flops_per_token_per_unit
            chan_p, chan_f = self._channel_cost(graph, i)
            attn_p -= chan_p
            attn_f -= chan_f
            ffn_p = len(self.kept_ffn(graph, i)) * ffn.params_per_unit
            ffn_f = len(self.kept_ffn(graph, i)) * ffn.flops_per_token_per_unit
            dense_flops += graph.n_kv * kv.flops_per_token_per_unit + graph.intermediate * ffn.flops_per_token_per_unit
            if i in self.removed_blocks:
                continue
            shared_attn = sum(layer_acc["attention_shared"].values()) if self.layer(i).attention else 0
            shared_ffn = sum(layer_acc["ffn_shared"].values()) if self.layer(i).ffn else 0
            norms = layer_acc["norms"]
            lp = self.layer(i)
            if graph.config.get("pre_norm", True):  # post-LN keeps a removed sublayer's norm
                norms -= 0 if lp.attention else _sublayer_norms(graph, "attention", i)
                norms -= 0 if lp.ffn else _sublayer_norms(graph, "ffn", i)
            params += round((attn_p + ffn_p + norms + shared_attn + shared_ffn) * hidden_scale)
            flops += round((attn_f + ffn_f) * hidden_scale)
        outside = acc["total"] - sum(layer["block"] for layer in acc["layers"])
        params += round(outside * hidden_scale)
        lm_flops = 2 * graph.vocab * graph.hidden
        return {"params": params, "params_ratio": params / acc["total"],
                "flops_per_token": flops + round(lm_flops * hidden_scale),
                "flops_ratio": (flops + lm_flops * hidden_scale) / (dense_flops + lm_flops),
                "dense_params": acc["total"]}

    def _channel_cost(self, graph: Graph, i: int) -> tuple[int, int]:
        """Parameters and FLOPs/token of the head-dimension units the plan removes in layer ``i``,
        counting only the rows/columns of kept query heads (a removed head's are already gone)."""
        lp = self.layer(i)
        if (lp.qk_channels is None and lp.v_channels is None) or not lp.attention or i in self.removed_blocks:
            return 0, 0
        per_group = graph.n_heads // graph.n_kv
        kept_heads = set(self.kept_heads(graph, i))
        params = flops = 0
        for g in self.kept_kv_groups(graph, i):
            h = sum(1 for q in range(g * per_group, (g + 1) * per_group) if q in kept_heads)
            if lp.qk_channels is not None:
                grp = graph.channel_group("qk_channel", i, g)
                n = grp.count - len(lp.qk_channels[g])   # a unit is the same rows of k and each q head
                params += n * grp.params_per_unit * (h + 1) // (per_group + 1)
                flops += n * grp.flops_per_token_per_unit * (h + 1) // (per_group + 1)
            if lp.v_channels is not None:
                grp = graph.channel_group("v_channel", i, g)
                n = grp.count - len(lp.v_channels[g])    # a unit is one v row + one o column per q head
                o_col = graph.hidden
                params += n * (grp.params_per_unit - (per_group - h) * o_col)
                flops += n * (grp.flops_per_token_per_unit - 2 * (per_group - h) * o_col)
        return params, flops

    def summary_text(self, graph: Graph) -> str:
        cost = self.cost(graph)
        lines = [f"plan for {graph.family}: {cost['params']:,} of {cost['dense_params']:,} parameters kept "
                 f"({cost['params_ratio']:.1%}), weight FLOPs/token {cost['flops_ratio']:.1%} of dense"]
        if self.hidden_channels is not None:
            lines.append(f"hidden channels: {len(self.hidden_channels)} of {graph.hidden}")
        lines.append(f"{'layers':>7}  {'attention':<14}  {'ffn':<12}")
        runs: list[list] = []  # consecutive layers of the same shape share a line
        for row in self.shapes(graph):
            if not row["block"]:
                text = "block removed"
            else:
                attn = f"{row['heads']}q/{row['kv_heads']}kv" if row["attention"] else "removed"
                if row["attention"] and (row["qk_head_dim"], row["v_head_dim"]) != (graph.head_dim, graph.head_dim):
                    attn += f" d{row['qk_head_dim']}/{row['v_head_dim']}"
                ffn = f"{row['ffn_channels']}" if row["ffn"] else "removed"
                text = f"{attn:<14}  {ffn:<12}"
            if runs and runs[-1][2] == text:
                runs[-1][1] = row["layer"]
            else:
                runs.append([row["layer"], row["layer"], text])
        for first, last, text in runs:
            span = f"{first}" if first == last else f"{first}-{last}"
            lines.append(f"{span:>7}  {text}")
        return "\n".join(lines)


def _check_channel_map(what: str, value) -> dict[int, list[int]]:
    """{"KV group": [kept channel indices]} -> {int: list}, type-checked."""
    if not isinstance(value, dict):
        raise PlanError(f"{what}: must be an object {{\"KV group\": [kept channels]}}, e.g. {{\"0\": [0, 3], "
                        f"\"1\": [1, 2]}}, not {value!r}")
    out = {}
    for g, kept in value.items():
        if isinstance(g, int) and not isinstance(g, bool):
            g = str(g)
        if not (isinstance(g, str) and g.strip().isdigit()):
            raise PlanError(f"{what}: key {g!r} must be a KV group number")
        _check_int_list(f"{what} group {g}", kept)
        out[int(g)] = list(kept)
    return out


def _check_int_list(what: str, values) -> None:
    """A list of whole numbers (not strings, not booleans, not floats)."""
    if not isinstance(values, list):
        raise PlanError(f"{what}: must be a list of integer indices, not {values!r}")
    bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise PlanError(f"{what}: indices must be integers (got {bad[:3]!r}); write 3, not \"3\"")


def _legacy_biases(biases) -> dict[str, torch.Tensor]:
    """Format-1 plans wrote FLAP's new biases as JSON lists: read them as updates."""
    if biases is None:
        return {}
    if not isinstance(biases, dict):
        raise PlanError("biases must be an object {param name: [values]}")
    out = {}
    for name, values in biases.items():
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise PlanError(f"biases: {name!r} must be a list of numbers")
        if not all(math.isfinite(v) for v in values):
            raise PlanError(f"biases: {name!r} has NaN or Inf values")
        out[str(name)] = torch.tensor(values, dtype=torch.float32)
    return out


def _read_updates(plan_path: Path, spec) -> dict[str, torch.Tensor]:
    """The updates file a plan names, checked against the shapes ``plan.json`` lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(spec, dict) or not isinstance(spec.get("file"), str) or not isinstance(spec.get("params"), dict):
        raise PlanError(f"{plan_path}: updates must be {{\"file\": \"{UPDATES_FILE}\", \"params\": {{name: shape}}}}")
    file = plan_path.parent / spec["file"]
    try:
        tensors = load_file(str(file))
    except FileNotFoundError:
        raise PlanError(f"{plan_path} names the weight updates file {file}, which is missing; copy it beside "
                        f"plan.json") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise PlanError(f"the weight updates file {file} is damaged ({e})") from None
    if set(tensors) != set(spec["params"]):
        raise PlanError(f"{file} holds {sorted(tensors)[:3]}..., but {plan_path} lists {sorted(spec['params'])[:3]}...")
    for name, shape in spec["params"].items():
        if list(tensors[name].shape) != list(shape):
            raise PlanError(f"{file}: {name!r} has shape {list(tensors[name].shape)}, {plan_path} says {shape}")
    return tensors


def _sublayer_norms(graph: Graph, kind: str, i: int) -> int:
    """Parameters of a sublayer's own norms: the whole sublayer minus its units and shared params."""
    layer_acc = graph.accounting()["layers"][i]
    if kind == "attention":
        units = graph.group("kv_group", i).params
        shared = sum(layer_acc["attention_shared"].values())
    else:
        units = graph.group("ffn_channel", i).params
        shared = sum(layer_acc["ffn_shared"].values())
    return graph.group(kind, i).params - units - shared


def _check_indices(what: str, indices, size: int) -> None:
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < size]
    if bad:
        raise PlanError(f"{what}: indices {bad[:5]} out of range 0..{size - 1}")
    if len(set(indices)) != len(indices):
        raise PlanError(f"{what}: an index is listed twice")


def align_count(n: int, multiple: int, maximum: int) -> int:
    """Round a kept width up to a multiple (toward keeping more), never above ``maximum``."""
    if multiple <= 1 or n == 0:
        return n
    return min(maximum, -(-n // multiple) * multiple)


def align_kept(kept: list[int], scores, multiple: int, size: int) -> list[int]:
    """Add back the best-scored removed indices until ``len(kept)`` is a multiple of ``multiple``
    (or everything is kept).  Without scores, the lowest removed indices come back."""
    target = align_count(len(kept), multiple, size)
    if target == len(kept):
        return sorted(kept)
    kept_set = set(kept)
    removed = [i for i in range(size) if i not in kept_set]
    if scores is not None:
        removed.sort(key=lambda i: -float(scores[i]))
    return sorted(kept_set | set(removed[: target - len(kept)]))


def align_plan(plan: PrunePlan, graph: Graph, multiple: int | None = None, scores: dict | None = None) -> PrunePlan:
    """Round every kept FFN width (and the hidden width) up to ``multiple`` (default: plan.align).
    ``scores`` may map ("ffn_channel", layer) / ("hidden_channel", None) to per-unit scores."""
    multiple = plan.align if multiple is None else multiple
    scores = scores or {}
    for i, lp in plan.layers.items():
        if lp.ffn_channels is not None and lp.ffn:
            lp.ffn_channels = align_kept(lp.ffn_channels, scores.get(("ffn_channel", i)), multiple, graph.intermediate)
    if plan.hidden_channels is not None:
        plan.hidden_channels = align_kept(plan.hidden_channels, scores.get(("hidden_channel", None)), multiple,
                                          graph.hidden)
    plan.align = multiple
    return plan
