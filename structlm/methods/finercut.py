"""FinerCut (Zhang et al. 2024, "FinerCut: Finer-grained Interpretable Layer Pruning for Large
Language Models"): greedy removal of attention and FFN sublayers.

Every attention and FFN sublayer is a candidate.  With the dense model f and the current pruned
model f_S (S = sublayers removed so far), one step removes

    c* = argmin_{c not in S}  E_x [ d( f(x), f_{S + {c}}(x) ) ]

over calibration sequences x, then S <- S + {c*}, until the target is met.  d compares the final
outputs; the paper's main experiments (and the reference code's Llama-3 / Mixtral configs) use the
Jensen-Shannon divergence of the next-token distributions, averaged over tokens:

    JS(P, Q) = 1/2 KL(P || M) + 1/2 KL(Q || M),   M = (P + Q) / 2.

Selectable with ``distance=``: ``js`` (default), ``kl`` (KL(P_dense || P_pruned)), ``norm``
(Frobenius norm of the logit difference per sample) and ``angular`` (arccos(cos)/pi between the
final normed hidden states: no lm_head, the cheapest).

Speed (docs/layer-methods.md has the measurements).  The hidden states entering every layer of the
current model are cached, so a candidate in layer l runs only layers l..n-1 (plus the lm_head at
``positions`` positions per sample for the logit distances); after a removal only the layers from
the removed one on are recomputed.  One exhaustive step over C candidates costs about
sum_c (n - l_c) / n ~= C/2 body forwards on the scored samples.  Three options cut that:

* ``dtype`` (default ``"auto"``): scores are computed on a bfloat16 copy when the model is float32
  and bf16 matmuls are fast (GPU, AVX512-BF16/AMX CPU): 1.7x faster on 2 CPU cores, same ranking
  (``"model"`` scores the model as it is; ``"float32"``/``"bfloat16"`` force a dtype);
* ``screen_samples`` (default 8): candidates are scored on the first k calibration samples;
* ``confirm_top`` (default 1): re-score the best few screened candidates on all samples and remove
  the best of them (costs confirm_top/2 forwards on all samples per step, plus keeping a second
  cache up to date);
* ``lazy`` (default True): candidates are re-scored in the order of their previous score and a step
  stops once the best fresh score is <= all remaining previous scores (exact when removing more
  sublayers never brings a candidate's output closer to the dense one, which held on SmolLM2:
  see the docs).  ``lazy=False, screen_samples=None`` is the paper's exhaustive search.

Overshoot: with ``params=x`` the search stops at the first step whose plan keeps <= x of the
parameters, so it removes at most one sublayer more than needed and never stops short.
"""

from __future__ import annotations

import time

import torch

from ..models import dtype_name
from . import register, reject_unknown_options
from ._layers import (SUBLAYERS, LayerRunner, OutputDistance, check_reachable, finish_plan, greedy_remove,
                      scoring_model)


@register("finercut")
def finercut(model, graph, target, calib, *, distance: str = "js", screen_samples: int | None = 8,
             confirm_top: int = 1, lazy: bool = True, positions: int | None = 64, batch_size: int = 8,
             dtype: str = "auto", progress: bool = True, **unknown):
    """Greedy sublayer removal by output distance to the dense model (see the module docstring)."""
    reject_unknown_options("finercut", unknown, finercut)
    started = time.perf_counter()
    scored = scoring_model(model, dtype)
    runner = LayerRunner(scored)
    candidates = [(i, kind) for i in range(graph.n_layers) for kind in SUBLAYERS]
    check_reachable(graph, target, candidates)
    with torch.inference_mode():
        removed, steps, stats = greedy_remove(
            runner, graph, target, calib, candidates,
            lambda trace: OutputDistance(runner, trace, distance, positions),
            name="finercut", screen_samples=screen_samples, confirm_top=confirm_top, lazy=lazy,
            batch_size=batch_size, progress=progress)
    order = [{"layer": s["layer"], "sublayer": s["sublayer"], "score": s["score"]} for s in steps]
    plan = finish_plan(graph, removed, order, target, "finercut")
    plan.meta["distance"] = distance
    info = {"distance": distance, "scoring_dtype": dtype_name(scored), "positions": positions,
            "removal_order": order, "steps": steps,
            "cost": stats, "seconds": round(time.perf_counter() - started, 2),
            "per_step_cost_model": "exhaustive step: sum over candidates of (n - layer)/n forwards on the "
                                   "screened samples; lazy steps score only the candidates whose previous "
                                   "score is below the best fresh one"}
    return plan, info
