"""Numbers derived from the criteria: rank correlations between criteria and between data
sources, the cheapest parameters by depth, and the composition of the least important sublayers.
Everything here reads the criteria's JSON results (no model)."""

from __future__ import annotations

import itertools
import math

import numpy as np

from .criteria import LAYER_CRITERIA, WIDTH_CRITERIA, WIDTH_KINDS, sig

SUBLAYERS = ("attention", "ffn")


def _corr(a, b) -> dict:
    from scipy.stats import kendalltau, spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"spearman": None, "kendall": None, "n": int(len(a))}
    rho = spearmanr(a, b).statistic
    tau = kendalltau(a, b).statistic
    return {"spearman": sig(rho, 4), "kendall": sig(tau, 4), "n": int(len(a))}


def vectors(criteria: dict) -> dict:
    """Flat score vectors per (granularity, criterion): blocks, sublayers (attention of every layer,
    then FFN of every layer), and each width kind over all layers."""
    out: dict = {}
    for name, r in criteria.items():
        if "block" in r:
            out.setdefault("block", {})[name] = list(r["block"])
        if name in LAYER_CRITERIA and "attention" in r:
            out.setdefault("sublayer", {})[name] = list(r["attention"]) + list(r["ffn"])
        if name in WIDTH_CRITERIA:
            for kind in WIDTH_KINDS:
                out.setdefault(kind, {})[name] = [x for row in r[kind] for x in row]
    return out


def criteria_correlations(criteria: dict) -> list[dict]:
    """Spearman and Kendall rank correlation of every pair of criteria on the same units."""
    rows = []
    for unit, vecs in vectors(criteria).items():
        for a, b in itertools.combinations(sorted(vecs, key=list(criteria).index), 2):
            rows.append({"units": unit, "a": a, "b": b, **_corr(vecs[a], vecs[b])})
    return rows


def source_correlations(per_source: dict) -> list[dict]:
    """Per criterion and unit kind, the rank correlation between every pair of data sources."""
    names = list(per_source)
    rows = []
    flat = {s: vectors(per_source[s]) for s in names}
    for s1, s2 in itertools.combinations(names, 2):
        for unit, vecs in flat[s1].items():
            for crit, v in vecs.items():
                other = flat[s2].get(unit, {}).get(crit)
                if other is not None:
                    rows.append({"criterion": crit, "units": unit, "a": s1, "b": s2, **_corr(v, other)})
    return rows


def least_important_sublayers(r: dict, n_layers: int, k: int) -> dict:
    """The ``k`` sublayers with the lowest score of a sublayer criterion: which, how many are
    attention, and where in depth."""
    units = [(r[s][i], i, s) for s in SUBLAYERS for i in range(n_layers)]
    low = sorted(units)[:k]
    layers = [i for _, i, _ in low]
    return {"k": k, "units": [{"layer": i, "sublayer": s, "score": v} for v, i, s in low],
            "attention": sum(s == "attention" for _, _, s in low), "ffn": sum(s == "ffn" for _, _, s in low),
            "deeper_half": sum(i >= n_layers / 2 for i in layers),
            "layer_range": [min(layers), max(layers)] if layers else None}


def order_summary(order: list[dict], n_layers: int) -> dict:
    """Composition of a removal order: attention vs FFN vs blocks, and how many in the deeper half."""
    return {"steps": len(order), "attention": sum(o["sublayer"] == "attention" for o in order),
            "ffn": sum(o["sublayer"] == "ffn" for o in order), "block": sum(o["sublayer"] == "block" for o in order),
            "deeper_half": sum(o["layer"] >= n_layers / 2 for o in order),
            "layers": [o["layer"] for o in order]}


def cheapest_by_depth(r: dict, graph_info: dict, criterion: str, share: float = 0.2) -> dict:
    """Rank every attention unit (query heads) and FFN channel of every layer by score per
    parameter (FLAP's standardised scores as they are, since FLAP ranks them globally; OBS
    saliencies divided by the residual norm, ZipLM's error_scale=residual) and count, per layer,
    the fraction of its width parameters that fall in the cheapest ``share`` of all width parameters."""
    n = graph_info["n_layers"]
    head_params, ffn_params = graph_info["query_head_params"], graph_info["ffn_channel_params"]
    vals, params, layers, kinds = [], [], [], []
    for i in range(n):
        scale = r["residual"][i] if criterion == "obs" else 1.0
        for kind, p in (("query_head", head_params), ("ffn_channel", ffn_params)):
            for v in r[kind][i]:
                s = v / scale
                vals.append(s if criterion == "flap" else s / p)
                params.append(p)
                layers.append(i)
                kinds.append(kind)
    vals, params, layers = np.asarray(vals), np.asarray(params, dtype=float), np.asarray(layers)
    order = np.argsort(vals, kind="stable")
    budget = share * params.sum()
    chosen = order[np.cumsum(params[order]) <= budget]
    per_layer_total = np.bincount(layers, weights=params, minlength=n)
    per_layer_cheap = np.bincount(layers[chosen], weights=params[chosen], minlength=n)
    kinds_arr = np.asarray(kinds)
    attn_share = float(params[chosen][kinds_arr[chosen] == "query_head"].sum() / max(params[chosen].sum(), 1))
    frac = per_layer_cheap / np.maximum(per_layer_total, 1)
    return {"share": share, "fraction_per_layer": [sig(x, 4) for x in frac.tolist()],
            "attention_share_of_cheapest": sig(attn_share, 4)}


def ffn_quantiles(r: dict) -> list[list[float]]:
    """Per layer, the 0/25/50/75/100% quantiles of the FFN channel scores."""
    return [[sig(x, 4) for x in np.quantile(np.asarray(row, dtype=float), [0, .25, .5, .75, 1]).tolist()]
            for row in r["ffn_channel"]]


def finite(x) -> bool:
    return x is not None and math.isfinite(x)
