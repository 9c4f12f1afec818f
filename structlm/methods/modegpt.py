"""MoDeGPT (Lin et al., ICLR 2025, "MoDeGPT: Modular Decomposition for Large Language Model
Compression"): each layer's three modules are compressed by a matrix decomposition fitted on
calibration correlations, layer by layer on :class:`structlm.calibration.Sequential` (a layer is
calibrated on what the already compressed layers feed it).  No fine-tuning, no extra parameters:
the result is the same stock attention/FFN with narrower heads and FFN (head-dimension units
``qk_channel`` / ``v_channel`` and ``ffn_channel`` of the graph, docs/graph.md), plus new weights
(``plan.updates``).  Correlations are float64.

* **Type I, FFN (Nystrom).**  ``C = mean_t a_t a_t^T`` of down_proj's input ``a = act(x W_gate) *
  (x W_up)``; ridge leverage scores ``s_j = [C (C + lam I)^-1]_jj`` with ``lam = ridge * mean(diag
  C)``; the top channels are kept (gate/up rows unchanged) and down_proj is re-fitted as
  ``W_down C[:, J] C[J, J]^-1`` (:func:`structlm.obs.least_squares`, with ``damp * mean(diag C)`` of
  jitter on the diagonal).  With every channel kept this is ``W_down`` exactly.
* **Type II, key-query (CR).**  Per KV group ``g``, rotary pair ``d`` (dims ``d, d + head_dim/2``)
  scores ``sum_{h in g} sum_{j in pair} ||C_q^{1/2}[:, j]|| ||C_k^{1/2}[:, j]||`` where ``C_q`` is the
  correlation of head ``h``'s queries and ``C_k`` of the group's keys (before RoPE: the column norm
  of ``C^{1/2}`` is ``sqrt(C_jj)``, and a pair's summed energy is the same after the rotation);
  the top pairs are kept with their original frequencies, with no weight update.  Refused (and
  skipped by default) on families whose q/k norms act over the head dim (Qwen3, Gemma 3).
* **Type III, value-output (SVD).**  With ``C`` the correlation of the attention input (augmented
  by a constant 1 when v_proj has a bias) and, per KV group, ``W_V`` (D x head_dim, the group's
  value head) and ``W_O = [W_O,h for h in g]`` (head_dim x heads*D, the o_proj columns of every
  query head of the group, side by side): the rank-k optimum of ``C^{1/2} W_V W_O`` by two SVDs,
  ``C^{1/2} W_V = U1 S1 V1^T`` and ``S1 V1^T W_O = U2 S2 V2^T``; ``T = V1 S1^-1 U2[:, :k]``, new
  ``W_V' = W_V T`` and ``W_O' = U2[:, :k]^T S1 V1^T W_O``, so ``C^{1/2} W_V' W_O'`` is exactly the
  truncated SVD (Eckart-Young) and no ``C^{-1/2}`` is needed.  GQA: one V basis per group
  (v_proj is shared by the group's query heads), fitted to all its heads jointly: the objective is
  the sum over the group's heads of the per-head MoDeGPT objective (for one head per group it is
  the paper's per-head step).
* **Allocation.**  Block importance ``s_i = 1 - mean_t cos(x_in, x_out)`` (ShortGPT's BI, on the
  dense model); per-layer compression ``phi_i = L * phi_avg * softmax(-s / eps)_i``, capped at
  ``cap`` with the excess redistributed over the uncapped layers (so ``mean phi_i = phi_avg``),
  the same ``phi_i`` for the layer's three modules (kept: ``(1 - phi_i)`` of the FFN channels,
  rounded to ``align``, of the rotary pairs and of the v dims).  ``phi_avg`` is found by bisection
  so the plan's parameter count meets ``params=``.  ``allocation="uniform"``: ``phi_i = phi_avg``.

Options: ``ridge`` (1e-2), ``damp`` (1e-4), ``eps`` (0.1), ``cap`` (0.8), ``allocation`` ("bi" |
"uniform"), ``modules`` ("auto": ffn, qk, vo where exact; or a subset, e.g. "ffn,vo"), ``align``
(8), ``batch_size`` (8), ``progress``.  Families: those the layer runner runs (llama, mistral,
qwen2, qwen3, gemma3, phi3).  docs/width-methods.md has the measurements.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from .. import distributed
from . import register, reject_unknown_options
from ._layers import LayerRunner
from ._width import WidthError
from ..calibration import Gram, Sequential
from ..families import get_adapter
from ..obs import dampen, least_squares
from ..plan import LayerPlan, PrunePlan
from ..targets import parse_target

ALLOCATIONS = ("bi", "uniform")
MODULES = ("ffn", "qk", "vo")


class MoDeGPTError(WidthError):
    """Options or a target that MoDeGPT cannot use."""


class AugmentedGram(Gram):
    """The Gram matrix of ``[x, 1]``: the correlation of an input and its mean, so that a
    projection with a bias is ``[W, b]`` applied to it."""

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        super().add(torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1))


# ---- the three decompositions (plain float64 linear algebra, tested by hand) -----------------------

def ridge_leverage(c: torch.Tensor, ridge: float) -> torch.Tensor:
    """``diag(C (C + lam I)^-1)`` with ``lam = ridge * mean(diag C)`` (= ``1 - lam diag((C + lam I)^-1)``)."""
    c = c.double()
    lam = ridge * float(c.diagonal().mean().clamp_min(1e-30))
    inv = torch.cholesky_inverse(torch.linalg.cholesky(c + lam * torch.eye(len(c), dtype=c.dtype)))
    return 1.0 - lam * inv.diagonal()


def nystrom(w_down: torch.Tensor, c: torch.Tensor, keep: int, ridge: float, damp: float):
    """Type I: (kept channel indices, re-fitted down_proj ``[out, keep]``, leverage scores)."""
    scores = ridge_leverage(c, ridge)
    kept = torch.sort(torch.topk(scores, keep).indices).values
    return kept, least_squares(w_down, dampen(c, damp), kept), scores


def qk_pair_scores(dq: torch.Tensor, dk: torch.Tensor, per_group: int, head_dim: int, pairs: bool) -> torch.Tensor:
    """Type II scores [kv groups, units]: ``dq`` = diag of the query correlation per q row
    (``[heads * head_dim]``), ``dk`` per k row; a unit is a rotary pair (``pairs``) or one dim."""
    q = dq.double().clamp_min(0).view(-1, per_group, head_dim)      # [groups, heads, hd]
    k = dk.double().clamp_min(0).view(-1, 1, head_dim)
    s = (q * k).sqrt().sum(1)                                       # [groups, hd]
    return s[:, : head_dim // 2] + s[:, head_dim // 2:] if pairs else s


def value_output(c_sqrt: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, keep: int):
    """Type III for one KV group.  ``w_v`` is ``W_V`` (inputs x head_dim: the v rows transposed,
    with the bias as a last input row when ``c_sqrt`` is augmented), ``w_o`` is ``W_O`` (head_dim x
    outputs: the o_proj columns of the group's heads, transposed and side by side).  Returns
    ``(W_V' [inputs x keep], W_O' [keep x outputs], squared error, total)`` with ``C^{1/2} W_V' W_O'``
    the best rank-``keep`` approximation of ``C^{1/2} W_V W_O``."""
    a = c_sqrt.double() @ w_v.double()
    u1, s1, v1t = torch.linalg.svd(a, full_matrices=False)
    tol = s1.max().clamp_min(1e-300) * 1e-10    # directions C does not see: no inverse
    inv_s1 = torch.where(s1 > tol, 1.0 / s1.clamp_min(tol), torch.zeros_like(s1))
    b = (s1[:, None] * v1t) @ w_o.double()
    u2, s2, _ = torch.linalg.svd(b, full_matrices=False)
    u2k = u2[:, :keep]
    t = v1t.T @ (inv_s1[:, None] * u2k)
    new_v = w_v.double() @ t
    new_o = u2k.T @ b
    return new_v, new_o, float(s2[keep:].square().sum()), float(s2.square().sum())


def psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a positive semi-definite matrix; eigenvalues below 1e-13 of the
    largest (rounding noise of a rank-deficient correlation) count as zero."""
    vals, vecs = torch.linalg.eigh(c.double())
    vals = torch.where(vals > vals.max().clamp_min(0) * 1e-13, vals, torch.zeros_like(vals))
    return (vecs * vals.sqrt()) @ vecs.T


# ---- allocation ----------------------------------------------------------------------------------

def allocate(importance, phi_avg: float, eps: float, cap: float, allocation: str = "bi") -> list[float]:
    """Per-layer compression ``phi_i``: ``L * phi_avg * softmax(-s / eps)``, capped at ``cap`` with the
    excess spread over the uncapped layers in proportion to their weights; sums to ``L * phi_avg``."""
    n = len(importance)
    total = n * phi_avg
    if total > n * cap + 1e-12:
        raise MoDeGPTError(f"modegpt: a mean compression of {phi_avg:.3f} exceeds the cap {cap:g}")
    if allocation == "uniform":
        return [phi_avg] * n
    s = torch.tensor(importance, dtype=torch.float64)
    w = torch.softmax(-s / eps, dim=0)
    phi = torch.zeros(n, dtype=torch.float64)
    free = torch.ones(n, dtype=torch.bool)
    remaining = total
    while free.any():
        phi[free] = remaining * w[free] / w[free].sum()
        over = free & (phi > cap)
        if not over.any():
            break
        phi[over] = cap
        remaining -= cap * int(over.sum())
        free &= ~over
    return phi.tolist()


def kept_counts(phi: float, intermediate: int, qk_units: int, head_dim: int, align: int, modules) -> dict:
    """Kept FFN channels (a multiple of ``align``), rotary pairs and v dims at compression ``phi``."""
    ffn = intermediate
    if "ffn" in modules:
        ffn = min(intermediate, max(align, int(round((1 - phi) * intermediate / align)) * align))
    qk = max(1, int(round((1 - phi) * qk_units))) if "qk" in modules else qk_units
    v = max(1, int(round((1 - phi) * head_dim))) if "vo" in modules else head_dim
    return {"ffn": ffn, "qk": qk, "v": v}


def count_plan(graph, counts: list[dict]) -> PrunePlan:
    """A plan with these per-layer counts (the first units kept: for parameter counting only)."""
    layers = {}
    for i, c in enumerate(counts):
        lp = LayerPlan()
        if c["ffn"] < graph.intermediate:
            lp.ffn_channels = list(range(c["ffn"]))
        if graph.groups_of("qk_channel", i) and c["qk"] < graph.channel_group("qk_channel", i, 0).count:
            lp.qk_channels = {g: list(range(c["qk"])) for g in range(graph.n_kv)}
        if c["v"] < graph.head_dim:
            lp.v_channels = {g: list(range(c["v"])) for g in range(graph.n_kv)}
        layers[i] = lp
    return PrunePlan(layers=layers, family=graph.family)


def solve_phi(graph, importance, budget: float, opts: dict, modules, target=None) -> tuple[float, list[float], list[dict]]:
    """The smallest mean compression whose plan keeps at most ``budget`` parameters, or, for a
    latency ``target`` (speedup= / latency_ms=), whose predicted time is within ``budget`` ms."""
    qk_units = graph.channel_group("qk_channel", 0, 0).count if graph.groups_of("qk_channel", 0) else 0
    latency = target is not None and target.is_latency

    def cost(plan):
        return target.latency.predict(graph, plan)["total_ms"] if latency else plan.cost(graph)["params"]

    def plan_at(phi_avg):
        phis = allocate(importance, phi_avg, opts["eps"], opts["cap"], opts["allocation"])
        counts = [kept_counts(p, graph.intermediate, qk_units, graph.head_dim, opts["align"], modules) for p in phis]
        return phis, counts, cost(count_plan(graph, counts))

    phis, counts, fastest = plan_at(opts["cap"])
    if fastest > budget:
        higher = min(0.95, round(opts["cap"] + 0.1, 2))
        cap_fix = f", a higher cap (-O cap={higher:g})" if higher > opts["cap"] else ""
        if latency:
            dense = target.latency.dense_ms(graph)
            raise MoDeGPTError(
                f"modegpt: the target {target} is out of reach: compressing every layer's FFN by the cap {opts['cap']:g} "
                f"is predicted at {fastest:.2f} ms (x{dense / fastest:.2f} of the dense {dense:.2f} ms; head-dim "
                f"pruning is priced at full attention time). Fix: a milder target (speedup="
                f"{math.floor(dense / fastest * 100) / 100:g} or less){cap_fix}, or ziplm, which "
                f"also removes heads and sublayers")
        kept = fastest / graph.total_params
        raise MoDeGPTError(
            f"modegpt: the target is out of reach: compressing every layer's {', '.join(sorted(modules))} by the cap "
            f"{opts['cap']:g} keeps {kept:.1%} of the parameters. Fix: a milder target (params="
            f"{math.ceil(kept * 1000) / 1000:g} or more){cap_fix}, or ziplm, which also removes sublayers and blocks")
    lo, hi = 0.0, opts["cap"]
    for _ in range(50):
        mid = (lo + hi) / 2
        if plan_at(mid)[2] <= budget:
            hi = mid
        else:
            lo = mid
    phis, counts, _ = plan_at(hi)
    return hi, phis, counts


# ---- the passes ---------------------------------------------------------------------------------

@torch.no_grad()
def layer_importance(seq: Sequential, i: int) -> float:
    """BI of layer ``i`` on the (dense) states ``seq`` holds, which move on through the layer."""
    before = seq.hidden
    seq.advance(i)
    cos = sum(float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).sum())
              for a, b in zip(before, seq.hidden))
    cos, tokens = distributed.reduce_floats(cos, sum(h.shape[0] * h.shape[1] for h in before))   # over ranks
    return 1.0 - cos / tokens


@torch.no_grad()
def block_importance(model, calib: torch.Tensor, batch_size: int = 8, progress: bool = True) -> list[float]:
    """BI per layer on the dense model: ``1 - mean over tokens of cos(x_in, x_out)``."""
    seq = Sequential(model, calib, batch_size=batch_size)
    return [layer_importance(seq, i)
            for i in tqdm(range(seq.n_layers), desc="modegpt importance", unit="layer", disable=not progress)]


def check_importance(importance) -> None:
    broken = [i for i, s in enumerate(importance) if not math.isfinite(s)]
    if broken:
        raise MoDeGPTError(f"modegpt: the block importance of layer {broken[0]} is not finite (NaN/Inf): the "
                           f"model's weights or the calibration data are broken; check the model with structlm eval")


def _module(proj) -> str:
    return proj.weight.rpartition(".")[0]


def _rows(model, proj) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's weight rows (its part of a fused tensor) and bias, float64."""
    w = model.get_parameter(proj.weight).detach()[proj.offset: proj.offset + proj.size].double()
    b = model.get_parameter(proj.bias).detach()[proj.offset: proj.offset + proj.size].double() if proj.bias else None
    return w, b


def _augment(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``[W, b]`` (a zero bias column when there is none): W applied to ``[x, 1]``."""
    return torch.cat([w, (b if b is not None else w.new_zeros(w.shape[0]))[:, None]], dim=1)


class Compressor:
    """The compression layer by layer (:func:`compress` runs it over every layer): :meth:`layer`
    decomposes layer ``i`` at its counts on the inputs ``seq`` holds (Types II and III on the
    attention, then Type I on the FFN fed by the compressed attention), leaves it in the masked
    form (removed rows/columns zero) and moves ``seq`` on through it; :meth:`updates` reads the
    new values in the plan's shrunk coordinates and :meth:`restore` puts the dense weights back.
    Only layer ``i``'s weights are read and written (streaming mode runs it with that one layer
    resident)."""

    def __init__(self, model, graph, seq: Sequential, counts: list[dict], modules, opts: dict):
        self.model, self.graph, self.seq, self.counts, self.modules, self.opts = model, graph, seq, counts, modules, opts
        self.ad = get_adapter(model.config).bind({n: tuple(p.shape) for n, p in model.named_parameters()})
        self.saved: dict[str, torch.Tensor] = {}

    def _param(self, name):
        p = self.model.get_parameter(name)
        self.saved.setdefault(name, p.detach().clone())
        return p

    def _set_rows(self, name, start, rows):   # rows [n, ...] written at rows start.. of parameter ``name``
        p = self._param(name)
        p.data[start: start + rows.shape[0]] = rows.to(p.dtype)

    def layer(self, i: int) -> tuple[LayerPlan, dict]:
        model, graph, ad, seq, modules, opts = self.model, self.graph, self.ad, self.seq, self.modules, self.opts
        param, set_rows = self._param, self._set_rows
        hd, per_group, n_kv = graph.head_dim, graph.n_heads // graph.n_kv, graph.n_kv
        c = self.counts[i]
        lp = LayerPlan()
        row = {"layer": i, "ffn_kept": c["ffn"], "qk_kept": c["qk"], "v_kept": c["v"]}
        q, k, v, o = ad.q(i), ad.k(i), ad.v(i), ad.o(i)
        qk_units = graph.channel_group("qk_channel", i, 0).count if graph.groups_of("qk_channel", i) else 0
        do_qk = "qk" in modules and c["qk"] < qk_units
        do_vo = "vo" in modules and c["v"] < hd
        if do_qk or do_vo:
            gram = seq.collect(i, [_module(q)], stat=AugmentedGram)[_module(q)]
            gram.check_finite(_module(q))
            cx = gram.matrix()                                           # [(D+1), (D+1)]
        if do_qk:   # Type II: keep the top rotary pairs of every KV group, no weight change
            wq, wk = _augment(*_rows(model, q)), _augment(*_rows(model, k))
            dq = torch.einsum("rd,de,re->r", wq, cx, wq)
            dk = torch.einsum("rd,de,re->r", wk, cx, wk)
            pairs = graph.config.get("qk_channel") == "rope_pair"
            scores = qk_pair_scores(dq, dk, per_group, hd, pairs)
            keep = {g: sorted(torch.topk(scores[g], c["qk"]).indices.tolist()) for g in range(n_kv)}
            lp.qk_channels = keep
            for g in range(n_kv):   # zero the removed pairs' q and k rows (the masked form)
                gone = [u for u in range(qk_units) if u not in set(keep[g])]
                dims = [u + half for u in gone for half in ((0, hd // 2) if pairs else (0,))]
                for proj, heads in ((q, range(g * per_group, (g + 1) * per_group)), (k, [g])):
                    rows = [proj.offset + h * hd + d for h in heads for d in dims]
                    for name in (proj.weight, proj.bias):
                        if name:
                            param(name).data[rows] = 0
            row["qk_score_kept"] = float(sum(scores[g][keep[g]].sum() for g in range(n_kv)) / scores.sum())
        if do_vo:   # Type III: one V basis per KV group, fitted to all its query heads
            c_sqrt = psd_sqrt(cx)
            wv, bv = _rows(model, v)
            wo = model.get_parameter(o.weight).detach().double()        # [D, heads * hd]
            err = total = 0.0
            for g in range(n_kv):
                w_v = _augment(wv[g * hd:(g + 1) * hd], None if bv is None else bv[g * hd:(g + 1) * hd]).T
                heads = range(g * per_group, (g + 1) * per_group)
                w_o = torch.cat([wo[:, h * hd:(h + 1) * hd].T for h in heads], dim=1)   # [hd, heads * D]
                new_v, new_o, e, t = value_output(c_sqrt, w_v, w_o, c["v"])
                err, total = err + e, total + t
                full_v = torch.zeros(hd, w_v.shape[0], dtype=torch.float64)
                full_v[: c["v"]] = new_v.T
                set_rows(v.weight, v.offset + g * hd, full_v[:, :-1])
                if v.bias:
                    set_rows(v.bias, v.offset + g * hd, full_v[:, -1])
                p = param(o.weight)
                D = wo.shape[0]
                for j, h in enumerate(heads):
                    block = torch.zeros(D, hd, dtype=torch.float64)
                    block[:, : c["v"]] = new_o[:, j * D:(j + 1) * D].T
                    p.data[:, h * hd:(h + 1) * hd] = block.to(p.dtype)
            lp.v_channels = {g: list(range(c["v"])) for g in range(n_kv)}
            row["vo_relative_error"] = err / max(total, 1e-300)
        if "ffn" in modules and c["ffn"] < graph.intermediate:   # Type I, on the compressed attention's output
            down = ad.ffn_out(i)
            gram = seq.collect(i, [_module(down)])[_module(down)]
            gram.check_finite(_module(down))
            cf = gram.matrix()
            w_down = model.get_parameter(down.weight).detach().double()
            kept, new, scores = nystrom(w_down, cf, c["ffn"], opts["ridge"], opts["damp"])
            d = w_down.clone()
            d[:, kept] -= new
            row["ffn_relative_error"] = float(torch.einsum("oi,ij,oj->", d, cf, d)
                                              / torch.einsum("oi,ij,oj->", w_down, cf, w_down).clamp_min(1e-300))
            full = torch.zeros_like(w_down)
            full[:, kept] = new
            p = param(down.weight)
            p.data.copy_(full.to(p.dtype))
            gone = sorted(set(range(graph.intermediate)) - set(kept.tolist()))
            for proj in ad.ffn_in(i):
                for name in (proj.weight, proj.bias):
                    if name:
                        param(name).data[[proj.offset + j for j in gone]] = 0
            lp.ffn_channels = kept.tolist()
        seq.advance(i)
        return lp, row

    def updated(self) -> list[str]:
        """The changed parameters that get new values (v, o, down; not the zeroed q/k and gate/up rows)."""
        return [n for n in self.saved if _is_updated(n, self.ad, self.graph)]

    def updates(self, plan: PrunePlan, names=None) -> dict[str, torch.Tensor]:
        return _shrunk_updates(self.model, plan, self.graph, self.updated() if names is None else names)

    def restore(self, names=None) -> None:
        for name in list(self.saved) if names is None else names:
            self.model.get_parameter(name).data.copy_(self.saved.pop(name))


def layers_plan(layers: dict, graph, align: int) -> PrunePlan:
    return PrunePlan(layers={i: lp for i, lp in layers.items() if not lp.is_identity}, family=graph.family, align=align)


def compress(model, graph, calib, counts: list[dict], modules, opts: dict) -> tuple[PrunePlan, list[dict]]:
    """Layer by layer: Types II and III on the attention, then Type I on the FFN fed by the compressed
    attention, then move the calibration states on.  The model is changed in the masked form (removed
    rows/columns zero) while it runs and restored at the end; returns the plan with its updates."""
    seq = Sequential(model, calib, batch_size=opts["batch_size"])
    comp = Compressor(model, graph, seq, counts, modules, opts)
    layers: dict[int, LayerPlan] = {}
    report = []
    try:
        bar = tqdm(range(graph.n_layers), desc="modegpt compress", unit="layer", disable=not opts["progress"])
        for i in bar:
            layers[i], row = comp.layer(i)
            report.append(row)
        plan = layers_plan(layers, graph, opts["align"])
        plan.updates = comp.updates(plan)
    finally:
        comp.restore()
    return plan, report


def _is_updated(name: str, ad, graph) -> bool:
    """v_proj (or the fused qkv tensor), o_proj and down_proj get new values; zeroed q/k rows and
    gate/up rows are simply removed by the plan."""
    for i in range(graph.n_layers):
        v, o, down = ad.v(i), ad.o(i), ad.ffn_out(i)
        if name in (v.weight, v.bias, o.weight, down.weight):
            return True
    return False


def _shrunk_updates(model, plan: PrunePlan, graph, names) -> dict[str, torch.Tensor]:
    """The model's current values of ``names`` in the plan's shrunk coordinates."""
    from ..surgery import removed_units

    spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for unit in removed_units(plan, graph):
        for name, dim, a, b in unit.slices:
            spans.setdefault((name, dim), []).append((a, b))
    out = {}
    for name in names:
        t = model.get_parameter(name).detach()
        for dim in range(t.ndim):
            gone = torch.zeros(t.shape[dim], dtype=torch.bool)
            for a, b in spans.get((name, dim), ()):
                gone[a:b] = True
            t = t.index_select(dim, (~gone).nonzero().flatten())
        out[name] = t.clone()
    return out


# ---- the method -----------------------------------------------------------------------------------

_DEFAULTS = {"ridge": 1e-2, "damp": 1e-4, "eps": 0.1, "cap": 0.8, "allocation": "bi", "modules": "auto",
             "align": 8, "batch_size": 8, "progress": True}


def _options(graph, options: dict) -> tuple[dict, list[str], dict]:
    unknown = {k: v for k, v in options.items() if k not in _DEFAULTS}
    reject_unknown_options("modegpt", unknown, error=MoDeGPTError,
                           hint=f"its options: {', '.join(_DEFAULTS)} (docs/width-methods.md)")
    opts = {**_DEFAULTS, **options}
    for key in ("ridge", "damp", "eps", "cap"):
        try:
            opts[key] = float(opts[key])
        except (TypeError, ValueError):
            raise MoDeGPTError(f"modegpt: {key} must be a number (got {opts[key]!r})") from None
        if not (math.isfinite(opts[key]) and opts[key] > 0):
            raise MoDeGPTError(f"modegpt: {key} must be a positive number (got {opts[key]!r})")
    if opts["cap"] >= 1:
        raise MoDeGPTError(f"modegpt: cap is the largest compression of one layer, below 1 (got {opts['cap']:g})")
    for key in ("align", "batch_size"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1:
            raise MoDeGPTError(f"modegpt: {key} must be a whole number >= 1 (got {opts[key]!r})")
    if opts["allocation"] not in ALLOCATIONS:
        raise MoDeGPTError(f"modegpt: unknown allocation {opts['allocation']!r}; choose from {', '.join(ALLOCATIONS)}")
    notes = {}
    refusal = graph.config.get("qk_channel_refusal")
    if opts["modules"] == "auto":
        modules = [m for m in MODULES if not (m == "qk" and refusal)]
        if refusal:
            notes["qk"] = f"skipped: {refusal}"
    else:
        spec = opts["modules"]
        # "ffn,vo" or "ffn+vo" (the + form fits inside a benchmark's method[key=value,...] spec)
        modules = [m.strip() for m in (spec.replace("+", ",").split(",") if isinstance(spec, str) else spec)
                   if str(m).strip()]
        bad = [m for m in modules if m not in MODULES]
        if bad or not modules:
            raise MoDeGPTError(f"modegpt: modules {spec!r}: choose a subset of {', '.join(MODULES)} (e.g. ffn,vo) or auto")
        if "qk" in modules and refusal:
            raise MoDeGPTError(f"modegpt: modules includes qk, but {refusal}")
    opts["progress"] = bool(opts["progress"])
    return opts, sorted(set(modules), key=MODULES.index), notes


def check_target(t, modules) -> None:
    if t.kind != "params" and not t.is_latency:
        raise MoDeGPTError(f"modegpt takes a params target (params=0.8) or a latency target (speedup=1.5, "
                           f"latency_ms=20), not {t}")
    if t.is_latency and "ffn" not in modules:
        # the exported attention scatters q/k/v back to the full head width, so narrower head dims
        # shrink only the projections: the latency table prices attention by heads, not head dims
        raise MoDeGPTError(f"modegpt: a latency target ({t}) is met by narrowing the FFN, but modules="
                           f"{','.join(modules)} leaves it whole. Fix: include ffn (-O modules=auto), or use params=")


def budget_for(graph, t) -> float:
    # a latency target prices attention at its full time (head dims do not change the table's
    # attention configuration), so the predicted time is an upper bound for the plan's
    return t.latency_budget(graph) if t.is_latency else int(math.floor(t.value * graph.total_params))


def method_info(t, opts, modules, notes, budget, phi_avg, phis, importance, report, calib_shape, started) -> dict:
    return {"method": "modegpt", "modules": modules, "notes": notes, "allocation": opts["allocation"],
            "ridge": opts["ridge"], "damp": opts["damp"], "eps": opts["eps"], "cap": opts["cap"],
            "phi_avg": phi_avg, ("budget_ms" if t.is_latency else "budget_params"): budget,
            "calibration": list(calib_shape),
            "layers": [{**row, "block_importance": importance[row["layer"]] if opts["allocation"] == "bi" else None,
                        "phi": phis[row["layer"]]} for row in report],
            "seconds": round(time.perf_counter() - started, 2)}


@register("modegpt")
@torch.no_grad()
def modegpt(model, graph, target, calib, **options):
    started = time.perf_counter()
    opts, modules, notes = _options(graph, options)
    t = parse_target(target)
    check_target(t, modules)
    LayerRunner(model)   # refuses a family the layer runner cannot run, before any scoring
    if calib is None:
        raise MoDeGPTError("modegpt fits its decompositions on calibration data: calibration token ids are needed")
    budget = budget_for(graph, t)
    if opts["allocation"] == "bi":
        importance = block_importance(model, calib, opts["batch_size"], opts["progress"])
        check_importance(importance)
    else:
        importance = [0.0] * graph.n_layers
    phi_avg, phis, counts = solve_phi(graph, importance, budget, opts, modules, t)
    plan, report = compress(model, graph, calib, counts, modules, opts)
    return plan, method_info(t, opts, modules, notes, budget, phi_avg, phis, importance, report, calib.shape, started)
