"""Shared machinery of the width-pruning methods (magnitude, wanda_sp, flap, llm_pruner).

* **unit scores from element scores**: a method gives an element-wise score tensor per parameter
  (``|w|^p``, ``|w * g|``, ``|W| * ||X||`` ...); :func:`unit_scores` reduces it over every member
  slice of a graph group (a bias is folded into its projection's member) and aggregates the members
  (``sum`` / ``mean`` / ``max`` / ``prod`` / ``last``, LLM-Pruner's group aggregations);
* **activation statistics** (:class:`InputStats`): per input channel of chosen projections, the
  mean, variance and squared norm over all calibration tokens, collected by forward pre-hooks;
* **allocation** (:func:`allocate`): from per-unit scores to a :class:`PrunePlan` meeting a
  ``params`` target: ``uniform`` (the same removal ratio in every prunable layer), ``per_root``
  (one ratio counted per projection as LLM-Pruner's code does, :func:`per_root_removed_steps`), ``schedule``
  (per-layer relative ratios, scaled to the target) or ``global`` (one ranking over every layer
  with per-layer floors); GQA as whole KV groups or query heads removed evenly from every group;
  optional hidden channels (Torch-Pruning / Sheared-LLaMA style);
* :func:`model_state_guard`: the model comes back as it was (requires_grad, grads, train flag,
  hooks), also on exceptions.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ..graph import Graph
from ..plan import LayerPlan, PrunePlan, align_count, align_plan
from ..targets import Target, parse_target

AGGREGATIONS = ("sum", "mean", "max", "prod", "last")
ALLOCATIONS = ("uniform", "per_root", "schedule", "global")
ATTN_ROUNDINGS = ("floor", "round")   # attention steps of allocation="uniform"
GQA_MODES = ("kv_groups", "query_heads")


class WidthError(ValueError):
    """Options or a target that a width method cannot satisfy."""


# ---- options --------------------------------------------------------------------------------

def parse_layers(spec, n_layers: int) -> list[int]:
    """``None``/"all" -> every layer; "4:-2" (python slice), "3,5,7", [3, 5] or range -> those layers."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    if isinstance(spec, str):
        spec = spec.strip()
        if ":" in spec:
            a, _, b = spec.partition(":")
            return list(range(n_layers))[slice(int(a) if a.strip() else None, int(b) if b.strip() else None)]
        spec = [int(x) for x in spec.split(",") if x.strip()]
    layers = sorted({int(i) for i in spec})
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise WidthError(f"layers {bad} out of range 0..{n_layers - 1}")
    return layers


def add_method_args(parser) -> None:
    """CLI flags of the width methods (``structlm prune --method magnitude|wanda_sp|flap|llm_pruner``).
    :func:`method_options` turns the parsed namespace into ``make_plan(options=...)``."""
    import argparse

    g = parser.add_argument_group("width methods (magnitude, wanda_sp, flap, llm_pruner; defaults: the method's, "
                                  "docs/width-methods.md)")
    g.add_argument("--prune-hidden", action="store_true", default=argparse.SUPPRESS,
                   help="also remove residual (hidden) channels, Torch-Pruning/Sheared-LLaMA style (off by default)")
    g.add_argument("--gqa", choices=GQA_MODES, default=argparse.SUPPRESS,
                   help="remove whole KV groups, or query heads evenly from every KV group")
    g.add_argument("--allocation", choices=ALLOCATIONS, default=argparse.SUPPRESS,
                   help="uniform ratio per layer, one ratio counted per projection as LLM-Pruner's code (per_root), "
                        "a per-layer --schedule, or one global ranking with floors")
    g.add_argument("--schedule", default=argparse.SUPPRESS, help="comma-separated relative removal per layer (allocation=schedule)")
    g.add_argument("--layers", default=argparse.SUPPRESS, help="prunable layers: 'all', a slice '4:-2' or a list '3,4,5'")
    g.add_argument("--aggregate", choices=AGGREGATIONS, default=argparse.SUPPRESS, help="how a unit's member scores combine")
    g.add_argument("--taylor", default=argparse.SUPPRESS, help="llm_pruner: param_first | vectorize | param_second | param_mix")
    g.add_argument("--max-samples", type=int, default=argparse.SUPPRESS, help="llm_pruner: calibration samples used (paper: 10)")


WIDTH_METHODS = ("magnitude", "wanda_sp", "flap", "llm_pruner")


def method_options(args) -> dict:
    """Options for the width methods from the CLI namespace (only the flags given; empty for
    other methods).  ``--align`` also goes to the method, which aligns with its scores."""
    method = getattr(args, "method", None)
    if method is not None and method not in WIDTH_METHODS:
        return {}
    out = {}
    if getattr(args, "align", None) is not None:
        out["align"] = args.align
    for key in ("prune_hidden", "gqa", "allocation", "layers", "aggregate", "taylor", "max_samples"):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    if getattr(args, "schedule", None):
        out["schedule"] = [float(x) for x in args.schedule.split(",")]
    return out


# ---- model state ------------------------------------------------------------------------------

@contextlib.contextmanager
def model_state_guard(model):
    """Restore requires_grad, .grad, the train flag and remove ``guard.handles`` on exit."""
    params = list(model.named_parameters())
    saved = {n: (p.requires_grad, p.grad) for n, p in params}
    training = model.training
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
        for n, p in params:
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]
        model.train(training)


def module_of(model, param_name: str):
    return model.get_submodule(param_name.rpartition(".")[0])


def input_dim(module) -> int:
    """The weight dim indexed by input features: 1 for nn.Linear, 0 for GPT-2's Conv1D."""
    return 0 if type(module).__name__ == "Conv1D" else 1


# ---- activation statistics ----------------------------------------------------------------------

class InputStats:
    """Per-input-channel statistics of the inputs of ``modules`` (names) over every calibration
    token: ``mean``, unbiased ``var`` (FLAP's fluctuation) and ``sqnorm`` (sum of squares; Wanda's
    ``||X_j||^2``).  Accumulated in float64 by forward pre-hooks."""

    def __init__(self, model, modules):
        self.model = model
        self.names = list(dict.fromkeys(modules))
        self.sum: dict[str, torch.Tensor] = {}
        self.sumsq: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def _hook(self, name):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach().reshape(-1, x.shape[-1]).double()
            if name not in self.sum:
                self.sum[name] = torch.zeros(x.shape[-1], dtype=torch.float64)
                self.sumsq[name] = torch.zeros(x.shape[-1], dtype=torch.float64)
                self.count[name] = 0
            self.sum[name] += x.sum(0).cpu()
            self.sumsq[name] += x.square().sum(0).cpu()
            self.count[name] += x.shape[0]
        return hook

    def attach(self, names=None, model=None) -> list:
        """Register the recording hooks on ``names`` (default: all of them) of ``model`` (default:
        the one given at construction); returns the handles.  Streaming mode
        (:mod:`structlm.streaming`) attaches one layer's modules of its working copy at a time."""
        model = self.model if model is None else model
        return [model.get_submodule(name).register_forward_pre_hook(self._hook(name), with_kwargs=True)
                for name in (self.names if names is None else names)]

    def collect(self, calib: torch.Tensor, batch_size: int = 4, handles: list | None = None) -> "InputStats":
        """Run ``calib`` [N, L] through the model in batches, recording; under torchrun this rank's
        share of the batches, then the sums and counts are summed over the ranks
        (:mod:`structlm.distributed`)."""
        from .. import distributed

        calib = distributed.shard(calib, batch_size)
        own = self.attach()
        if handles is not None:
            handles.extend(own)
        try:
            device = next(self.model.parameters()).device
            with torch.no_grad():
                for start in range(0, calib.shape[0], batch_size):
                    self.model(calib[start:start + batch_size].to(device), use_cache=False)
        finally:
            for h in own:
                h.remove()
        missing = [n for n in self.names if n not in self.sum]
        if missing:
            raise RuntimeError(f"no input reached {missing[:3]} during calibration")
        distributed.reduce_input_stats(self, self.names)
        return self

    def mean(self, name) -> torch.Tensor:
        return self.sum[name] / self.count[name]

    def var(self, name) -> torch.Tensor:
        n = self.count[name]
        return ((self.sumsq[name] - self.sum[name].square() / n) / max(n - 1, 1)).clamp_min(0)

    def sqnorm(self, name) -> torch.Tensor:
        return self.sumsq[name]


# ---- from element scores to unit scores ------------------------------------------------------------

def merged_members(group) -> list[list]:
    """The group's members with each ``X.bias`` folded into the ``X.weight`` member that has the
    same output span (LLM-Pruner scores a projection's weight and bias as one)."""
    out: list[list] = []
    for m in group.members:
        if m.param.endswith(".bias"):
            w = m.param[:-5] + ".weight"
            host = next((ms for ms in out if ms[0].param == w and ms[0].offset == m.offset
                         and ms[0].width == m.width and ms[0].shape[ms[0].dim] == m.shape[0]), None)
            if host is not None:
                host.append(m)
                continue
        out.append([m])
    return out


def member_vector(elem: torch.Tensor, member, count: int, vectorize: bool = False,
                  fold_width: int | None = None) -> torch.Tensor:
    """Sum of ``elem`` over unit i's slice of ``member``, for every unit i -> [count].  With
    ``vectorize``, each index along the member's dim sums its vector first and takes ``|.|``
    (LLM-Pruner's vector-wise salience), then the unit sums its indices.

    ``fold_width``: score a member wider than ``fold_width`` per unit as LLM-Pruner's
    ``TaylorImportance`` does when a group's members differ in length: its L = count * width
    per-index scores are cut into consecutive runs of M = count * fold_width and the runs summed
    (``view(L // M, M).sum(0)``), then unit i takes indices ``i * fold_width ...`` of the sum.
    For a GQA KV group (k/v rows: fold_width = head_dim; q rows and o columns: width =
    n_rep * head_dim) this scores KV group g with query heads g, g + n_kv, g + 2 n_kv, ...
    instead of the heads that attend with it (g * n_rep ... g * n_rep + n_rep - 1)."""
    per_index = elem.narrow(member.dim, member.offset, count * member.width).movedim(member.dim, 0)
    per_index = per_index.reshape(count * member.width, -1).sum(-1)
    if vectorize:
        per_index = per_index.abs()
    width = member.width
    if fold_width and width > fold_width:
        if width % fold_width:
            raise WidthError(f"cannot fold {member.param} (width {width}) onto width {fold_width}")
        per_index = per_index.view(width // fold_width, count * fold_width).sum(0)
        width = fold_width
    return per_index.view(count, width).sum(-1)


def member_matrix(group, elem_fn, vectorize: bool = False, params: set | None = None,
                  fold: bool = False) -> torch.Tensor:
    """[members, count]: each (bias-merged) member's summed element score per unit.  ``elem_fn(name)``
    returns the element score tensor of a parameter, or None to skip it (members whose parameters
    are all skipped are left out); ``params`` restricts to those parameter names.  ``fold``: fold
    wider members onto the narrowest one's width (LLM-Pruner's alignment; see :func:`member_vector`)."""
    fold_width = min(m.width for m in group.members) if fold else None
    rows = []
    for ms in merged_members(group):
        acc = None
        for m in ms:
            if params is not None and m.param not in params:
                continue
            e = elem_fn(m.param)
            if e is None:
                continue
            v = member_vector(e, m, group.count, vectorize, fold_width).double()
            acc = v if acc is None else acc + v
        if acc is not None:
            rows.append(acc)
    if not rows:
        raise WidthError(f"no scored member in {group.label}")
    return torch.stack(rows)


def aggregate(matrix: torch.Tensor, how: str = "sum") -> torch.Tensor:
    """Combine the members' scores of each unit (LLM-Pruner's group reductions)."""
    if how == "sum":
        return matrix.sum(0)
    if how == "mean":
        return matrix.mean(0)
    if how == "max":
        return matrix.max(0).values
    if how == "prod":
        return matrix.prod(0)
    if how == "last":  # the last executing member (o_proj / down_proj columns, lm_head / final norm)
        return matrix[-1]
    raise WidthError(f"unknown aggregation {how!r}; choose from {', '.join(AGGREGATIONS)}")


def attention_kind(graph: Graph, gqa: str) -> str:
    if gqa not in GQA_MODES:
        raise WidthError(f"unknown gqa mode {gqa!r}; choose from {', '.join(GQA_MODES)}")
    return "query_head" if gqa == "query_heads" and graph.n_heads // graph.n_kv > 1 else "kv_group"


def scores_from_elements(graph: Graph, elem_fn, layers: list[int], *, gqa: str = "kv_groups",
                         aggregate_how: str = "sum", vectorize: bool = False, hidden: bool = False,
                         post=None) -> dict:
    """Unit scores {("kv_group"|"query_head"|"ffn_channel", layer): [count], ("hidden_channel", None): ...}
    for the prunable layers; ``post(matrix_or_vector)`` may transform the aggregated vector."""
    kind = attention_kind(graph, gqa)
    out = {}
    for i in layers:
        for k in (kind, "ffn_channel"):
            v = aggregate(member_matrix(graph.group(k, i), elem_fn, vectorize), aggregate_how)
            out[(k, i)] = post(v) if post else v
    if hidden:
        v = aggregate(member_matrix(graph.group("hidden_channel", None), elem_fn, vectorize), aggregate_how)
        out[("hidden_channel", None)] = post(v) if post else v
    return out


# ---- allocation ---------------------------------------------------------------------------------

@dataclass
class Sublayer:
    """The removal steps of one sublayer, least important first.  A step removes one KV group,
    one query head from every KV group (query_heads mode) or one FFN channel."""

    layer: int
    kind: str                       # "kv_group" | "query_head" | "ffn_channel"
    scores: torch.Tensor            # per unit
    order: list = field(default_factory=list)        # per step: unit indices it removes
    step_scores: torch.Tensor | None = None
    step_params: int = 0
    max_steps: int = 0              # steps allowed (floors applied)
    n_steps: int = 0                # all steps (sublayer emptied)
    align: int = 1

    @property
    def sublayer(self) -> str:
        return "ffn" if self.kind == "ffn_channel" else "attention"


def _sublayers(graph: Graph, scores: dict, layers: list[int], floor: float, align: int,
               remove_sublayers: bool) -> list[Sublayer]:
    out = []
    per_group = graph.n_heads // graph.n_kv
    for i in layers:
        for kind in ("kv_group", "query_head", "ffn_channel"):
            if (kind, i) not in scores:
                continue
            s = torch.as_tensor(scores[(kind, i)], dtype=torch.float64).flatten()
            if not bool(torch.isfinite(s).all()):
                raise WidthError(f"{kind} scores of layer {i} are not finite (NaN/Inf): the model's weights or its "
                                 f"calibration activations are broken; check the model with structlm eval")
            grp = graph.group(kind, i)
            if s.numel() != grp.count:
                raise WidthError(f"{kind} scores of layer {i}: {s.numel()} values for {grp.count} units")
            if kind == "query_head":
                # step j removes the j-th least important head of every KV group
                per = s.view(graph.n_kv, per_group)
                ranks = per.argsort(dim=1, stable=True)
                order = [[g * per_group + int(ranks[g, j]) for g in range(graph.n_kv)] for j in range(per_group)]
                step_scores = torch.stack([s[idx].sum() for idx in order])
                n_steps, unit_params = per_group, grp.params_per_unit * graph.n_kv
            else:
                idx = s.argsort(stable=True)
                order = [[int(u)] for u in idx]
                step_scores = s[idx]
                n_steps, unit_params = grp.count, grp.params_per_unit
            ali = align if kind == "ffn_channel" else 1
            if remove_sublayers:
                keep_min = 0
            else:
                keep_min = max(1, math.ceil(floor * n_steps))
                if kind == "ffn_channel":
                    keep_min = min(n_steps, align_count(keep_min, ali, n_steps))
            out.append(Sublayer(i, kind, s, order, step_scores, unit_params, n_steps - keep_min, n_steps, ali))
    return out


def _removed_steps(sub: Sublayer, want: int) -> int:
    """Clamp ``want`` removed steps to the floor and align the kept width (rounded toward keeping more)."""
    want = max(0, min(int(want), sub.max_steps))
    if sub.align > 1:
        kept = sub.n_steps - want
        if kept > 0:
            kept = align_count(kept, sub.align, sub.n_steps)
        want = sub.n_steps - kept
    return want


def per_root_removed_steps(graph: Graph, sub: Sublayer, ratio: float) -> int:
    """Steps of ``sub`` that one pruning ``ratio`` removes in LLM-Pruner's code (its Torch-Pruning
    ``MetaPruner`` in local mode, where the ratio is applied to every root projection separately).

    The root's C output channels keep ``int(C * (1 - ratio))``; the pruned channels are taken in
    whole units, rounded down.  Roots and units: an FFN channel is one channel of gate_proj; a KV
    group is ``head_dim`` channels of k_proj (``consecutive_groups=head_dim``), and on models
    without GQA a head is ``head_dim`` channels of q_proj.  In query_heads mode (a structlm
    extension: the official code removes whole KV groups) the root is q_proj with one head per
    unit, and the heads are rounded down to a multiple of the KV-group count, since one step takes
    a head from every group.  Floors and alignment are left to :func:`_removed_steps`."""
    if sub.kind == "ffn_channel":
        unit_width, units_per_step = 1, 1
    else:
        unit_width = graph.head_dim
        units_per_step = graph.n_kv if sub.kind == "query_head" else 1
    channels = sub.n_steps * units_per_step * unit_width
    pruned_units = (channels - int(channels * (1 - ratio))) // unit_width
    return pruned_units // units_per_step


def _plan_from_counts(graph: Graph, subs: list[Sublayer], counts: list[int], hidden_kept: list[int] | None,
                      align: int) -> PrunePlan:
    layers: dict[int, LayerPlan] = {}
    per_group = graph.n_heads // graph.n_kv
    for sub, k in zip(subs, counts):
        lp = layers.setdefault(sub.layer, LayerPlan())
        removed = {u for step in sub.order[:k] for u in step}
        if k == 0:
            continue
        if k >= sub.n_steps:
            if sub.sublayer == "attention":
                lp.attention = False
            else:
                lp.ffn = False
            continue
        if sub.kind == "kv_group":
            lp.kv_groups = [g for g in range(graph.n_kv) if g not in removed]
        elif sub.kind == "query_head":
            lp.query_heads = [h for h in range(graph.n_heads) if h not in removed]
            assert len(lp.query_heads) % graph.n_kv == 0 and per_group > 1
        else:
            lp.ffn_channels = [c for c in range(graph.intermediate) if c not in removed]
    layers = {i: lp for i, lp in layers.items() if not lp.is_identity}
    return PrunePlan(layers=layers, hidden_channels=hidden_kept, family=graph.family, align=align)


def _hidden_kept(graph: Graph, hidden_scores, ratio: float, align: int) -> list[int] | None:
    if hidden_scores is None or ratio <= 0:
        return None
    s = torch.as_tensor(hidden_scores, dtype=torch.float64)
    n_keep = align_count(max(1, graph.hidden - int(round(ratio * graph.hidden))), align, graph.hidden)
    if n_keep >= graph.hidden:
        return None
    keep = s.argsort(descending=True, stable=True)[:n_keep]
    return sorted(int(c) for c in keep)


def _search(evaluate, budget: int, lo: float, hi: float, integer: bool = False, iters: int = 60):
    """Smallest x in [lo, hi] with evaluate(x) <= budget (evaluate is non-increasing in x)."""
    if evaluate(hi) > budget:
        return None
    if evaluate(lo) <= budget:
        return lo
    for _ in range(iters):
        if integer and hi - lo <= 1:
            break
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        if evaluate(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return hi


def allocate(graph: Graph, scores: dict, target, *, allocation: str = "uniform", layers: list[int] | None = None,
             schedule=None, floor: float = 0.0, align: int = 8, hidden_scores=None, hidden_ratio: float | None = None,
             attn_ratio: float | None = None, attn_rounding: str | None = None, global_score: str = "density",
             remove_sublayers: bool = False, hidden_option: bool = True,
             reach_only: bool = False) -> tuple[PrunePlan | None, dict]:
    """A plan removing the lowest-scored units so that ``plan.cost(graph)["params"]`` is at most
    ``target`` (a ``params`` keep fraction), as close to it as the unit sizes and alignment allow.

    ``scores`` maps (kind, layer) to per-unit scores (kind ``kv_group``, or ``query_head`` for
    even query-head removal, and ``ffn_channel``); only those layers are pruned.  ``allocation``:

    * ``uniform``: every prunable layer removes the same fraction r of its attention steps
      (``attn_rounding``: ``floor(r * n)`` by default, or ``round(r * n)``, half to even) and of
      its FFN channels (``attn_ratio`` fixes the attention fraction instead); the FFN fraction is
      then refilled up to the target, since attention steps are coarse;
    * ``per_root``: LLM-Pruner's code: one ratio r applied to every projection root as
      :func:`per_root_removed_steps` counts it (attention and FFN alike, no refill), r the smallest
      that meets the target (``attn_ratio`` fixes the attention's r instead);
    * ``schedule``: layer i removes ``min(max, s * schedule[i])`` (s scaled to the target);
    * ``global``: one ranking of every step of every layer, by ``score / params`` (``global_score
      ="density"``) or the raw score (``"raw"``, for scores that are already comparable, e.g.
      FLAP's standardised ones); per-layer floors keep ``max(1, ceil(floor * n))`` units.

    With ``hidden_scores`` the residual width is pruned too: ``hidden_ratio`` of it, or by
    default the uniform fraction that alone would give the target over the whole model.
    Kept FFN and hidden widths are multiples of ``align``.  ``hidden_option``: whether an
    out-of-reach error may offer --prune-hidden (not where the family or method refuses it).
    ``reach_only``: only raise that error if the target is out of reach, and return (None, info).
    """
    target = parse_target(target)
    if target.kind != "params" and not target.is_latency:
        raise WidthError(f"width methods take a params target (e.g. params=0.8) or a latency target "
                         f"(speedup=1.5, latency_ms=20), not {target}")
    if target.is_latency and hidden_scores is not None:
        raise WidthError(f"target {target}: the latency model does not cover hidden-channel pruning (its table is "
                         f"measured at the model's hidden width); drop --prune-hidden, or use a params target")
    if allocation not in ALLOCATIONS:
        raise WidthError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    if attn_rounding is not None and allocation != "uniform":
        raise WidthError(f"attn_rounding applies to allocation=uniform only (this is {allocation}); drop it or "
                         "add -O allocation=uniform")
    # floor by default: a KV group goes only once r * n reaches a whole group. Measured on SmolLM2
    # (docs/width-methods.md, "Rounding KV groups"): never worse than round, and far better where
    # they differ (wanda_sp at 90% kept: 30.7 vs 1306; llm_pruner's shapes at 90%/70%: 28.5/181 vs 59.6/226)
    attn_rounding = attn_rounding or "floor"
    if attn_rounding not in ATTN_ROUNDINGS:
        raise WidthError(f"unknown attn_rounding {attn_rounding!r}; choose from {', '.join(ATTN_ROUNDINGS)}")
    dense = graph.total_params
    if target.is_latency:   # the cost is the latency table's prediction, the budget in its ms
        table = target.latency
        budget = target.latency_budget(graph)
        dense_cost = table.dense_ms(graph)
    else:
        budget = int(math.floor(target.value * dense))
        dense_cost = dense
    subs = _sublayers(graph, scores, sorted({k[1] for k in scores if k[1] is not None}), floor, align,
                      remove_sublayers)
    if not subs:
        raise WidthError("nothing to prune: no prunable layer selected")
    attn = [j for j, s in enumerate(subs) if s.sublayer == "attention"]
    ffn = [j for j, s in enumerate(subs) if s.sublayer == "ffn"]

    def cost(counts, hidden_kept):
        plan = _plan_from_counts(graph, subs, counts, hidden_kept, align)
        if target.is_latency:
            return table.predict(graph, plan)["total_ms"]
        return plan.cost(graph)["params"]

    def deepest_cost(hidden):
        """Parameters kept when every prunable unit is removed down to its floor."""
        return cost([_removed_steps(s, s.max_steps) for s in subs], hidden)

    def out_of_reach(how: str, hidden) -> WidthError:
        """The error for an unreachable target: how far these settings can go, and what reaches further."""
        deepest = deepest_cost(hidden) / dense_cost
        if target.is_latency:
            fixes = [f"a milder target (speedup={math.floor(100 / deepest) / 100:g} or less, or "
                     f"latency_ms={math.ceil(deepest * dense_cost * 100) / 100:g} or more)",
                     "a layer method (shortgpt, finercut) or ziplm, which remove whole sublayers"]
        else:
            fixes = [f"a milder target (params={math.ceil(deepest * 1000) / 1000:g} or more)"]
        pruned_layers = {s.layer for s in subs}
        if len(pruned_layers) < graph.n_layers:
            fixes.append(f"more prunable layers (--layers all; now {len(pruned_layers)} of {graph.n_layers})")
        if attn and all(subs[j].kind == "kv_group" for j in attn) and graph.n_kv == 1 < graph.n_heads:
            # with several groups, whole-group removal already reaches further than query heads
            fixes.append("--gqa query_heads (one KV group per layer: whole-group removal cannot touch attention)")
        if floor > 0:
            fixes.append(f"a lower floor (-O floor=0; now {floor:g})")
        if hidden is None and hidden_option and not target.is_latency:
            fixes.append("--prune-hidden (the embeddings and residual width are otherwise kept whole)")
        if target.is_latency:
            still = (f"is still predicted at {deepest * dense_cost:.2f} ms (x{1 / deepest:.2f} of the dense "
                     f"{dense_cost:.2f} ms) against a budget of {budget:.2f} ms")
        else:
            still = f"still keeps {deepest:.1%} of the parameters"
        return WidthError(f"target {target} is out of reach {how}: removing every prunable unit down to its "
                          f"floor {still}. Fix: {'; or '.join(fixes)} (the Python options have the same names)")

    attn_round = math.floor if attn_rounding == "floor" else round

    def uniform_counts(r_attn, r_ffn):
        counts = [0] * len(subs)
        for j in attn:
            counts[j] = _removed_steps(subs[j], attn_round(r_attn * subs[j].n_steps))
        for j in ffn:
            counts[j] = _removed_steps(subs[j], round(r_ffn * subs[j].n_steps))
        return counts

    def per_root_counts(r_attn, r_ffn):
        return [_removed_steps(s, per_root_removed_steps(graph, s, r_attn if s.sublayer == "attention" else r_ffn))
                for s in subs]

    ratio_counts = per_root_counts if allocation == "per_root" else uniform_counts

    hidden_kept = None
    info: dict = {"allocation": allocation, "dense_params": dense,
                  **({"budget_ms": budget, "dense_predicted_ms": dense_cost} if target.is_latency
                     else {"budget_params": budget})}
    if reach_only:
        if allocation != "schedule":   # a schedule's zero-weight layers stay whole: checked after scoring
            hidden = _hidden_kept(graph, hidden_scores, 0.99 if hidden_ratio is None else hidden_ratio, align)
            if deepest_cost(hidden) > budget:
                raise out_of_reach("even with the hidden width pruned" if hidden is not None
                                   else f"with {allocation} allocation", hidden)
        return None, info
    if hidden_scores is not None:
        if hidden_ratio is None:  # the uniform fraction for everything, hidden included
            r = _search(lambda r: cost(ratio_counts(r, r), _hidden_kept(graph, hidden_scores, r, align)),
                        budget, 0.0, 0.99)
            if r is None:
                raise out_of_reach("even with the hidden width pruned", _hidden_kept(graph, hidden_scores, 0.99, align))
            hidden_ratio = r
        hidden_kept = _hidden_kept(graph, hidden_scores, hidden_ratio, align)
        info["hidden_ratio"] = round(hidden_ratio, 4)

    if allocation in ("uniform", "per_root"):
        def counts_for(r):
            return ratio_counts(r if attn_ratio is None else attn_ratio, r)
        found = _search(lambda r: cost(counts_for(r), hidden_kept), budget, 0.0, 1.0)
        if found is None:
            raise out_of_reach(f"with {allocation} allocation", hidden_kept)
        counts = counts_for(found)
        if allocation == "uniform":
            info["attn_rounding"] = attn_rounding
        if allocation == "uniform" and attn_ratio is None:  # coarse attention steps: refill the FFN to the budget
            fixed = {j: counts[j] for j in attn}

            def refill(r):
                c = uniform_counts(0.0, r)
                for j, v in fixed.items():
                    c[j] = v
                return c
            r_ffn = _search(lambda r: cost(refill(r), hidden_kept), budget, 0.0, found)
            counts = refill(r_ffn if r_ffn is not None else found)
            info["ffn_ratio"] = round(r_ffn if r_ffn is not None else found, 4)
        info["ratio"] = round(found, 4)
    elif allocation == "schedule":
        if schedule is None:
            raise WidthError("allocation='schedule' needs schedule= per-layer relative removal (list or {layer: w})")
        if isinstance(schedule, dict):
            weights = {int(k): float(v) for k, v in schedule.items()}
        else:
            schedule = list(schedule)
            if len(schedule) != graph.n_layers:
                raise WidthError(f"schedule has {len(schedule)} entries for {graph.n_layers} layers")
            weights = {i: float(w) for i, w in enumerate(schedule)}
        if any(w < 0 for w in weights.values()):
            raise WidthError("schedule weights must be >= 0")

        def counts_for(s):
            counts = [0] * len(subs)
            for j, sub in enumerate(subs):
                r = min(1.0, s * weights.get(sub.layer, 0.0))
                counts[j] = _removed_steps(sub, round(r * sub.n_steps))
            return counts
        top = 1.0 / max(min([w for w in weights.values() if w > 0] or [1.0]), 1e-9)
        found = _search(lambda s: cost(counts_for(s), hidden_kept), budget, 0.0, top)
        if found is None:
            raise out_of_reach("with this schedule", hidden_kept)
        counts = counts_for(found)
        info["scale"] = round(found, 6)
    else:
        cand_score, cand_sub = [], []
        for j, sub in enumerate(subs):
            st = sub.step_scores[: sub.max_steps]
            if global_score == "density":
                st = st / sub.step_params
            cand_score.append(st)
            cand_sub.append(torch.full((len(st),), j, dtype=torch.long))
        all_scores = torch.cat(cand_score)
        all_subs = torch.cat(cand_sub)
        # steps of one sublayer are taken in order: make each sublayer's sequence non-decreasing
        # so that a global prefix is always a prefix per sublayer
        pos = 0
        for st in cand_score:
            n = len(st)
            if n:
                all_scores[pos:pos + n] = torch.cummax(all_scores[pos:pos + n], 0).values
            pos += n
        order = all_scores.argsort(stable=True)
        ranked_subs = all_subs[order]

        def counts_for(k):
            k = int(k)
            raw = torch.bincount(ranked_subs[:k], minlength=len(subs)).tolist()
            return [_removed_steps(sub, c) for sub, c in zip(subs, raw)]
        found = _search(lambda k: cost(counts_for(k), hidden_kept), budget, 0, len(order), integer=True)
        if found is None:
            raise out_of_reach("with global allocation", hidden_kept)
        counts = counts_for(found)
        info["steps"] = int(found)
    plan = _plan_from_counts(graph, subs, counts, hidden_kept, align)
    align_scores = {("ffn_channel", s.layer): s.scores for s in subs if s.kind == "ffn_channel"}
    if hidden_scores is not None:
        align_scores[("hidden_channel", None)] = torch.as_tensor(hidden_scores)
    align_plan(plan, graph, align, align_scores)
    plan.validate(graph)
    c = plan.cost(graph)
    info.update(params=c["params"], params_ratio=round(c["params_ratio"], 5), widths=widths_table(plan, graph))
    return plan, info


def widths_table(plan: PrunePlan, graph: Graph) -> list[dict]:
    """Per layer: kept query heads, KV heads, FFN channels (the dry-run widths)."""
    return [{"layer": r["layer"], "heads": r["heads"], "kv_heads": r["kv_heads"], "ffn": r["ffn_channels"]}
            for r in plan.shapes(graph)]


def width_options(model, graph: Graph, options: dict, *, default_layers=None, default_allocation: str = "uniform"):
    """Common options of the width methods -> (allocation kwargs, gqa, layers, prune_hidden).
    A family whose hidden width cannot be pruned exactly is refused here, before any scoring."""
    from ..families import get_adapter
    from ..surgery import hidden_pruning_refusal

    layers = parse_layers(options.pop("layers", default_layers), graph.n_layers)
    if not layers:
        layers = list(range(graph.n_layers))
    gqa = options.pop("gqa", "kv_groups")
    attention_kind(graph, gqa)
    prune_hidden = bool(options.pop("prune_hidden", False))
    refusal = hidden_pruning_refusal(get_adapter(model.config))
    if prune_hidden and refusal:
        raise WidthError(f"--prune-hidden: {refusal}")
    alloc = dict(allocation=options.pop("allocation", default_allocation), schedule=options.pop("schedule", None),
                 floor=float(options.pop("floor", 0.0)), align=int(options.pop("align", 8)),
                 hidden_ratio=options.pop("hidden_ratio", None), attn_ratio=options.pop("attn_ratio", None),
                 attn_rounding=options.pop("attn_rounding", None),
                 remove_sublayers=bool(options.pop("remove_sublayers", False)), hidden_option=refusal is None)
    return alloc, gqa, layers, prune_hidden


def check_reach(graph: Graph, target, gqa: str, layers: list[int], alloc: dict, prune_hidden: bool) -> None:
    """Raise the out-of-reach error before scoring (which takes minutes on a real model): how far
    pruning can go depends on the units, floors and alignment, not on the scores."""
    kind = attention_kind(graph, gqa)
    uniform = {}
    for i in layers:
        uniform[(kind, i)] = torch.ones(graph.count(kind, i))
        uniform[("ffn_channel", i)] = torch.ones(graph.count("ffn_channel", i))
    allocate(graph, uniform, target, layers=layers, reach_only=True,
             hidden_scores=torch.ones(graph.hidden) if prune_hidden else None, **alloc)


def reject_unknown(method: str, options: dict) -> None:
    from . import reject_unknown_options

    reject_unknown_options(method, options, error=WidthError, hint="its options: docs/width-methods.md")


def score_summary(scores: dict) -> dict:
    """JSON-able per-layer scores: attention units in full, FFN channels as quantiles."""
    out = {}
    for (kind, layer), v in sorted(scores.items(), key=lambda kv: (kv[0][1] is None, kv[0][1] or 0, kv[0][0])):
        v = torch.as_tensor(v, dtype=torch.float64)
        key = f"{kind}/{'global' if layer is None else layer}"
        if v.numel() <= 64:
            out[key] = [float(f"{x:.6g}") for x in v.tolist()]
        else:
            q = torch.quantile(v.float(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])).tolist()
            out[key] = {"quantiles_0_25_50_75_100": [float(f"{x:.6g}") for x in q]}
    return out


def as_target(target) -> Target:
    return parse_target(target)
