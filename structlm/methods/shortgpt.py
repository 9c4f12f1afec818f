"""ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect"): one-shot block removal by Block Influence,

    BI_i = 1 - E_{x, t} [ cos( x_in_i[t], x_out_i[t] ) ],

the expected cosine similarity between the hidden state entering block i and the one leaving it,
over all calibration tokens t.  The blocks with the lowest BI are removed (one forward pass).

``shortgpt_angular`` scores every attention and FFN sublayer by the angular distance between the
residual stream before and after it,

    A_s = E_{x, t} [ arccos( cos( h_in_s[t], h_out_s[t] ) ) / pi ],

and removes the sublayers with the lowest A_s (one shot).  Both stop at the first count that meets
the target (overshoot by at most one unit, never short).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from . import register, reject_unknown_options
from ._layers import LayerRunner, check_reachable, finish_plan, target_reached


def _one_shot(graph, target, scores: dict, name: str):
    broken = [u for u, v in scores.items() if not math.isfinite(v)]
    if broken:
        raise ValueError(f"{name}: the scores of {len(broken)} unit(s) (first: {broken[0][1]} {broken[0][0]}) are not "
                         f"finite (NaN/Inf): the model's weights or the calibration data are broken; check the model "
                         f"with structlm eval")
    units = sorted(scores, key=lambda u: (scores[u], u))
    check_reachable(graph, target, units if units[0][1] != "block" else units[:-1])
    removed = []
    for u in units:
        if target_reached(graph, target, removed, name):
            break
        removed.append(u)
    order = [{"layer": i, "sublayer": kind, "score": scores[(i, kind)]} for i, kind in removed]
    return finish_plan(graph, removed, order, target, name), order


def _sums(runner, calib, batch_size, fn):
    """Run the dense model over ``calib``; fn(i, h_in, ctx) -> ({unit: score sum}, h_out).
    Returns (per-unit sums, tokens), summed over the ranks under torchrun (each runs its share)."""
    from .. import distributed

    calib = distributed.shard(calib, batch_size)
    sums: dict = {}
    tokens = 0
    for s in range(0, calib.shape[0], batch_size):
        ids = calib[s:s + batch_size]
        h = runner.embed(ids)
        ctx = runner.context(h)
        for i in range(runner.n):
            values, h = fn(i, h, ctx)
            for unit, value in values.items():
                sums[unit] = sums.get(unit, 0.0) + value
        tokens += ids.numel()
    return distributed.reduce_sums(sums, tokens)


def block_step(runner, i, h, ctx):
    """Block ``i`` on ``h``: ({(i, "block"): sum over tokens of 1 - cos(x_in, x_out)}, x_out)."""
    out = runner.layer(i, h, ctx)
    cos = F.cosine_similarity(h.float(), out.float(), dim=-1)
    return {(i, "block"): float((1 - cos).sum())}, out


def _angular(a, b):
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)
    return float((torch.arccos(cos) / math.pi).sum())


def sublayer_step(runner, i, h, ctx):
    """Layer ``i`` on ``h`` in two halves: ({(i, "attention"|"ffn"): angular distance sums}, out)."""
    mid = runner.layer(i, h, ctx, ffn=False)          # h + attention
    out = runner.layer(i, mid, ctx, attention=False)  # mid + FFN: the same as the whole layer
    return {(i, "attention"): _angular(h, mid), (i, "ffn"): _angular(mid, out)}, out


def block_influence(model, calib, *, batch_size: int = 8) -> list[float]:
    """ShortGPT's BI of every block on ``calib`` [N, L]: 1 - mean cos(x_in, x_out) over all tokens."""
    runner = LayerRunner(model)
    with torch.inference_mode():
        sums, tokens = _sums(runner, calib, batch_size, lambda i, h, ctx: block_step(runner, i, h, ctx))
    return [sums[(i, "block")] / tokens for i in range(runner.n)]


def shortgpt_plan(graph, target, bi: list[float], seconds: float):
    """The blocks with the lowest BI, removed until ``target``: (plan, info)."""
    scores = {(i, "block"): v for i, v in enumerate(bi)}
    plan, order = _one_shot(graph, target, scores, "shortgpt")
    info = {"score": "BI = 1 - mean cos(x_in, x_out) over calibration tokens",
            "block_influence": [scores[(i, "block")] for i in range(graph.n_layers)],
            "removal_order": order, "forwards": 1, "seconds": round(seconds, 2)}
    return plan, info


@register("shortgpt")
def shortgpt(model, graph, target, calib, *, batch_size: int = 8, **unknown):
    """Remove the blocks with the lowest Block Influence (one shot)."""
    reject_unknown_options("shortgpt", unknown, shortgpt)
    started = time.perf_counter()
    bi = block_influence(model, calib, batch_size=batch_size)
    return shortgpt_plan(graph, target, bi, time.perf_counter() - started)


def angular_distances(model, calib, *, batch_size: int = 8) -> dict:
    """ShortGPT's angular distance of every sublayer on ``calib`` [N, L]: mean arccos(cos(h_in, h_out))/pi
    over all tokens -> {"attention": [per layer], "ffn": [per layer]}."""
    runner = LayerRunner(model)
    with torch.inference_mode():
        sums, tokens = _sums(runner, calib, batch_size, lambda i, h, ctx: sublayer_step(runner, i, h, ctx))
    return {kind: [sums[(i, kind)] / tokens for i in range(runner.n)] for kind in ("attention", "ffn")}


@register("shortgpt_angular")
def shortgpt_angular(model, graph, target, calib, *, batch_size: int = 8, **unknown):
    """Remove the attention/FFN sublayers with the lowest angular distance input -> output (one shot)."""
    reject_unknown_options("shortgpt_angular", unknown, shortgpt_angular)
    started = time.perf_counter()
    angular = angular_distances(model, calib, batch_size=batch_size)
    return shortgpt_angular_plan(graph, target, angular, time.perf_counter() - started)


def shortgpt_angular_plan(graph, target, angular: dict, seconds: float):
    """The sublayers with the lowest angular distance, removed until ``target``: (plan, info)."""
    scores = {(i, kind): angular[kind][i] for i in range(graph.n_layers) for kind in ("attention", "ffn")}
    plan, order = _one_shot(graph, target, scores, "shortgpt_angular")
    info = {"score": "mean arccos(cos(h_in, h_out))/pi per sublayer over calibration tokens",
            "angular": {"attention": [scores[(i, "attention")] for i in range(graph.n_layers)],
                        "ffn": [scores[(i, "ffn")] for i in range(graph.n_layers)]},
            "removal_order": order, "forwards": 1, "seconds": round(seconds, 2)}
    return plan, info
