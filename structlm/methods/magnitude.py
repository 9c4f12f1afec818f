"""Magnitude width pruning: a unit's score is the Lp norm of all its weights.

    score(u) = ( sum_{m in members(u)} sum_{e in slice_m(u)} |w_e|^p )^(1/p)        (p = 1 or 2)

Members are the unit's slices in the dependency graph (for a KV group: its q, k, v rows and o_proj
columns, biases included; for an FFN channel: gate and up rows and the down_proj column).  With
``aggregate`` other than ``sum``, each member's ``sum |w|^p`` is combined by that reduction
(mean / max / prod / last) before the root.  No calibration data is used.

Options: ``p`` (2), ``aggregate`` ("sum"), and the allocation options of
:func:`structlm.methods._width.allocate` (``allocation``, ``schedule``, ``floor``, ``gqa``,
``layers``, ``prune_hidden``, ``hidden_ratio``, ``attn_ratio``, ``align``, ``global_score``).
"""

from __future__ import annotations

import torch

from . import register
from ._width import allocate, check_reach, reject_unknown, score_summary, scores_from_elements, width_options


def magnitude_scores(model, graph, layers, *, p: float = 2.0, gqa: str = "kv_groups", aggregate: str = "sum",
                     hidden: bool = False) -> dict:
    params = dict(model.named_parameters())
    cache: dict = {}

    def elem(name):
        if name not in cache:
            cache.clear()  # one element tensor at a time (members of a param are consecutive)
            cache[name] = params[name].detach().float().abs().pow(p)
        return cache[name]

    return scores_from_elements(graph, elem, layers, gqa=gqa, aggregate_how=aggregate, hidden=hidden,
                                post=lambda v: v.clamp_min(0).pow(1.0 / p))


def magnitude_options(model, graph, target, options: dict) -> dict:
    """Parse and check magnitude's options (reach included) before any scoring."""
    alloc, gqa, layers, prune_hidden = width_options(model, graph, options)
    opts = dict(alloc=alloc, gqa=gqa, layers=layers, prune_hidden=prune_hidden, p=float(options.pop("p", 2)),
                aggregate=options.pop("aggregate", "sum"), global_score=options.pop("global_score", "density"))
    reject_unknown("magnitude", options)
    check_reach(graph, target, gqa, layers, alloc, prune_hidden)
    return opts


def magnitude_plan(graph, target, scores: dict, opts: dict) -> tuple:
    """Allocate the scored units: (plan, info)."""
    scores = dict(scores)
    hidden_scores = scores.pop(("hidden_channel", None), None)
    plan, info = allocate(graph, scores, target, layers=opts["layers"], hidden_scores=hidden_scores,
                          global_score=opts["global_score"], **opts["alloc"])
    info.update(method="magnitude", p=opts["p"], aggregate=opts["aggregate"], gqa=opts["gqa"], layers=opts["layers"],
                prune_hidden=opts["prune_hidden"], scores=score_summary(scores))
    return plan, info


@register("magnitude")
@torch.no_grad()
def magnitude(model, graph, target, calib=None, **options):
    opts = magnitude_options(model, graph, target, options)
    scores = magnitude_scores(model, graph, opts["layers"], p=opts["p"], gqa=opts["gqa"], aggregate=opts["aggregate"],
                              hidden=opts["prune_hidden"])
    return magnitude_plan(graph, target, scores, opts)
