"""A latency table: measured times of one model shape's parts in one regime, and the prediction
of a plan's latency from them.

What is stored (per-layer times are "the time one decoder layer of this configuration adds to
the decoder stack", measured on probes of identical layers, see :mod:`structlm.latency.measure`):

* ``base_ms``: the whole model with no decoder layers (embedding, final norm, lm_head of the
  last position, the stack's fixed work: rotary tables, masks);
* per layer kind (Gemma 3: ``sliding_attention`` / ``full_attention``), ``dense_ms`` (a dense
  layer) and ``attention_ms[GxQ]`` (a layer whose FFN is removed, keeping G KV groups of Q query
  heads each);
* ``ffn.ms`` at the widths ``ffn.widths`` (a layer whose attention is removed), a grid that is
  linearly interpolated at the widths in between (``interpolation`` holds the measured error at
  off-grid widths).

A layer that keeps both sublayers costs ``attention_ms[a] + ffn(f) - joint`` with
``joint = attention_ms[full] + ffn(full) - dense_ms`` (the work both sublayers' layers share:
residual adds, the layer call); exact for dense layers and for layers with one sublayer removed.
A removed block costs nothing.  ``predict`` sums ``base_ms`` and the layers.  ``calibration.factor``
scales every layer so that the dense model's prediction equals its end-to-end measurement (a layer
in an 8-layer probe and the same layer in the whole model differ by a few percent: caches, the
probe's shorter run); the plans of the validation benchmark test what remains.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .regime import LatencyError, Regime

FORMAT = "structlm-latency/1"


def fingerprint(graph) -> dict:
    """The model shape a table is valid for (widths, kinds and vocabulary; not the layer count)."""
    c = graph.config
    return {"family": graph.family, "hidden": c["hidden"], "heads": c["heads"], "kv_heads": c["kv_heads"],
            "head_dim": c["head_dim"], "intermediate": c["intermediate"], "vocab": c["vocab"],
            "tied": bool(graph.is_tied), "layer_kinds": sorted(set(layer_kinds(graph)))}


def layer_kinds(graph) -> list[str]:
    return list(graph.config.get("layer_types") or ["full_attention"] * graph.n_layers)


def attention_key(groups: int, per_group: int) -> str:
    return f"{groups}x{per_group}"


def cache_dir() -> Path:
    root = os.environ.get("STRUCTLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "structlm")
    return Path(root) / "latency"


def cache_key(model_fingerprint: dict, regime: Regime, hardware: dict, software: dict, protocol: dict) -> str:
    blob = json.dumps([model_fingerprint, regime.to_dict(), hardware, software, protocol], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class LatencyTable:
    def __init__(self, data: dict, source: str | None = None):
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LatencyError(f"{source or 'this file'} is not a {FORMAT} latency table; build one with "
                               f"`structlm latency MODEL --out FILE`")
        self.data = data
        self.source = source
        self.regime = Regime(**data["regime"])
        self._ffn_w = np.asarray(data["ffn"]["widths"], dtype=float)
        self._ffn_ms = np.asarray(data["ffn"]["ms"], dtype=float)
        self.scale = float((data.get("calibration") or {}).get("factor", 1.0))

    # ---- files ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> "LatencyTable":
        path = Path(path)
        if not path.is_file():
            raise LatencyError(f"latency table {path} does not exist; build one with "
                               f"`structlm latency MODEL --out {path}`")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise LatencyError(f"latency table {path} is not readable JSON ({e}); rebuild it with "
                               f"`structlm latency MODEL --out {path}`") from None
        return cls(data, str(path))

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, path)   # never a half-written table at the path
        return path

    # ---- checks --------------------------------------------------------------------------
    def check_model(self, graph) -> None:
        have, want = self.data["model"], fingerprint(graph)
        diff = [f"{k}: table {have.get(k)!r}, model {want[k]!r}" for k in want if have.get(k) != want[k]]
        if diff:
            raise LatencyError(f"latency table {self.source or ''} was measured for another model shape "
                               f"({'; '.join(diff)}); build one for this model with `structlm latency MODEL`")

    # ---- parts ---------------------------------------------------------------------------
    def ffn_ms(self, width: int) -> float:
        """A layer with only an FFN of ``width`` channels (linear interpolation on the grid)."""
        w, ms = self._ffn_w, self._ffn_ms
        if width <= w[0]:       # below the grid: the first segment's slope, through the first point
            slope = (ms[1] - ms[0]) / (w[1] - w[0]) if len(w) > 1 else 0.0
            return float(ms[0] + slope * (width - w[0]))
        if width > w[-1]:
            raise LatencyError(f"FFN width {width} is wider than the table's {int(w[-1])}")
        return float(np.interp(width, w, ms))

    def attention_ms(self, kind: str, groups: int, per_group: int) -> float:
        kinds = self.data["kinds"]
        if kind not in kinds:
            raise LatencyError(f"the latency table has no layers of kind {kind!r} (it has {sorted(kinds)})")
        key = attention_key(groups, per_group)
        got = kinds[kind]["attention_ms"].get(key)
        if got is None:
            raise LatencyError(f"the latency table has no attention with {groups} KV groups of {per_group} "
                               f"query heads (layer kind {kind})")
        return float(got)

    def joint_ms(self, kind: str) -> float:
        k = self.data["kinds"][kind]
        m = self.data["model"]
        full = self.attention_ms(kind, m["kv_heads"], m["heads"] // m["kv_heads"])
        return full + self.ffn_ms(m["intermediate"]) - float(k["dense_ms"])

    def layer_ms(self, kind: str, attention: tuple[int, int] | None, ffn: int | None) -> float:
        """One decoder layer: ``attention`` (KV groups, query heads per group) or None if removed,
        ``ffn`` its width or None if removed; both None: the block is removed (0)."""
        if attention is None and ffn is None:
            return 0.0
        if attention is None:
            return self.scale * self.ffn_ms(ffn)
        a = self.attention_ms(kind, *attention)
        if ffn is None:
            return self.scale * a
        return self.scale * (a + self.ffn_ms(ffn) - self.joint_ms(kind))

    @property
    def base_ms(self) -> float:
        return float(self.data["base_ms"])

    # ---- plans ---------------------------------------------------------------------------
    def layer_configs(self, graph, plan=None) -> list[dict]:
        """Per layer of ``graph``: kind, attention (groups, per group) or None, FFN width or None."""
        kinds = layer_kinds(graph)
        per_group = graph.n_heads // graph.n_kv
        out = []
        removed = set(plan.removed_blocks) if plan is not None else set()
        if plan is not None and plan.hidden_channels is not None and len(plan.hidden_channels) != graph.hidden:
            raise LatencyError("the latency model does not cover hidden-channel pruning (every table entry is "
                               "measured at the model's hidden width); prune without --prune-hidden for a "
                               "latency target, or give a params= target")
        for i in range(graph.n_layers):
            if i in removed:
                out.append({"layer": i, "kind": kinds[i], "attention": None, "ffn": None})
                continue
            lp = plan.layer(i) if plan is not None else None
            attention = (graph.n_kv, per_group)
            ffn = graph.intermediate
            if lp is not None:
                if not lp.attention:
                    attention = None
                else:
                    groups = plan.kept_kv_groups(graph, i)
                    heads = plan.kept_heads(graph, i)
                    attention = (len(groups), len(heads) // max(1, len(groups)))
                ffn = len(plan.kept_ffn(graph, i)) if lp.ffn else None
            out.append({"layer": i, "kind": kinds[i], "attention": attention, "ffn": ffn})
        return out

    def predict(self, graph, plan=None) -> dict:
        """Predicted latency of ``plan`` on ``graph``'s model (the dense model when plan is None):
        total ms and each layer's configuration and ms."""
        self.check_model(graph)
        layers, total = [], self.base_ms
        for cfg in self.layer_configs(graph, plan):
            ms = self.layer_ms(cfg["kind"], cfg["attention"], cfg["ffn"])
            total += ms
            layers.append({**cfg, "attention": None if cfg["attention"] is None else attention_key(*cfg["attention"]),
                           "ms": round(ms, 4)})
        return {"total_ms": total, "base_ms": self.base_ms, "layers": layers, "regime": self.regime.to_dict()}

    def dense_ms(self, graph) -> float:
        return self.predict(graph)["total_ms"]

    def budget_ms(self, graph, target) -> float:
        """The latency a ``speedup=`` or ``latency_ms=`` target allows, in this table's ms."""
        if target.kind == "speedup":
            return self.dense_ms(graph) / target.value
        if target.kind == "latency_ms":
            return float(target.value)
        raise LatencyError(f"{target} is not a latency target")

    # ---- display -------------------------------------------------------------------------
    def text(self) -> str:
        d = self.data
        lines = [f"latency table: {d['model']['family']} (hidden {d['model']['hidden']}, "
                 f"{d['model']['heads']}/{d['model']['kv_heads']} heads, FFN {d['model']['intermediate']})",
                 f"  regime: {self.regime.describe()}",
                 f"  measured on: {d['hardware']['device_name']}; torch {d['software']['torch']}, "
                 f"transformers {d['software']['transformers']}",
                 f"  protocol: probes of {d['protocol']['probe_layers']} identical layers, {d['protocol']['rounds']} "
                 f"rounds, each probe paired with the dense probe (median ratio; largest inter-quartile spread "
                 f"{100 * d['protocol'].get('max_spread', 0):.1f}%)",
                 f"  fixed rest (embedding, final norm, lm_head, stack overhead): {self.base_ms:.3f} ms"]
        for kind, k in d["kinds"].items():
            lines.append(f"  {kind}: dense layer {k['dense_ms']:.3f} ms; attention only (KV groups x heads "
                         f"per group -> ms):")
            items = sorted(k["attention_ms"].items(), key=lambda kv: tuple(int(x) for x in kv[0].split("x")))
            for j in range(0, len(items), 6):
                lines.append("    " + "  ".join(f"{a:>5} {ms:8.3f}" for a, ms in items[j:j + 6]))
        lines.append("  FFN only (width -> ms):")
        pairs = list(zip(d["ffn"]["widths"], d["ffn"]["ms"]))
        for j in range(0, len(pairs), 6):
            lines.append("    " + "  ".join(f"{w:>5} {ms:8.3f}" for w, ms in pairs[j:j + 6]))
        inter = d.get("interpolation")
        if inter:
            lines.append(f"  FFN grid every {d['ffn']['step']} channels; interpolation error at "
                         f"{len(inter['widths'])} off-grid widths: max {100 * inter['max_rel_error']:.1f}%, "
                         f"mean {100 * inter['mean_rel_error']:.1f}%")
        check = d.get("dense_check")
        if check:
            lines.append(f"  dense model: {check['measured_ms']:.2f} ms measured; the probes' sum {check['predicted_ms']:.2f} "
                         f"ms ({100 * check['rel_error']:+.1f}%), so every layer entry is scaled by "
                         f"{self.scale:.4f} (calibration)")
        lines.append(f"  dense model predicted: {d.get('dense_predicted_ms', float('nan')):.2f} ms")
        lines.append(f"  built in {d.get('built_seconds', 0):.0f} s")
        return "\n".join(lines)
