"""Write a study: ``study.json`` (every number), ``figures/*.png``, ``report.md`` (figures linked)
and ``report.html`` (one self-contained file, figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .criteria import DESCRIPTIONS, LAYER_CRITERIA, WIDTH_CRITERIA
from .figures import SHORT, draw_all


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def blocks(study: dict, figs: dict) -> list[tuple]:
    """The report as a list of (kind, ...) blocks: h1/h2/p/ul/table/img."""
    m = study["model"]
    o = study["options"]
    sources = list(study["sources"])
    b: list[tuple] = [("h1", f"Architecture study: {m['name']}")]
    b.append(("p", f"{m['family']} model, {m['params']:,} parameters, {m['n_layers']} layers, hidden {m['hidden']}, "
                   f"{m['heads']} query heads / {m['kv_heads']} KV groups of dimension {m['head_dim']}, FFN width "
                   f"{m['intermediate']}. Calibration: " + "; ".join(
                   f"{study['sources'][s]['label']} {study['sources'][s]['calibration']['samples']} samples x "
                   f"{study['sources'][s]['calibration']['seq_len']} tokens" for s in sources) +
                   f" (seed {o['seed']}). "
                   f"For every criterion, higher means more important."))
    b.append(("h2", "Findings"))
    b.append(("ul", study["findings"]))

    b.append(("h2", "1. Blocks and sublayers"))
    for s in sources:
        crit = study["sources"][s]["criteria"]
        for name in LAYER_CRITERIA:
            if name in o["criteria"] and name in crit:
                f = figs.get(f"layers_{name}/{s}")
                if f:
                    b.append(("img", f[0], f[1]))
        if f"order/{s}" in figs:
            b.append(("img", *figs[f"order/{s}"]))
    for s in sources:
        crit = study["sources"][s]["criteria"]
        layer_names = [c for c in LAYER_CRITERIA if c in crit and c in o["criteria"]]
        if layer_names:
            head = ["layer"] + [h for c in layer_names for h in
                                ([SHORT[c]] if "block" in crit[c] else [f"{SHORT[c]} attn", f"{SHORT[c]} FFN"])]
            rows = []
            for i in range(m["n_layers"]):
                row = [i]
                for c in layer_names:
                    row += [crit[c]["block"][i]] if "block" in crit[c] else [crit[c]["attention"][i], crit[c]["ffn"][i]]
                rows.append(row)
            b.append(("p", f"Scores per layer ({study['sources'][s]['label']}):"))
            b.append(("table", head, rows))
        if "finercut" in crit and "finercut" in o["criteria"]:
            order = crit["finercut"]["order"][:o["steps"]]
            b.append(("p", f"FinerCut greedy removal order ({study['sources'][s]['label']}; JS distance of the pruned "
                           f"model to the dense one after each step):"))
            b.append(("table", ["step", "layer", "sublayer", "JS after the step"],
                      [[x["step"], x["layer"], x["sublayer"], x["score"]] for x in order]))
    for s in sources:
        rows = study["correlations"]["criteria"].get(s, [])
        if rows:
            b.append(("p", f"Rank correlations between criteria on the same units ({study['sources'][s]['label']}):"))
            b.append(("table", ["units", "criterion A", "criterion B", "n", "Spearman", "Kendall"],
                      [[r["units"], r["a"], r["b"], r["n"], r["spearman"], r["kendall"]] for r in rows]))

    width_any = any(c in WIDTH_CRITERIA for c in o["criteria"])
    if width_any:
        b.append(("h2", "2. Heads and channels"))
        for s in sources:
            for name in WIDTH_CRITERIA:
                if f"heads_{name}/{s}" in figs:
                    b.append(("img", *figs[f"heads_{name}/{s}"]))
            for key in ("ffn", "cheapest"):
                if f"{key}/{s}" in figs:
                    b.append(("img", *figs[f"{key}/{s}"]))
            d = study["sources"][s]["derived"]
            names = [c for c in WIDTH_CRITERIA if f"{c}_cheapest" in d]
            if names:
                b.append(("p", f"Share of each layer's head + FFN parameters in the cheapest "
                               f"{d[names[0] + '_cheapest']['share']:.0%} ({study['sources'][s]['label']}):"))
                b.append(("table", ["layer"] + [SHORT[c] for c in names],
                          [[i] + [d[f"{c}_cheapest"]["fraction_per_layer"][i] for c in names]
                           for i in range(m["n_layers"])]))

    if len(sources) > 1:
        b.append(("h2", "3. Data dependence"))
        for key in sorted(k for k in figs if k.startswith("data/")):
            b.append(("img", *figs[key]))
        rows = study["correlations"]["sources"]
        b.append(("table", ["criterion", "units", "source A", "source B", "n", "Spearman", "Kendall"],
                  [[r["criterion"], r["units"], r["a"], r["b"], r["n"], r["spearman"], r["kendall"]] for r in rows]))

    if study.get("curves"):
        c = study["curves"]
        b.append(("h2", "4. Cost curves"))
        b.append(("img", *figs["curves"]))
        b.append(("p", f"Held-out perplexity on {c['heldout']['tokens']} tokens of {c['heldout']['source']} "
                       f"(window {c['heldout']['window']}); dense {c['dense_ppl']:.4g}."))
        b.append(("table", ["method", "target removed", "params kept", "held-out ppl"],
                  [[name, p["removed"], p["kept"], p["ppl"]] for name, r in c["methods"].items() for p in r["points"]]))

    b.append(("h2", "Criteria and settings"))
    rows = []
    for s in sources:
        for name, r in study["sources"][s]["criteria"].items():
            detail = []
            for key in ("samples", "screen_samples", "positions", "scoring_dtype", "target", "damp"):
                if key in r:
                    detail.append(f"{key}={r[key]}")
            rows.append([study["sources"][s]["label"], name, r["method"], DESCRIPTIONS[name], ", ".join(detail),
                         r["seconds"]])
    b.append(("table", ["data", "criterion", "method", "what", "settings", "seconds"], rows))
    b.append(("p", "Every number is in study.json. Made by structlm study; the scores are those of the methods' own "
                   "scorers (structlm/methods)."))
    return b


def to_markdown(b: list[tuple]) -> str:
    out = []
    for block in b:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}\n")
        elif kind == "h2":
            out.append(f"## {block[1]}\n")
        elif kind == "p":
            out.append(f"{block[1]}\n")
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in block[1]) + "\n")
        elif kind == "img":
            out.append(f"![{block[2]}](figures/{block[1]})\n\n*{block[2]}*\n")
        elif kind == "table":
            head, rows = block[1], block[2]
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_fmt(x) for x in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;"
       "padding:2px 6px;text-align:right}th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}"
       "figcaption{font-size:13px;color:#555}")


def to_html(b: list[tuple], figures: Path) -> str:
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>"]
    title = next((x[1] for x in b if x[0] == "h1"), "structlm study")
    out.append(f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>")
    for block in b:
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in block[1]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode((figures / block[1]).read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(block[2])}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block[1]) + "</tr>")
            for row in block[2]:
                out.append("<tr>" + "".join(f"<td>{html.escape(_fmt(x))}</td>" for x in row) + "</tr>")
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def write(study: dict, graph, out: Path) -> dict:
    """Draw the figures and write study.json, report.md and report.html into ``out``."""
    from ..outputs import write_atomic

    folder = out / "figures"
    figs = draw_all(study, graph, folder)
    study["figures"] = {k: f"figures/{v[0]}" for k, v in sorted(figs.items())}
    write_atomic(out / "study.json", (json.dumps(study, indent=1) + "\n").encode())
    b = blocks(study, figs)
    write_atomic(out / "report.md", to_markdown(b).encode())
    write_atomic(out / "report.html", to_html(b, folder).encode())
    return figs
