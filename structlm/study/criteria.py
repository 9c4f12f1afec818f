"""The study's criteria: each one calls a pruning method's own scorer on one calibration set and
returns its numbers as JSON-able lists (no formula is implemented here a second time).

Block and sublayer criteria (one value per block, or per attention / FFN sublayer):

* ``bi``: ShortGPT's Block Influence (:func:`structlm.methods.shortgpt.block_influence`);
* ``angular``: ShortGPT's angular distance per sublayer (:func:`~structlm.methods.shortgpt.angular_distances`);
* ``sleb``: SLEB's calibration perplexity with one block removed, from the first step of
  :func:`structlm.methods.sleb.sleb` (every block scored), and its increase over the dense model's;
* ``finercut``: FinerCut's one-at-a-time output distance (JS) of every sublayer (the first step of
  :func:`structlm.methods.finercut.finercut`, where every candidate is scored) and its greedy
  removal order for the first K steps.

Width criteria (one value per query head, KV group and FFN channel of every layer):

* ``taylor``: LLM-Pruner's first-order Taylor importance (:func:`structlm.methods.llm_pruner.taylor_scores`);
* ``wanda``: Wanda-SP's ``|W| * ||X||`` (:func:`structlm.methods.wanda_sp.wanda_sp_scores`);
* ``flap``: FLAP's standardised fluctuation metric (:func:`structlm.methods.flap.flap_scores`);
* ``obs``: ZipLM's OBS saliency of each structure alone on the dense model
  (:meth:`structlm.obs.OBSPath.saliency` on the dampened Gram matrix of the o_proj / down_proj
  input, as :func:`structlm.methods.ziplm.build_levels` builds it), with the mean squared norm of
  the residual stream entering each layer (ZipLM's ``error_scale=residual``).

For every criterion a higher value means "more important" (removing it costs more).
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

LAYER_CRITERIA = ("bi", "angular", "sleb", "finercut")
WIDTH_CRITERIA = ("taylor", "wanda", "flap", "obs")
CRITERIA = LAYER_CRITERIA + WIDTH_CRITERIA
WIDTH_KINDS = ("query_head", "kv_group", "ffn_channel")

DESCRIPTIONS = {
    "bi": "ShortGPT Block Influence, 1 - mean cos(x_in, x_out) per block",
    "angular": "ShortGPT angular distance, mean arccos(cos(h_in, h_out))/pi per sublayer",
    "sleb": "SLEB: increase of calibration perplexity when one block is removed",
    "finercut": "FinerCut: Jensen-Shannon divergence of the next-token distributions when one sublayer is removed",
    "taylor": "LLM-Pruner first-order Taylor importance |w * dL/dw| summed over a unit",
    "wanda": "Wanda-SP |W| * ||X|| over the unit's o_proj / down_proj columns",
    "flap": "FLAP WIFV fluctuation metric, standardised per layer",
    "obs": "ZipLM OBS saliency of removing the unit alone (squared output error per token)",
}
METHOD_OF = {"bi": "shortgpt", "angular": "shortgpt_angular", "sleb": "sleb", "finercut": "finercut",
             "taylor": "llm_pruner", "wanda": "wanda_sp", "flap": "flap", "obs": "ziplm"}


class StudyError(ValueError):
    """Options of a study that cannot be used."""


def parse_criteria(spec) -> list[str]:
    """"all", "layers", "width" or a comma-separated list of criteria -> the list, in canonical order."""
    if spec is None or spec == "all":
        return list(CRITERIA)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen = set()
    for item in (str(x).strip().lower() for x in items):
        if not item:
            continue
        if item == "all":
            chosen |= set(CRITERIA)
        elif item == "layers":
            chosen |= set(LAYER_CRITERIA)
        elif item == "width":
            chosen |= set(WIDTH_CRITERIA)
        elif item in CRITERIA:
            chosen.add(item)
        else:
            raise StudyError(f"unknown criterion {item!r}; choose from {', '.join(CRITERIA)} (or all, layers, width)")
    if not chosen:
        raise StudyError(f"--criteria is empty; choose from {', '.join(CRITERIA)}")
    return [c for c in CRITERIA if c in chosen]


def sig(x: float, digits: int = 7) -> float:
    """``x`` to ``digits`` significant digits (JSON stays short and resumes compare exactly)."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def _list(v, digits: int = 7) -> list[float]:
    return [sig(x, digits) for x in torch.as_tensor(v, dtype=torch.float64).flatten().tolist()]


# ---- block and sublayer criteria ------------------------------------------------------------------

def score_bi(model, graph, calib, opts) -> dict:
    from ..methods.shortgpt import block_influence

    return {"block": _list(block_influence(model, calib, batch_size=opts["batch_size"]))}


def score_angular(model, graph, calib, opts) -> dict:
    from ..methods.shortgpt import angular_distances

    a = angular_distances(model, calib, batch_size=opts["batch_size"])
    return {"attention": _list(a["attention"]), "ffn": _list(a["ffn"])}


def _candidate_scores(step: dict, n: int, kinds) -> dict:
    scores = step["candidate_scores"]
    return {kind: [scores[f"{i}.{kind}"] for i in range(n)] for kind in kinds}


def score_sleb(model, graph, calib, opts) -> dict:
    """One step of SLEB: every block is scored (log perplexity of the calibration data without it)."""
    from ..methods._layers import CalibrationNLL, LayerRunner, Trace, score_current
    from ..methods.sleb import sleb
    from ..targets import Target

    n_samples = min(int(opts["sleb_samples"] or calib.shape[0]), calib.shape[0])
    _, info = sleb(model, graph, Target("blocks", 1), calib, screen_samples=n_samples, batch_size=opts["batch_size"],
                   progress=opts["progress"])
    nll = _candidate_scores(info["steps"][0], graph.n_layers, ("block",))["block"]
    with torch.inference_mode():
        runner = LayerRunner(model)
        trace = Trace(runner, calib[:n_samples], opts["batch_size"])
        dense = score_current(trace, CalibrationNLL(runner, trace))
    dense_ppl = math.exp(dense)
    return {"block": [sig(math.exp(v) - dense_ppl) for v in nll], "removed_nll": nll,
            "dense_nll": sig(dense), "dense_ppl": sig(dense_ppl), "samples": n_samples}


def score_finercut(model, graph, calib, opts) -> dict:
    """FinerCut's greedy search for K steps (or to the curves' deepest target): step 1 scores
    every sublayer alone (the one-at-a-time distances), the steps give the removal order."""
    from ..methods.finercut import finercut
    from ..targets import Target

    target = Target("params", opts["finercut_params"]) if opts.get("finercut_params") else \
        Target("sublayers", min(int(opts["steps"]), 2 * graph.n_layers - 1))
    _, info = finercut(model, graph, target, calib, progress=opts["progress"])
    one = _candidate_scores(info["steps"][0], graph.n_layers, ("attention", "ffn"))
    order = [{"step": s["step"], "layer": s["layer"], "sublayer": s["sublayer"], "score": sig(s["score"])}
             for s in info["steps"]]
    return {"attention": one["attention"], "ffn": one["ffn"], "order": order, "target": str(target),
            "distance": info["distance"], "scoring_dtype": info["scoring_dtype"], "positions": info["positions"],
            "screen_samples": info["cost"]["screen_samples"]}


# ---- width criteria ---------------------------------------------------------------------------------

def _width_result(graph, scores: dict) -> dict:
    out = {}
    for kind in WIDTH_KINDS:
        out[kind] = [_list(scores[(kind, i)], 6) for i in range(graph.n_layers)]
    return out


def score_taylor(model, graph, calib, opts) -> dict:
    from ..methods._width import model_state_guard
    from ..methods.llm_pruner import taylor_scores

    samples = calib[:opts["taylor_samples"]] if opts["taylor_samples"] else calib
    with model_state_guard(model) as handles:
        model.eval()
        # a study attributes a KV group's score to the query heads that attend with it (grouped),
        # not LLM-Pruner's strided fold (llm_pruner's default, chosen to match the official code)
        scores, loss = taylor_scores(model, graph, samples, list(range(graph.n_layers)), kinds=WIDTH_KINDS,
                                     handles=handles, kv_fold="grouped")
    out = _width_result(graph, scores)
    out.update(samples=int(samples.shape[0]), calibration_loss=sig(loss["loss"]))
    return out


def score_wanda(model, graph, calib, opts) -> dict:
    from ..methods.wanda_sp import wanda_sp_scores

    with torch.no_grad():
        scores = wanda_sp_scores(model, graph, calib, list(range(graph.n_layers)), kinds=WIDTH_KINDS)
    return _width_result(graph, scores)


def score_flap(model, graph, calib, opts) -> dict:
    from ..methods.flap import flap_scores

    with torch.no_grad():
        scores, _, _ = flap_scores(model, graph, calib, list(range(graph.n_layers)), kinds=("query_head", "kv_group"))
    return _width_result(graph, scores)


def score_obs(model, graph, calib, opts) -> dict:
    """Per layer, on the dense inputs: OBS saliency of each query head, each KV group (with its
    query heads) and each FFN channel removed alone."""
    from ..calibration import Sequential
    from ..methods.ziplm import _projections, _weight
    from ..obs import OBSPath, dampen

    damp, hd, per_group = opts["damp"], graph.head_dim, graph.n_heads // graph.n_kv

    def cols(heads):
        return [h * hd + d for h in heads for d in range(hd)]

    out = {kind: [] for kind in WIDTH_KINDS}
    residual = []
    with torch.no_grad():
        seq = Sequential(model, calib, batch_size=opts["batch_size"])
        for i in tqdm(range(graph.n_layers), desc="obs saliency", unit="layer", disable=not opts["progress"],
                      leave=False):
            o, down = _projections(model, i)
            names = [o.weight.rpartition(".")[0], down.weight.rpartition(".")[0]]
            residual.append(sig(float(sum(h.double().square().sum() for h in seq.hidden)
                                      / sum(h.shape[0] * h.shape[1] for h in seq.hidden))))
            stats = seq.collect(i, names, advance=True)
            for name in names:
                stats[name].check_finite(name)
            path = OBSPath(_weight(model, o), dampen(stats[names[0]].matrix(), damp))
            out["query_head"].append([sig(path.saliency(cols([h])), 6) for h in range(graph.n_heads)])
            out["kv_group"].append([sig(path.saliency(cols(range(g * per_group, (g + 1) * per_group))), 6)
                                    for g in range(graph.n_kv)])
            ffn = OBSPath(_weight(model, down), dampen(stats[names[1]].matrix(), damp))
            out["ffn_channel"].append(_list(ffn.column_saliencies(), 6))
    out.update(residual=residual, damp=damp)
    return out


SCORERS = {"bi": score_bi, "angular": score_angular, "sleb": score_sleb, "finercut": score_finercut,
           "taylor": score_taylor, "wanda": score_wanda, "flap": score_flap, "obs": score_obs}


def compute(name: str, model, graph, calib, opts) -> dict:
    """Run criterion ``name``; the result carries its unit kind, method, description and seconds."""
    started = time.perf_counter()
    result = SCORERS[name](model, graph, calib, opts)
    result.update(method=METHOD_OF[name], description=DESCRIPTIONS[name],
                  granularity="block" if name in ("bi", "sleb") else "sublayer" if name in LAYER_CRITERIA else "width",
                  seconds=round(time.perf_counter() - started, 1))
    return result


def options_for(name: str, opts: dict) -> dict:
    """The options that change criterion ``name``'s numbers (part of its cache key)."""
    keys = {"bi": ("batch_size",), "angular": ("batch_size",), "sleb": ("sleb_samples", "batch_size"),
            "finercut": ("steps", "finercut_params"), "taylor": ("taylor_samples",), "wanda": (), "flap": (),
            "obs": ("damp", "batch_size")}[name]
    return {k: opts.get(k) for k in keys}
