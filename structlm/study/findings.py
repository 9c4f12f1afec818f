"""Short factual sentences read from a study's numbers (no prose that the numbers do not carry)."""

from __future__ import annotations

from .figures import SHORT


def _layers(ls) -> str:
    ls = sorted(set(ls))
    if not ls:
        return "none"
    runs, start, prev = [], ls[0], ls[0]
    for x in ls[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(runs)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def generate(study: dict) -> list[str]:
    m = study["model"]
    n = m["n_layers"]
    half = (n + 1) // 2
    out: list[str] = []
    multi = len(study["sources"]) > 1
    for source, s in study["sources"].items():
        d, crit = s["derived"], s["criteria"]
        where = f" ({s['label']})" if multi else ""
        for name in ("finercut", "angular"):
            low = d.get(f"{name}_least_important")
            if low:
                layers = [u["layer"] for u in low["units"]]
                out.append(f"{SHORT[name]}{where}: the {low['k']} least important sublayers are "
                           f"{low['attention']} attention, {low['ffn']} FFN; {low['deeper_half']} of them in the "
                           f"deeper half (layers {half}-{n - 1}); layers {_layers(layers)}.")
        fo = d.get("finercut_order")
        if fo and fo["steps"]:
            out.append(f"FinerCut's greedy order{where}: of the first {fo['steps']} removals, {fo['attention']} are "
                       f"attention and {fo['ffn']} FFN sublayers, {fo['deeper_half']} in the deeper half; "
                       f"in order: " + ", ".join(f"{o['layer']}{'a' if o['sublayer'] == 'attention' else 'f'}"
                                                   for o in crit['finercut']['order'][:fo['steps']]) + ".")
        for name in ("bi", "sleb"):
            low = d.get(f"{name}_least_important")
            if low:
                out.append(f"{SHORT[name]}{where}: the {low['k']} least important blocks are "
                           f"{_layers(low['blocks'])}.")
        if "bi_least_important" in d and "sleb_least_important" in d:
            a, b = set(d["bi_least_important"]["blocks"]), set(d["sleb_least_important"]["blocks"])
            out.append(f"ShortGPT BI and SLEB{where} share {len(a & b)} of their {len(a)} least important blocks.")
        if "sleb" in crit:
            blocks = crit["sleb"]["block"]
            worst = max(range(n), key=lambda i: blocks[i])
            out.append(f"SLEB{where}: removing block {worst} raises the calibration perplexity most "
                       f"({crit['sleb']['dense_ppl']:.4g} -> {crit['sleb']['dense_ppl'] + blocks[worst]:.4g}).")
        for name in ("taylor", "wanda", "flap", "obs"):
            c = d.get(f"{name}_cheapest")
            if c:
                frac = c["fraction_per_layer"]
                top = sorted(range(n), key=lambda i: (-frac[i], i))[:3]
                out.append(f"{SHORT[name]}{where}: the cheapest {c['share']:.0%} of width parameters are "
                           f"{c['attention_share_of_cheapest']:.0%} attention heads; the layers giving most of "
                           f"themselves to it are " + ", ".join(f"{i} ({frac[i]:.0%})" for i in top) + ".")
        rows = [r for r in study["correlations"]["criteria"].get(source, []) if r["spearman"] is not None]
        if rows:
            hi = max(rows, key=lambda r: r["spearman"])
            lo = min(rows, key=lambda r: r["spearman"])
            out.append(f"Criteria agreement{where}: highest Spearman {hi['spearman']:.2f} ({hi['a']} vs {hi['b']}, "
                       f"{hi['units']}), lowest {lo['spearman']:.2f} ({lo['a']} vs {lo['b']}, {lo['units']}).")
    rows = [r for r in study["correlations"]["sources"] if r["spearman"] is not None]
    if rows:
        lo = min(rows, key=lambda r: r["spearman"])
        hi = max(rows, key=lambda r: r["spearman"])
        out.append(f"Data dependence: across sources, the least stable criterion is {lo['criterion']} on "
                   f"{lo['units']} units (Spearman {lo['spearman']:.2f}), the most stable {hi['criterion']} on "
                   f"{hi['units']} (Spearman {hi['spearman']:.2f}).")
    c = study.get("curves")
    if c:
        for name, r in c["methods"].items():
            if r["points"]:
                p = r["points"][-1]
                out.append(f"Cost curve {name}: {100 * (1 - p['kept']):.1f}% of the parameters removed gives held-out "
                           f"perplexity {p['ppl']:.4g} (dense {c['dense_ppl']:.4g}).")
            else:
                out.append(f"Cost curve {name}: no point reached (the removal order is too short).")
    return out


def finercut_verdict(study: dict, source: str | None = None) -> dict | None:
    """Whether FinerCut's finding (attention sublayers of deep layers go first) holds: the
    fraction of attention and of deeper-half layers among its first greedy removals."""
    source = source or next(iter(study["sources"]))
    fo = study["sources"][source]["derived"].get("finercut_order")
    if not fo or not fo["steps"]:
        return None
    return {"steps": fo["steps"], "attention_fraction": fo["attention"] / fo["steps"],
            "deeper_half_fraction": fo["deeper_half"] / fo["steps"]}
