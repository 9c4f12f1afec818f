"""Wanda-SP (structured Wanda, as in An et al. 2024): weight magnitude times input activation norm.

Element score of a weight ``W[i, j]`` of a projection whose input is ``X`` (calibration tokens x
input channels):

    s(W[i, j]) = |W[i, j]| * ||X[:, j]||_2

A unit's score sums ``s`` over its members' slices.  ``scope="out"`` (default, the reference
Wanda-SP) scores only the output projection's columns: a KV group / query head by its o_proj
columns, an FFN channel by its down_proj column, i.e. ``sum_j ||X_j|| * sum_i |W[i, j]|`` over the
unit's input channels j of o_proj/down_proj.  ``scope="unit"`` adds every projection slice of the
unit (q/k/v/gate/up rows with their own inputs' norms).  Hidden channels (``prune_hidden``) sum
``s`` over every projection that reads or writes the channel.  Biases, norms and embeddings carry
no input and are not scored.

Options: ``scope`` ("out"), ``aggregate`` ("sum"), ``batch_size`` (4) and the allocation options of
:func:`structlm.methods._width.allocate`.
"""

from __future__ import annotations

import torch

from . import register
from ._width import (InputStats, WidthError, allocate, check_reach, input_dim, member_matrix, model_state_guard,
                     aggregate as aggregate_fn, attention_kind, reject_unknown, score_summary, width_options)
from ..families import get_adapter


def projection_modules(model, graph, layers) -> dict:
    """layer -> {"out": [o, down] weight names, "in": [q, k, v, gate, up] weight names}."""
    ad = get_adapter(model.config).bind({n: tuple(p.shape) for n, p in model.named_parameters()})
    out = {}
    for i in layers:
        out[i] = {"out": [ad.o(i).weight, ad.ffn_out(i).weight],
                  "in": list(dict.fromkeys([ad.q(i).weight, ad.k(i).weight, ad.v(i).weight]
                                           + [p.weight for p in ad.ffn_in(i)]))}
    return out


def stat_modules(model, graph, layers, scope: str = "out", hidden: bool = False) -> list[str]:
    """The modules whose inputs Wanda-SP's scores of ``layers`` read."""
    mods = projection_modules(model, graph, layers)
    return [w.rpartition(".")[0] for i in layers for w in mods[i]["out"]
            + (mods[i]["in"] if scope == "unit" or hidden else [])]


def wanda_elements(model, stats: InputStats):
    params = dict(model.named_parameters())
    cache: dict = {}

    def elem(name):
        module = name.rpartition(".")[0]
        if not name.endswith(".weight") or module not in stats.sum:
            return None
        if name not in cache:
            cache.clear()
            w = params[name].detach().float().abs()
            norm = stats.sqnorm(module).sqrt().float()
            shape = [1, 1]
            shape[input_dim(model.get_submodule(module))] = -1
            cache[name] = w * norm.view(shape)
        return cache[name]
    return elem


def wanda_sp_scores(model, graph, calib, layers, *, gqa: str = "kv_groups", scope: str = "out",
                    aggregate: str = "sum", batch_size: int = 4, hidden: bool = False, kinds=None,
                    stats: InputStats | None = None) -> dict:
    """Wanda-SP unit scores {(kind, layer): [count]} of ``layers`` on ``calib`` [N, L] (and
    ("hidden_channel", None) with ``hidden``).  ``kinds``: the attention/FFN unit kinds to score
    (default: the ``gqa`` mode's attention kind and "ffn_channel").  ``stats``: input statistics
    already collected (over :func:`stat_modules`; streaming mode), else collected here on ``calib``."""
    if scope not in ("out", "unit"):
        raise WidthError(f"wanda_sp: scope must be 'out' or 'unit', not {scope!r}")
    stat_layers = range(graph.n_layers) if hidden else layers
    mods = projection_modules(model, graph, stat_layers)
    if stats is None:
        with model_state_guard(model) as handles:
            model.eval()
            stats = InputStats(model, stat_modules(model, graph, stat_layers, scope, hidden)).collect(
                calib, batch_size, handles)
    elem = wanda_elements(model, stats)
    kinds = tuple(kinds) if kinds else (attention_kind(graph, gqa), "ffn_channel")
    scores = {}
    for i in layers:
        allowed = set(mods[i]["out"]) if scope == "out" else None
        for k in kinds:
            scores[(k, i)] = aggregate_fn(member_matrix(graph.group(k, i), elem, params=allowed), aggregate)
    if hidden:
        scores[("hidden_channel", None)] = aggregate_fn(member_matrix(graph.group("hidden_channel", None), elem), "sum")
    return scores


def wanda_sp_options(model, graph, target, options: dict) -> dict:
    """Parse and check wanda_sp's options (reach included) before any scoring."""
    alloc, gqa, layers, prune_hidden = width_options(model, graph, options)
    opts = dict(alloc=alloc, gqa=gqa, layers=layers, prune_hidden=prune_hidden, scope=options.pop("scope", "out"),
                aggregate=options.pop("aggregate", "sum"), batch_size=int(options.pop("batch_size", 4)),
                global_score=options.pop("global_score", "density"))
    reject_unknown("wanda_sp", options)
    check_reach(graph, target, gqa, layers, alloc, prune_hidden)
    if opts["scope"] not in ("out", "unit"):
        raise WidthError(f"wanda_sp: scope must be 'out' or 'unit', not {opts['scope']!r}")
    return opts


def wanda_sp_plan(graph, target, scores: dict, opts: dict, calib_shape) -> tuple:
    """Allocate the scored units: (plan, info)."""
    scores = dict(scores)
    hidden_scores = scores.pop(("hidden_channel", None), None)
    plan, info = allocate(graph, scores, target, layers=opts["layers"], hidden_scores=hidden_scores,
                          global_score=opts["global_score"], **opts["alloc"])
    info.update(method="wanda_sp", scope=opts["scope"], aggregate=opts["aggregate"], gqa=opts["gqa"],
                layers=opts["layers"], prune_hidden=opts["prune_hidden"], calibration=list(calib_shape),
                scores=score_summary(scores))
    return plan, info


@register("wanda_sp")
@torch.no_grad()
def wanda_sp(model, graph, target, calib, **options):
    opts = wanda_sp_options(model, graph, target, options)
    scores = wanda_sp_scores(model, graph, calib, opts["layers"], gqa=opts["gqa"], scope=opts["scope"],
                             aggregate=opts["aggregate"], batch_size=opts["batch_size"], hidden=opts["prune_hidden"])
    return wanda_sp_plan(graph, target, scores, opts, calib.shape)
