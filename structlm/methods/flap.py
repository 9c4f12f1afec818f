"""FLAP (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning"), with bias compensation.

For the output projection of each sublayer (attention o_proj, FFN down_proj) with weight ``W``
(outputs x inputs) and input ``X`` over every calibration token:

    fluctuation  f_j = Var_t[X_tj]                          (unbiased, over all N tokens)
    WIFV         s_j = f_j * ||W[:, j]||_2^2                (default metric)
    IFV          s_j = f_j ;  WIFN  s_j = mean_i |W_ij| * sqrt(mean_t X_tj^2)

Attention channel scores are squared (``s_j^2``, as the reference code does).  Each module's
scores are **standardised per layer** (``(s - mean) / std`` over that layer's channels of that
module), which makes layers and modules comparable: an FFN channel's score is its standardised
``s_j``; a query head's (KV group's) is the mean standardised score of its o_proj input channels.
The default allocation is ``global`` on these raw standardised scores (the paper's adaptive
AL-AM structure: one threshold, units weighted by their parameter counts); ``uniform`` and
``schedule`` are available too.

Bias compensation: removed input channels R of an output projection are replaced by their mean
over the calibration tokens, which becomes a bias

    b' = b + W[:, R] @ mean_t(X[:, R])

so that the layer's mean output on the calibration data is unchanged.  The new biases go into
``plan.updates`` (Llama: exported with ``attention_bias``/``mlp_bias``).  ``bias="auto"`` (default)
compensates where the family can hold the bias (Llama, or output projections that already have
one) and notes it in the info otherwise; ``bias=True`` requires it, ``False`` turns it off.
Hidden-channel pruning is not part of FLAP and is refused.

Options: ``metric`` ("WIFV"), ``bias`` ("auto"), ``batch_size`` (4) and the allocation options of
:func:`structlm.methods._width.allocate` (default ``allocation="global"``).
"""

from __future__ import annotations

import torch

from . import register
from ._width import (InputStats, WidthError, allocate, attention_kind, check_reach, input_dim, model_state_guard,
                     reject_unknown, score_summary, width_options)
from ..families import get_adapter
from ..surgery import BIAS_FLAGS

METRICS = ("WIFV", "IFV", "WIFN")


def _standardise(x: torch.Tensor) -> torch.Tensor:
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def channel_metric(weight: torch.Tensor, in_dim: int, stats: InputStats, module: str, metric: str) -> torch.Tensor:
    w = weight.detach().double()
    if metric == "IFV":
        return stats.var(module)
    if metric == "WIFV":
        return stats.var(module) * w.square().sum(dim=1 - in_dim)
    if metric == "WIFN":
        rms = (stats.sqnorm(module) / stats.count[module]).sqrt()
        return (w.abs() * rms.view([-1, 1] if in_dim == 0 else [1, -1])).mean(dim=1 - in_dim)
    raise WidthError(f"flap: unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def compensation(weight: torch.Tensor, in_dim: int, mean: torch.Tensor, removed: list[int]) -> torch.Tensor:
    """``W[:, R] @ mean[R]``: the removed channels' mean contribution to the output."""
    if not removed:
        return torch.zeros(weight.shape[1 - in_dim], dtype=torch.float64)
    idx = torch.tensor(removed)
    w = weight.detach().double().index_select(in_dim, idx)
    return (w.T if in_dim == 0 else w) @ mean[idx]


def output_projections(model, layers) -> dict:
    """{layer: {"attention": o_proj, "ffn": down_proj}} (the adapter's projections)."""
    ad = get_adapter(model.config).bind({n: tuple(p.shape) for n, p in model.named_parameters()})
    return {i: {"attention": ad.o(i), "ffn": ad.ffn_out(i)} for i in layers}


def stat_modules(model, layers) -> list[str]:
    """The modules whose inputs FLAP's scores of ``layers`` read (their output projections)."""
    outs = output_projections(model, layers)
    return [p.weight.rpartition(".")[0] for i in layers for p in outs[i].values()]


def flap_scores(model, graph, calib, layers, *, gqa: str = "kv_groups", metric: str = "WIFV", batch_size: int = 4,
                kinds=None, stats: InputStats | None = None) -> tuple[dict, InputStats, dict]:
    """FLAP's standardised unit scores {(kind, layer): [count]} of ``layers`` on ``calib`` [N, L],
    with the input statistics and the output projections {layer: {"attention": o, "ffn": down}}
    (for the bias compensation).  ``kinds``: the attention kinds to score (default: the ``gqa``
    mode's); FFN channels are always scored.  ``stats``: input statistics already collected over
    :func:`stat_modules` (streaming mode), else collected here on ``calib``."""
    if metric not in METRICS:
        raise WidthError(f"flap: unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    params = dict(model.named_parameters())
    outs = output_projections(model, layers)
    if stats is None:
        with model_state_guard(model) as handles:
            model.eval()
            stats = InputStats(model, stat_modules(model, layers)).collect(calib, batch_size, handles)

    attn_kinds = tuple(kinds) if kinds else (attention_kind(graph, gqa),)
    per_group = graph.n_heads // graph.n_kv
    hd = graph.head_dim
    scores = {}
    for i in layers:
        o, down = outs[i]["attention"], outs[i]["ffn"]
        om, dm = o.weight.rpartition(".")[0], down.weight.rpartition(".")[0]
        a = channel_metric(params[o.weight], input_dim(model.get_submodule(om)), stats, om, metric).square()
        a = _standardise(a)
        for kind in attn_kinds:
            width = per_group * hd if kind == "kv_group" else hd
            scores[(kind, i)] = a.view(-1, width).mean(1)
        f = channel_metric(params[down.weight], input_dim(model.get_submodule(dm)), stats, dm, metric)
        scores[("ffn_channel", i)] = _standardise(f)
    return scores, stats, outs


def flap_options(model, graph, target, options: dict) -> dict:
    """Parse and check FLAP's options (reach included) before any scoring."""
    alloc, gqa, layers, prune_hidden = width_options(model, graph, options, default_allocation="global")
    opts = dict(alloc=alloc, gqa=gqa, layers=layers, metric=options.pop("metric", "WIFV"),
                bias=options.pop("bias", "auto"), batch_size=int(options.pop("batch_size", 4)),
                global_score=options.pop("global_score", "raw"))
    reject_unknown("flap", options)
    if prune_hidden:
        raise WidthError("flap prunes heads and FFN channels only; hidden channels (--prune-hidden) are not part "
                         "of FLAP (use magnitude, wanda_sp or llm_pruner)")
    alloc["hidden_option"] = False   # so an out-of-reach error does not offer --prune-hidden
    check_reach(graph, target, gqa, layers, alloc, prune_hidden)
    if opts["metric"] not in METRICS:
        raise WidthError(f"flap: unknown metric {opts['metric']!r}; choose from {', '.join(METRICS)}")
    return opts


def flap_plan(model, graph, target, scores: dict, opts: dict):
    """Allocate the scored units (budgeting for the new biases): (plan, info, compensate).  The
    model's weights are not read (shapes only)."""
    layers, bias = opts["layers"], opts["bias"]
    outs = output_projections(model, layers)
    ad = get_adapter(model.config).bind({n: tuple(p.shape) for n, p in model.named_parameters()})
    # new biases make the model larger (Llama: every projection of the kind gets one): budget for them
    can_bias = graph.family in BIAS_FLAGS or all(outs[i][k].bias for i in layers for k in ("attention", "ffn"))
    if bias is True and not can_bias:
        raise WidthError(f"flap: {graph.family} output projections have no bias and its config cannot add one; "
                         f"use bias=False (or 'auto')")
    compensate = bool(bias) and can_bias
    if compensate and graph.family in BIAS_FLAGS:
        extra = 0
        for i in range(graph.n_layers):
            for proj in [ad.q(i), ad.k(i), ad.v(i), ad.o(i)] + ad.ffn_in(i) + [ad.ffn_out(i)]:
                if not proj.bias:
                    extra += proj.size
        from ..targets import Target, parse_target
        t = parse_target(target)
        if t.kind == "params":    # (a latency target: the bias adds are not in the table; a few us per layer)
            target = Target("params", t.value - extra / graph.total_params)
    plan, info = allocate(graph, scores, target, layers=layers, global_score=opts["global_score"], **opts["alloc"])
    info.update(method="flap", metric=opts["metric"], gqa=opts["gqa"], layers=layers,
                bias_compensation=compensate if compensate or not bias else
                f"skipped: {graph.family} cannot hold new output biases", scores=score_summary(scores))
    return plan, info, compensate


def compensate_biases(model, graph, plan, stats: InputStats, layers) -> None:
    """Put FLAP's compensated output biases of ``layers`` into ``plan.updates`` (reads those
    layers' output projections and the calibration means of their inputs)."""
    params = dict(model.named_parameters())
    outs = output_projections(model, layers)
    hd = graph.head_dim
    for i in layers:
        lp = plan.layer(i)
        removed_heads = sorted(set(range(graph.n_heads)) - set(plan.kept_heads(graph, i)))
        for sub, proj, removed in (
                ("attention", outs[i]["attention"], [h * hd + d for h in removed_heads for d in range(hd)]),
                ("ffn", outs[i]["ffn"], sorted(set(range(graph.intermediate)) - set(plan.kept_ffn(graph, i))))):
            if not removed or not getattr(lp, sub):
                continue
            module = proj.weight.rpartition(".")[0]
            delta = compensation(params[proj.weight], input_dim(model.get_submodule(module)),
                                 stats.mean(module), removed)
            old = params[proj.bias].detach().double() if proj.bias else 0.0
            plan.updates[proj.weight[:-len(".weight")] + ".bias"] = (old + delta).float()


@register("flap")
@torch.no_grad()
def flap(model, graph, target, calib, **options):
    opts = flap_options(model, graph, target, options)
    scores, stats, _ = flap_scores(model, graph, calib, opts["layers"], gqa=opts["gqa"], metric=opts["metric"],
                                   batch_size=opts["batch_size"])
    plan, info, compensate = flap_plan(model, graph, target, scores, opts)
    if compensate:
        compensate_biases(model, graph, plan, stats, opts["layers"])
    info.update(compensated_biases=len(plan.updates), calibration=list(calib.shape))
    return plan, info
