"""ZipLM (Kurtic, Frantar, Alistarh, NeurIPS 2023): structured OBS with weight reconstruction.

Two passes over the calibration data, both on :class:`structlm.calibration.Sequential`:

1. **Level database** (:func:`build_levels`, once per model and calibration set).  For every layer,
   on the Gram matrix H of the input of o_proj (attention) and of down_proj (FFN), dampened by
   ``damp * mean(diag H)`` (structlm.obs), structures are removed one after another by OBS,
   least salient first (``rho_M = tr(W_M ((H^-1)_MM)^-1 W_M^T)``, weights and inverse updated after
   each), down to an empty sublayer.  Attention structures keep the plan's GQA rules: each step
   removes either one query head from every kept KV group (the set of per-group least salient
   heads) or one whole KV group, whichever costs less error per parameter removed.  FFN steps
   remove ``ffn_step`` channels (default: the alignment, 8) at once, the least salient by
   single-column saliency, priced and removed jointly (exact block OBS), so every level is an
   aligned width.  Each level records what is kept, and the summed saliency: the calibration
   squared error of that sublayer's least-squares re-fit (per token, in residual-stream units,
   so sublayers and layers add up).  The database is scored on the dense model's inputs, which
   makes it target-independent: one pass serves every target (``--save-levels DIR`` /
   ``--levels DIR``, format in docs/reconstruction.md).
2. **Allocation** (:func:`allocate_levels`): one level per sublayer minimising the summed error
   under the parameter budget, by dynamic programming over sublayers on the removed-parameter
   count in ``buckets`` steps (each level's removal rounded *down* to a step, so the chosen plan
   never exceeds the budget; the rounding costs at most one step per sublayer).
   ``allocation="uniform"`` takes the same fraction of every sublayer instead (for comparison).
   With ``search="evo"`` the DP's choice is the first parent of an evolutionary search scored by
   the calibration KL of the assembled model (:mod:`structlm.methods._evo`); its winner goes on
   to step 3.
3. **Reconstruction** (:func:`reconstruct`) for the chosen plan, layer by layer: the kept
   columns of o_proj / down_proj are re-fitted by least squares (``W H[:, K] H[K, K]^-1``, the
   OBS optimum) on the inputs the *pruned and reconstructed* earlier layers give
   (``sequential=False``: on the dense inputs).  The new weights go into ``plan.updates`` in
   the shrunk coordinates; the model itself is restored.

Options: ``damp`` (0.01), ``allocation`` ("dp" | "uniform"), ``layers`` ("all"), ``align`` (8),
``ffn_step`` (= align), ``sequential`` (True), ``batch_size`` (8), ``buckets`` (20000),
``levels`` (a :class:`LevelDatabase` or a folder saved by ``save_levels``), ``save_levels``
(folder), ``search`` ("dp" | "evo") with ``evo_generations`` (20), ``evo_offspring`` (8),
``evo_seconds`` (no limit), ``evo_tokens`` (4096), ``evo_seed`` (0).  Families: those the layer
runner runs (llama, mistral, qwen2, qwen3, gemma3, phi3).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed
from . import _evo, register, reject_unknown_options
from ._layers import LayerRunner
from ._width import WidthError, input_dim, parse_layers
from ..calibration import Sequential
from ..families import get_adapter
from ..obs import OBSPath, dampen, least_squares
from ..plan import LayerPlan, PrunePlan, _sublayer_norms
from ..targets import parse_target

LEVELS_FORMAT = "structlm-levels/1"
ALLOCATIONS = ("dp", "uniform")


class ZipLMError(WidthError):
    """Options, levels or a target that ZipLM cannot use."""


# ---- the level database ------------------------------------------------------------------------

@dataclass
class Level:
    """One configuration of a sublayer: what it keeps and the calibration error of its re-fit."""

    error: float
    kv_groups: list[int] | None = None      # attention: kept KV groups
    query_heads: list[int] | None = None    # attention: kept query heads (layer-global indices)
    ffn_kept: int | None = None              # FFN: kept channel count (the first of the removal order survive)
    removed: bool = False                    # the whole sublayer goes

    def to_dict(self) -> dict:
        d = {"error": self.error}
        for key in ("kv_groups", "query_heads", "ffn_kept"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.removed:
            d["removed"] = True
        return d


@dataclass
class SublayerLevels:
    layer: int
    kind: str                               # "attention" | "ffn"
    levels: list[Level]                     # level 0 keeps everything (error 0); the last removes it
    order: list[int] | None = None          # FFN: channel indices, least important (removed first) first
    residual: float | None = None           # mean squared norm of the residual stream entering the layer

    def ffn_channels(self, level: Level, width: int) -> list[int]:
        gone = set(self.order[: width - level.ffn_kept])
        return [c for c in range(width) if c not in gone]


@dataclass
class LevelDatabase:
    fingerprint: dict
    sublayers: list[SublayerLevels]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": LEVELS_FORMAT, "fingerprint": self.fingerprint, "meta": self.meta,
                "sublayers": [{"layer": s.layer, "kind": s.kind, "order": s.order, "residual": s.residual,
                               "levels": [lv.to_dict() for lv in s.levels]} for s in self.sublayers]}

    def save(self, folder) -> Path:
        """Write ``levels.json`` into ``folder`` (atomically: temp file, then rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "levels.json"
        tmp = folder / f".levels.json.{id(self)}.tmp"
        tmp.write_text(json.dumps(self.to_dict()) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, folder) -> "LevelDatabase":
        path = Path(folder)
        path = path / "levels.json" if path.is_dir() else path
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ZipLMError(f"--levels {folder}: no levels.json there (write one with --save-levels DIR)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ZipLMError(f"--levels {path} is not a readable level database ({e})") from None
        if not isinstance(d, dict) or d.get("format") != LEVELS_FORMAT:
            raise ZipLMError(f"--levels {path} is not a {LEVELS_FORMAT} file")
        try:
            subs = [SublayerLevels(int(s["layer"]), str(s["kind"]), [Level(**lv) for lv in s["levels"]], s.get("order"),
                                   s.get("residual"))
                    for s in d["sublayers"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ZipLMError(f"--levels {path}: damaged level database ({type(e).__name__}: {e})") from None
        return cls(d["fingerprint"], subs, d.get("meta") or {})

    def check_model(self, graph, source: str = "the level database") -> None:
        mine = fingerprint(graph)
        if self.fingerprint != mine:
            diff = sorted(k for k in set(mine) | set(self.fingerprint) if mine.get(k) != self.fingerprint.get(k))
            raise ZipLMError(f"{source} was built for another model (differs in {', '.join(diff)}); "
                             f"build it for this model (ziplm without --levels, or with --save-levels DIR)")


def fingerprint(graph) -> dict:
    """What identifies a model's shapes for a level database (weights are not hashed: levels
    from the same shapes but other weights are the user's choice, stated in the database meta)."""
    shape = {k: graph.config.get(k) for k in sorted(graph.config) if isinstance(graph.config.get(k), (int, str))}
    return {"family": graph.family, "total_params": graph.total_params,
            "shape_hash": hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]}


# ---- parameter accounting of one sublayer's levels (as PrunePlan.cost counts them) -------------

def _attention_removed(graph, i: int, level: Level) -> int:
    kv, qh = graph.group("kv_group", i), graph.group("query_head", i)
    full = graph.n_kv * kv.params_per_unit
    if level.removed:
        shared = sum(graph.accounting()["layers"][i]["attention_shared"].values())
        norms = _sublayer_norms(graph, "attention", i) if graph.config.get("pre_norm", True) else 0
        return full + shared + norms
    per_group = graph.n_heads // graph.n_kv
    groups = len(level.kv_groups)
    heads = len(level.query_heads)
    return full - (groups * kv.params_per_unit - (groups * per_group - heads) * qh.params_per_unit)


def _ffn_removed(graph, i: int, level: Level) -> int:
    ffn = graph.group("ffn_channel", i)
    if level.removed:
        shared = sum(graph.accounting()["layers"][i]["ffn_shared"].values())
        norms = _sublayer_norms(graph, "ffn", i) if graph.config.get("pre_norm", True) else 0
        return graph.intermediate * ffn.params_per_unit + shared + norms
    return (graph.intermediate - level.ffn_kept) * ffn.params_per_unit


def removed_params(graph, sub: SublayerLevels, level: Level) -> int:
    return (_attention_removed if sub.kind == "attention" else _ffn_removed)(graph, sub.layer, level)


# ---- pass 1: the OBS paths ------------------------------------------------------------------------

def _projections(model, i: int):
    ad = get_adapter(model.config).bind({n: tuple(p.shape) for n, p in model.named_parameters()})
    return ad.o(i), ad.ffn_out(i)


def _weight(model, proj) -> torch.Tensor:
    """The projection's weight as [outputs, inputs] (GPT-2's Conv1D is stored transposed)."""
    w = model.get_parameter(proj.weight).detach()
    return w if input_dim(model.get_submodule(proj.weight.rpartition(".")[0])) == 1 else w.T


def attention_path(w: torch.Tensor, h: torch.Tensor, n_heads: int, n_kv: int, head_dim: int,
                   head_params: int, group_params: int) -> list[Level]:
    """OBS over query heads / KV groups of one o_proj, from all kept to the sublayer removed."""
    per_group = n_heads // n_kv
    path = OBSPath(w, h)
    heads = {g: list(range(g * per_group, (g + 1) * per_group)) for g in range(n_kv)}

    def cols(hs):
        return [hh * head_dim + d for hh in hs for d in range(head_dim)]

    levels = [Level(0.0, list(range(n_kv)), list(range(n_heads)))]
    while heads:
        candidates = []   # (error per parameter, heads to remove, group removed or None)
        if all(len(v) > 1 for v in heads.values()):
            pick = [min(v, key=lambda hh: path.saliency(cols([hh]))) for v in heads.values()]
            candidates.append((path.saliency(cols(pick)) / (head_params * len(pick)), pick, None))
        if len(heads) > 1:
            for g, v in heads.items():
                removed_params = max(group_params - (per_group - len(v)) * head_params, 1)
                candidates.append((path.saliency(cols(v)) / removed_params, list(v), g))
        if not candidates:
            break
        _, pick, group = min(candidates, key=lambda c: c[0])
        path.remove(cols(pick))
        if group is not None:
            del heads[group]
        else:
            for g in heads:
                heads[g] = [hh for hh in heads[g] if hh not in pick]
        levels.append(Level(path.error, sorted(heads), sorted(hh for v in heads.values() for hh in v)))
    levels.append(Level(float(torch.einsum("oi,ij,oj->", w.double(), h, w.double())), removed=True))
    return levels


def ffn_path(w: torch.Tensor, h: torch.Tensor, step: int) -> tuple[list[Level], list[int]]:
    """OBS over down_proj input channels, ``step`` at a time: levels at every multiple of ``step``."""
    n = h.shape[0]
    path = OBSPath(w, h)
    order: list[int] = []
    levels = [Level(0.0, ffn_kept=n)]
    while len(path.ids) > 0:
        alive = len(path.ids)
        take = alive % step or step        # first step lands on a multiple of step
        take = min(take, alive)
        pos = path.column_saliencies().argsort()[:take]
        gone = path.ids[pos].tolist()
        path.remove(gone)
        order += gone
        kept = len(path.ids)
        levels.append(Level(path.error, ffn_kept=kept) if kept else Level(path.error, removed=True))
    return levels, order


def layer_levels(model, graph, seq: Sequential, i: int, *, damp: float = 0.01,
                 ffn_step: int = 8) -> list[SublayerLevels]:
    """Layer ``i``'s two sublayer level paths (attention, FFN), on the inputs ``seq`` holds (dense:
    the layer is not changed); ``seq`` moves on through the layer.  Only layer ``i``'s weights
    are read (streaming mode calls this with that one layer resident)."""
    o, down = _projections(model, i)
    names = [o.weight.rpartition(".")[0], down.weight.rpartition(".")[0]]
    square, tokens = distributed.reduce_floats(sum(float(h.double().square().sum()) for h in seq.hidden),
                                               sum(h.shape[0] * h.shape[1] for h in seq.hidden))
    residual = square / tokens   # (summed over the ranks under torchrun)
    stats = seq.collect(i, names, advance=True)   # the dense pass: the layer does not change
    for name in names:
        stats[name].check_finite(name)
    kv, qh = graph.group("kv_group", i), graph.group("query_head", i)
    h_o = dampen(stats[names[0]].matrix(), damp)
    attention = SublayerLevels(i, "attention", attention_path(
        _weight(model, o), h_o, graph.n_heads, graph.n_kv, graph.head_dim, qh.params_per_unit,
        kv.params_per_unit), residual=residual)
    del h_o
    h_d = dampen(stats[names[1]].matrix(), damp)
    levels, order = ffn_path(_weight(model, down), h_d, ffn_step)
    return [attention, SublayerLevels(i, "ffn", levels, order, residual)]


def levels_meta(damp: float, ffn_step: int, calib_shape) -> dict:
    return {"damp": damp, "ffn_step": ffn_step, "calibration": list(calib_shape), "scored_on": "dense inputs"}


def build_levels(model, graph, calib: torch.Tensor, *, damp: float = 0.01, layers=None, ffn_step: int = 8,
                 batch_size: int = 8, progress: bool = True) -> LevelDatabase:
    """Pass 1: the OBS level database of every (attention, FFN) sublayer of ``layers`` (dense inputs)."""
    layers = list(range(graph.n_layers)) if layers is None else list(layers)
    seq = Sequential(model, calib, batch_size=batch_size)
    subs: list[SublayerLevels] = []
    wanted = set(layers)
    bar = tqdm(range(graph.n_layers), desc="ziplm levels", unit="layer", disable=not progress)
    for i in bar:
        if i > max(wanted):
            break
        if i in wanted:
            subs += layer_levels(model, graph, seq, i, damp=damp, ffn_step=ffn_step)
        else:
            seq.advance(i)
    return LevelDatabase(fingerprint(graph), subs, levels_meta(damp, ffn_step, calib.shape))


# ---- pass 2: allocation -----------------------------------------------------------------------------

def dp_choice(options: list[list[tuple[int, float]]], need: int, buckets: int = 20000) -> list[int]:
    """One option per sublayer, ``(removed params, error)`` each, minimising the summed error with
    at least ``need`` parameters removed.  Removals are counted in steps of ``need / buckets``,
    rounded down, so the choice really removes ``need`` or more.  Returns the option indices."""
    if need <= 0:
        return [0] * len(options)
    size = need / buckets
    big = np.inf
    dp = np.full(buckets + 1, big)
    dp[0] = 0.0
    picks, full_from = [], []
    for opts in options:
        new = np.full(buckets + 1, big)
        pick = np.full(buckets + 1, -1, dtype=np.int32)
        # where an option lands on the cap (>= need), remember which source bucket it came from
        cap_from = np.full(len(opts), -1, dtype=np.int64)
        for j, (removed, err) in enumerate(opts):
            r = min(buckets, int(math.floor(removed / size)))
            if r < buckets:
                cand = dp[:buckets - r] + err
                better = cand < new[r:buckets]
                new[r:buckets][better] = cand[better]
                pick[r:buckets][better] = j
            tail = dp[buckets - r:]
            b = int(np.argmin(tail))
            if tail[b] + err < new[buckets]:
                new[buckets] = tail[b] + err
                pick[buckets] = j
                cap_from[:] = -1
                cap_from[j] = buckets - r + b
        picks.append(pick)
        full_from.append(cap_from)
        dp = new
    if not np.isfinite(dp[buckets]):
        raise ZipLMError("the target is out of reach: removing every prunable sublayer still keeps too many parameters")
    choice = [0] * len(options)
    b = buckets
    for s in range(len(options) - 1, -1, -1):
        j = int(picks[s][b])
        choice[s] = j
        r = min(buckets, int(math.floor(options[s][j][0] / size)))
        b = int(full_from[s][j]) if b == buckets else b - r
    return choice


ERROR_SCALES = ("auto", "residual", "output", "none")


def scaled_error(sub: SublayerLevels, level: Level, scale: str) -> float:
    """A level's error made comparable across depth: ``residual`` divides by the energy of the
    residual stream the sublayer writes into (a relative perturbation of the hidden state),
    ``output`` by the sublayer's own dense output energy (its removal error: every removal costs
    1), ``none`` keeps the raw squared error (small in early layers, where the residual is small).
    ``auto`` is resolved by :func:`resolve_error_scale` before this is called."""
    if scale == "none":
        return level.error
    if scale == "residual":
        return level.error / sub.residual
    if scale == "output":
        return level.error / max(sub.levels[-1].error, 1e-30)
    raise ZipLMError(f"ziplm: unknown error_scale {scale!r}; choose from {', '.join(ERROR_SCALES)}")


def resolve_error_scale(scale: str, family: str) -> str:
    """``auto``: ``output`` where sublayer outputs are normed before the residual add (Gemma 3: the
    post norm rescales a shrunken output back up, so its raw or residual-relative error says
    little; measured on Gemma-3-270M at params=0.8, 8k held-out tokens: ppl 150 with ``output``,
    765 with ``residual``), ``residual`` elsewhere (SmolLM2 at params=0.8: 32.6 vs 63.6)."""
    if scale != "auto":
        return scale
    from ..families import family_class

    return "output" if family_class(family).output_norms else "residual"


def level_config(sub: SublayerLevels, level: Level):
    """What a level keeps, as a latency table names it: attention (KV groups, query heads per group)
    or None when removed; FFN width or None when removed."""
    if level.removed:
        return None
    if sub.kind == "attention":
        groups = len(level.kv_groups)
        return groups, len(level.query_heads) // groups
    return level.ffn_kept


def pareto(options: list[tuple[float, float, object]]) -> list[tuple[float, float, object]]:
    """The options (time, error, payload) that no other option beats in both time and error."""
    out, best = [], math.inf
    for t, e, p in sorted(options, key=lambda o: (o[0], o[1])):
        if e < best:
            out.append((t, e, p))
            best = e
    return out


def dp_latency(options: list[list[tuple[float, float, object]]], budget: float, buckets: int = 20000) -> list[int]:
    """One option per layer, ``(time, error, payload)`` each, minimising the summed error with the
    summed time at most ``budget``.  Times are counted in steps of ``budget / buckets`` rounded *up*,
    so the choice really fits the budget (the rounding costs at most one step per layer).
    Returns the option index of every layer; raises ZipLMError when even the fastest options
    do not fit."""
    size = budget / buckets
    dp = np.zeros(buckets + 1)            # least error with at most b steps of time used
    picks = []
    for opts in options:
        new = np.full(buckets + 1, np.inf)
        pick = np.full(buckets + 1, -1, dtype=np.int32)
        for j, (t, err, _) in enumerate(opts):
            r = int(math.ceil(t / size - 1e-9)) if t > 0 else 0
            if r > buckets:
                continue
            cand = dp[:buckets + 1 - r] + err
            better = cand < new[r:]
            new[r:][better] = cand[better]
            pick[r:][better] = j
        picks.append(pick)
        dp = new
    if not np.isfinite(dp[buckets]):
        raise ZipLMError("the latency target is out of reach with these layers")
    choice = [0] * len(options)
    b = buckets
    for s in range(len(options) - 1, -1, -1):
        j = int(picks[s][b])
        choice[s] = j
        t = options[s][j][0]
        b -= int(math.ceil(t / size - 1e-9)) if t > 0 else 0
    return choice


def allocate_latency(db: LevelDatabase, graph, target, *, buckets: int = 20000, error_scale: str = "auto"):
    """Levels for a ``speedup=`` / ``latency_ms=`` target: per layer, every pair (attention level,
    FFN level) priced by the target's latency table (a layer losing both is a removed block, free),
    the Pareto front of (time, error) kept, and a dynamic programme over layers on discretised time
    minimising the summed scaled error within the budget (ZipLM / SPDY's search).  Width and depth
    trade in one search: a sublayer's last level is "removed"."""
    table = target.latency
    budget = target.latency_budget(graph)
    error_scale = resolve_error_scale(error_scale, graph.family)
    from ..latency.table import layer_kinds

    kinds = layer_kinds(graph)
    per_group = graph.n_heads // graph.n_kv
    by_layer: dict[int, dict[str, int]] = {}
    for s, sub in enumerate(db.sublayers):
        by_layer.setdefault(sub.layer, {})[sub.kind] = s
    fixed = 0.0                                 # layers the database does not prune stay dense
    for i in range(graph.n_layers):
        if i not in by_layer:
            fixed += table.layer_ms(kinds[i], (graph.n_kv, per_group), graph.intermediate)
    layer_ids = sorted(by_layer)
    options = []
    for i in layer_ids:
        att = db.sublayers[by_layer[i]["attention"]] if "attention" in by_layer[i] else None
        ffn = db.sublayers[by_layer[i]["ffn"]] if "ffn" in by_layer[i] else None
        att_levels = list(enumerate(att.levels)) if att else [(None, None)]
        ffn_levels = list(enumerate(ffn.levels)) if ffn else [(None, None)]
        combos = []
        for ja, la in att_levels:
            a_cfg = level_config(att, la) if att else (graph.n_kv, per_group)
            a_err = scaled_error(att, la, error_scale) if att else 0.0
            for jf, lf in ffn_levels:
                f_cfg = level_config(ffn, lf) if ffn else graph.intermediate
                f_err = scaled_error(ffn, lf, error_scale) if ffn else 0.0
                combos.append((table.layer_ms(kinds[i], a_cfg, f_cfg), a_err + f_err, (ja, jf)))
        options.append(pareto(combos))
    room = budget - table.base_ms - fixed
    fastest = table.base_ms + fixed + sum(min(t for t, _, _ in opts) for opts in options)
    dense = table.dense_ms(graph)
    if room <= 0 or fastest > budget:
        raise ZipLMError(f"target {target} is out of reach: the fastest plan of the chosen layers is predicted at "
                         f"{fastest:.2f} ms (x{dense / fastest:.2f} of the dense {dense:.2f} ms), the budget is "
                         f"{budget:.2f} ms. Fix: a milder target (speedup={math.floor(dense / fastest * 100) / 100:g} "
                         f"or less), or more layers (-O layers=all)")
    picked = dp_latency(options, room, buckets)
    choice = [0] * len(db.sublayers)
    for i, opts, j in zip(layer_ids, options, picked):
        ja, jf = opts[j][2]
        if ja is not None:
            choice[by_layer[i]["attention"]] = ja
        if jf is not None:
            choice[by_layer[i]["ffn"]] = jf
    error = sum(opts[j][1] for opts, j in zip(options, picked))
    planned = table.base_ms + fixed + sum(opts[j][0] for opts, j in zip(options, picked))
    return choice, {"allocation": "dp_latency", "error_scale": error_scale, "budget_ms": budget,
                    "dense_predicted_ms": dense, "planned_ms": planned, "summed_error": error,
                    "pareto_options": [len(o) for o in options]}


def allocate_levels(db: LevelDatabase, graph, target, *, allocation: str = "dp", buckets: int = 20000,
                    error_scale: str = "auto") -> tuple[list[int], dict]:
    """The level index of every sublayer of ``db`` meeting a params target (or, with a latency
    target, :func:`allocate_latency`)."""
    t = parse_target(target)
    if t.is_latency:
        if allocation != "dp":
            raise ZipLMError(f"ziplm: allocation={allocation} takes a params target; a latency target {t} is "
                             f"met by the dynamic programme (allocation=dp)")
        return allocate_latency(db, graph, t, buckets=buckets, error_scale=error_scale)
    if t.kind != "params":
        raise ZipLMError(f"ziplm takes a params target (params=0.8) or a latency target (speedup=1.5, "
                         f"latency_ms=20), not {t}")
    budget = int(math.floor(t.value * graph.total_params))
    need = graph.total_params - budget
    error_scale = resolve_error_scale(error_scale, graph.family)
    options = [[(removed_params(graph, s, lv), scaled_error(s, lv, error_scale)) for lv in s.levels]
               for s in db.sublayers]
    deepest = sum(max(r for r, _ in opts) for opts in options)
    if deepest < need:
        kept = 1 - deepest / graph.total_params
        raise ZipLMError(f"target {t} is out of reach: removing every prunable sublayer of the chosen layers keeps "
                         f"{kept:.1%} of the parameters. Fix: a milder target (params={math.ceil(kept * 1000) / 1000:g} "
                         f"or more), or more layers (-O layers=all)")
    if allocation == "dp":
        choice = dp_choice(options, need, buckets)
    elif allocation == "uniform":
        choice = _uniform_choice(db, options, need)
    else:
        raise ZipLMError(f"ziplm: unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    removed = sum(options[s][j][0] for s, j in enumerate(choice))
    error = sum(options[s][j][1] for s, j in enumerate(choice))
    return choice, {"allocation": allocation, "error_scale": error_scale, "budget_params": budget, "planned_removed_params": removed,
                    "summed_error": error}


def _uniform_choice(db: LevelDatabase, options, need: int) -> list[int]:
    """The same removed fraction of units in every sublayer (attention levels by kept heads, FFN by
    kept channels), the smallest fraction that meets the budget."""
    def fraction(sub, lv):
        if lv.removed:
            return 1.0
        if sub.kind == "attention":
            return 1 - len(lv.query_heads) / len(sub.levels[0].query_heads)
        return 1 - lv.ffn_kept / sub.levels[0].ffn_kept

    def choice_for(r):
        out = []
        for sub in db.sublayers:
            fr = [fraction(sub, lv) for lv in sub.levels]
            # the level whose removed fraction is closest to r (ties: remove less)
            out.append(min(range(len(fr)), key=lambda j: (abs(fr[j] - r), fr[j])))
        return out

    def removed(ch):
        return sum(options[s][j][0] for s, j in enumerate(ch))

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if removed(choice_for(mid)) >= need:
            hi = mid
        else:
            lo = mid
    return choice_for(hi)


def plan_from_choice(db: LevelDatabase, graph, choice: list[int], align: int) -> PrunePlan:
    layers: dict[int, LayerPlan] = {}
    for sub, j in zip(db.sublayers, choice):
        lv = sub.levels[j]
        lp = layers.setdefault(sub.layer, LayerPlan())
        if sub.kind == "attention":
            if lv.removed:
                lp.attention = False
            elif len(lv.query_heads) < graph.n_heads:
                if len(lv.kv_groups) < graph.n_kv:
                    lp.kv_groups = list(lv.kv_groups)
                if len(lv.query_heads) < len(lv.kv_groups) * (graph.n_heads // graph.n_kv):
                    lp.query_heads = list(lv.query_heads)
        else:
            if lv.removed:
                lp.ffn = False
            elif lv.ffn_kept < graph.intermediate:
                lp.ffn_channels = sub.ffn_channels(lv, graph.intermediate)
    removed_blocks = sorted(i for i, lp in layers.items() if not lp.attention and not lp.ffn)
    layers = {i: lp for i, lp in layers.items() if not lp.is_identity and i not in removed_blocks}
    return PrunePlan(layers=layers, removed_blocks=removed_blocks, family=graph.family, align=align)


# ---- pass 3: reconstruction -------------------------------------------------------------------

class Reconstruction:
    """Pass 3 layer by layer (:func:`reconstruct` runs it over every layer): :meth:`layer` re-fits
    layer ``i``'s pruned output projections on the inputs ``seq`` holds, writes them into the
    model in the masked form (removed columns zero) and moves ``seq`` on through the layer;
    :meth:`restore` puts the dense weights back (of one layer, or of all).  Only layer ``i``'s
    weights are read and written (streaming mode runs it with that one layer resident)."""

    def __init__(self, model, graph, plan: PrunePlan, seq: Sequential, *, damp: float = 0.01, sequential: bool = True):
        self.model, self.graph, self.plan, self.seq = model, graph, plan, seq
        self.damp, self.sequential = damp, sequential
        self.updates: dict[str, torch.Tensor] = {}   # new weights in shrunk coordinates
        self.saved: dict[str, torch.Tensor] = {}     # dense weights of the projections changed so far

    def todo(self, i: int) -> list:
        """(kind, projection, kept input columns) of layer ``i``'s sublayers that need a re-fit."""
        if i in self.plan.removed_blocks:
            return []
        graph, lp, hd = self.graph, self.plan.layer(i), self.graph.head_dim
        o, down = _projections(self.model, i)
        heads = self.plan.kept_heads(graph, i)
        ffn_kept = self.plan.kept_ffn(graph, i)
        out = []
        if lp.attention and len(heads) < graph.n_heads:
            out.append(("attention", o, torch.tensor([h * hd + d for h in heads for d in range(hd)])))
        if lp.ffn and len(ffn_kept) < graph.intermediate:
            out.append(("ffn", down, torch.tensor(ffn_kept)))
        return out

    def _write(self, proj, kept_cols, new) -> None:
        model = self.model
        param = model.get_parameter(proj.weight)
        self.saved.setdefault(proj.weight, param.detach().clone())
        transposed = input_dim(model.get_submodule(proj.weight.rpartition(".")[0])) == 0
        full = torch.zeros_like(param) if not transposed else torch.zeros_like(param.T)
        full[:, kept_cols] = new.to(param.dtype)
        param.data.copy_(full.T if transposed else full)
        self.updates[proj.weight] = (full[:, kept_cols].T if transposed else full[:, kept_cols]).clone()

    @contextlib.contextmanager
    def _dense_weights(self, names):
        model = self.model
        current = {n: model.get_parameter(n).detach().clone() for n in names}
        try:
            for n in names:
                model.get_parameter(n).data.copy_(self.saved[n])
            yield
        finally:
            for n in names:
                model.get_parameter(n).data.copy_(current[n])

    def layer(self, i: int) -> dict | None:
        """Re-fit layer ``i`` and move the calibration states on; its report row (None for a removed block)."""
        seq, sequential = self.seq, self.sequential
        if i in self.plan.removed_blocks:
            seq.remove_sublayers(i, attention=False, ffn=False)
            seq.advance(i)
            return None
        lp = self.plan.layer(i)
        todo = self.todo(i)
        row = {"layer": i}
        # sequentially, the FFN is calibrated after the attention is re-fitted (its input moves);
        # without propagation both see the dense layer's inputs
        grams = None if sequential else seq.collect(i, [p.weight.rpartition(".")[0] for _, p, _ in todo])
        seq.remove_sublayers(i, attention=lp.attention, ffn=lp.ffn)
        for kind, proj, kept_cols in todo:
            name = proj.weight.rpartition(".")[0]
            gram = (seq.collect(i, [name]) if sequential else grams)[name]
            gram.check_finite(name)
            h = dampen(gram.matrix(), self.damp)
            w = _weight(self.model, proj)
            new = least_squares(w, h, kept_cols)
            d = w.double().clone()
            d[:, kept_cols] -= new
            row[f"{kind}_error"] = float(torch.einsum("oi,ij,oj->", d, h, d))
            self._write(proj, kept_cols, new)
        names = [p.weight for _, p, _ in todo]
        seq.advance(i, (lambda: self._dense_weights(names)) if not sequential else None)
        return row

    def restore(self, names=None) -> None:
        """The dense weights back into the model (of ``names``, or of every changed projection)."""
        for name in list(self.saved) if names is None else names:
            self.model.get_parameter(name).data.copy_(self.saved.pop(name))


def reconstruct(model, graph, plan: PrunePlan, calib: torch.Tensor, *, damp: float = 0.01, sequential: bool = True,
                batch_size: int = 8, progress: bool = True) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Least-squares re-fit of the kept o_proj / down_proj columns of every pruned sublayer, layer by
    layer.  Returns (updates in shrunk coordinates, per-layer errors); the model is restored."""
    seq = Sequential(model, calib, batch_size=batch_size, propagate=sequential)
    rec = Reconstruction(model, graph, plan, seq, damp=damp, sequential=sequential)
    report = []
    try:
        bar = tqdm(range(graph.n_layers), desc="ziplm reconstruct", unit="layer", disable=not progress)
        for i in bar:
            row = rec.layer(i)
            if row is not None:
                report.append(row)
    finally:
        rec.restore()
    return rec.updates, report


# ---- the method -------------------------------------------------------------------------------

_OPTIONS = ("damp", "allocation", "error_scale", "layers", "align", "ffn_step", "sequential", "batch_size", "buckets", "levels",
            "save_levels", "progress") + _evo.OPTIONS


def _levels_for(model, graph, calib, opts) -> LevelDatabase:
    levels = opts["levels"]
    if isinstance(levels, (str, Path)):
        levels = LevelDatabase.load(levels)
    if levels is not None:
        levels.check_model(graph)
        return levels
    if calib is None:
        raise ZipLMError("ziplm needs calibration token ids [N, L] (or --levels DIR from an earlier run)")
    return build_levels(model, graph, calib, damp=opts["damp"], layers=opts["layers"], ffn_step=opts["ffn_step"],
                        batch_size=opts["batch_size"], progress=opts["progress"])


def _options(graph, options: dict) -> dict:
    unknown = {k: v for k, v in options.items() if k not in _OPTIONS}
    reject_unknown_options("ziplm", unknown, error=ZipLMError,
                           hint=f"its options: {', '.join(_OPTIONS)} (docs/reconstruction.md)")
    align = int(options.get("align", 8))
    opts = {"damp": float(options.get("damp", 0.01)), "allocation": options.get("allocation", "dp"),
            "error_scale": options.get("error_scale", "auto"),
            "layers": parse_layers(options.get("layers"), graph.n_layers), "align": align,
            "ffn_step": int(align if options.get("ffn_step") is None else options["ffn_step"]), "sequential": bool(options.get("sequential", True)),
            "batch_size": int(options.get("batch_size", 8)), "buckets": int(options.get("buckets", 20000)),
            "levels": options.get("levels"), "save_levels": options.get("save_levels"),
            "progress": bool(options.get("progress", True))}
    if not opts["damp"] > 0 or not math.isfinite(opts["damp"]):
        raise ZipLMError(f"ziplm: damp must be a positive number (got {options.get('damp')!r})")
    for key in ("align", "ffn_step", "batch_size", "buckets"):
        if opts[key] < 1:
            raise ZipLMError(f"ziplm: {key} must be >= 1 (got {opts[key]})")
    if opts["error_scale"] not in ERROR_SCALES:
        raise ZipLMError(f"ziplm: unknown error_scale {opts['error_scale']!r}; choose from {', '.join(ERROR_SCALES)}")
    if opts["allocation"] not in ALLOCATIONS:
        raise ZipLMError(f"ziplm: unknown allocation {opts['allocation']!r}; choose from {', '.join(ALLOCATIONS)}")
    opts["evo"] = _evo.parse_options(options, ZipLMError)
    if opts["evo"]["search"] == "evo" and opts["allocation"] != "dp":
        raise ZipLMError(f"ziplm: search=evo refines the dynamic programme's choice; it takes allocation=dp, "
                         f"not {opts['allocation']}")
    return opts


def prepare(model, graph, calib, options: dict) -> dict:
    """Build (or load) the level database once, for a run with several targets: returns the
    options with ``levels`` set, so each target only allocates and reconstructs."""
    opts = _options(graph, dict(options))
    db = _levels_for(model, graph, calib, opts)
    if opts["save_levels"]:
        db.save(opts["save_levels"])
    out = dict(options)
    out["levels"] = db
    out.pop("save_levels", None)
    return out


def check_target(t) -> None:
    if t.kind != "params" and not t.is_latency:
        raise ZipLMError(f"ziplm takes a params target (params=0.8) or a latency target (speedup=1.5, "
                         f"latency_ms=20), not {t}")


def levels_info(db: LevelDatabase, choice: list[int]) -> list[dict]:
    return [{"layer": s.layer, "kind": s.kind, "level": j, "of": len(s.levels) - 1,
             "error": float(f"{s.levels[j].error:.6g}")} for s, j in zip(db.sublayers, choice)]


def finish_info(info: dict, db: LevelDatabase, choice: list[int], opts: dict, calib_shape, per_layer) -> dict:
    info.update(method="ziplm", damp=opts["damp"], sequential=opts["sequential"], ffn_step=opts["ffn_step"],
                layers=opts["layers"], calibration=None if calib_shape is None else list(calib_shape),
                levels=levels_info(db, choice), reconstruction=per_layer, level_database=db.meta)
    return info


@register("ziplm")
@torch.no_grad()
def ziplm(model, graph, target, calib, **options):
    opts = _options(graph, options)
    t = parse_target(target)
    check_target(t)
    LayerRunner(model)   # refuses a family the layer runner cannot run, before any scoring
    db = _levels_for(model, graph, calib, opts)
    if opts["save_levels"]:
        db.save(opts["save_levels"])
    choice, info = allocate_levels(db, graph, t, allocation=opts["allocation"], buckets=opts["buckets"],
                                   error_scale=opts["error_scale"])
    if calib is None:
        raise ZipLMError("ziplm reconstructs the kept weights on calibration data: calibration token ids are needed")
    evo = dict(opts["evo"])
    if evo.pop("search") == "evo":
        dp = {k: info[k] for k in ("summed_error", "planned_removed_params", "planned_ms") if k in info}
        choice, search = _evo.refine(model, graph, db, t, choice, calib, damp=opts["damp"],
                                     batch_size=opts["batch_size"], progress=opts["progress"], **evo)
        info.update(_evo.budget_for(db, graph, t).describe(choice),
                    summed_error=sum(scaled_error(s, s.levels[j], info["error_scale"]) for s, j in zip(db.sublayers, choice)))
        info["search"] = {**search, "dp": dp}
    else:
        info["search"] = {"method": "dp"}
    plan = plan_from_choice(db, graph, choice, opts["align"])
    updates, per_layer = reconstruct(model, graph, plan, calib, damp=opts["damp"], sequential=opts["sequential"],
                                     batch_size=opts["batch_size"], progress=opts["progress"])
    plan.updates = updates
    return plan, finish_info(info, db, choice, opts, None if calib is None else calib.shape, per_layer)


ziplm.prepare = prepare
