"""SLEB (Song et al. 2024, "SLEB: Streamlining LLMs through Redundancy Verification and Elimination
of Transformer Blocks"): iterative block removal by calibration perplexity.

With B the blocks removed so far, one step removes

    b* = argmin_{b not in B}  PPL_calib( f_{B + {b}} ),
    PPL_calib(f) = exp( - 1/T sum_t log p_f(x_{t+1} | x_{<=t}) )

(the mean next-token NLL over the calibration tokens, T tokens), then B <- B + {b*}, until the
target is met.  The forward of candidate b starts at block b from cached hidden states of the
current model; each step costs about n/2 body forwards plus n lm_head passes on the scored samples.

Options: ``screen_samples`` / ``confirm_top`` / ``lazy`` as in FinerCut (defaults: all samples,
exhaustive, as in the paper), ``batch_size``, ``dtype`` (default ``"model"``: score the model as
it is; ``"auto"`` / ``"bfloat16"``: a faster bf16 copy, see :func:`._layers.scoring_model`).  Overshoot: a ``params`` target stops at the first
block count that reaches it (never short).
"""

from __future__ import annotations

import math
import time

import torch

from ..models import dtype_name
from . import register, reject_unknown_options
from ._layers import CalibrationNLL, LayerRunner, check_reachable, finish_plan, greedy_remove, scoring_model


@register("sleb")
def sleb(model, graph, target, calib, *, screen_samples: int | None = None, confirm_top: int = 1,
         lazy: bool = False, batch_size: int = 8, dtype: str = "model", progress: bool = True, **unknown):
    """Iteratively remove the block whose removal gives the lowest calibration perplexity."""
    reject_unknown_options("sleb", unknown, sleb)
    started = time.perf_counter()
    scored = scoring_model(model, dtype)
    runner = LayerRunner(scored)
    candidates = [(i, "block") for i in range(graph.n_layers)]
    check_reachable(graph, target, candidates[:-1])
    with torch.inference_mode():
        removed, steps, stats = greedy_remove(
            runner, graph, target, calib, candidates, lambda trace: CalibrationNLL(runner, trace),
            name="sleb", screen_samples=screen_samples, confirm_top=confirm_top, lazy=lazy,
            batch_size=batch_size, progress=progress)
    for s in steps:
        s["calib_ppl"] = round(math.exp(s["score"]), 4)
    order = [{"layer": s["layer"], "sublayer": "block", "score": s["score"]} for s in steps]
    plan = finish_plan(graph, removed, order, target, "sleb")
    info = {"criterion": "calibration NLL per token (log perplexity)",
            "scoring_dtype": dtype_name(scored), "removal_order": order, "steps": steps,
            "cost": stats, "seconds": round(time.perf_counter() - started, 2)}
    return plan, info
