"""The study's figures (matplotlib, Agg backend), each a PNG with labelled axes, a colour bar
where colour carries a number, and a title naming the model, the criterion and the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .criteria import DESCRIPTIONS, LAYER_CRITERIA, WIDTH_CRITERIA

SHORT = {"bi": "ShortGPT BI", "angular": "angular distance", "sleb": "SLEB ppl increase",
         "finercut": "FinerCut JS (one at a time)", "taylor": "Taylor (LLM-Pruner)", "wanda": "Wanda-SP",
         "flap": "FLAP (standardised)", "obs": "OBS saliency (ZipLM)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "figure.dpi": 110})
    return plt


def _norm(values, signed: bool):
    """A log colour scale for positive values spanning more than 100x, else linear."""
    from matplotlib.colors import LogNorm, Normalize

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not signed and v.size and v.min() > 0 and v.max() / v.min() > 100:
        return LogNorm(vmin=v.min(), vmax=v.max()), " (log scale)"
    return Normalize(vmin=v.min() if v.size else 0, vmax=v.max() if v.size else 1), ""


def _save(fig, path: Path) -> str:
    fig.savefig(path, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def layer_criterion(study: dict, source: str, name: str, folder: Path) -> tuple[str, str]:
    """Layers x {attention, FFN} (or x {block}) heatmap of one layer criterion, the lowest k marked."""
    plt = _plt()
    r = study["sources"][source]["criteria"][name]
    n = study["model"]["n_layers"]
    rows = ["block"] if "block" in r else ["attention", "ffn"]
    grid = np.array([r[k] for k in rows], dtype=float)
    norm, scale = _norm(grid, signed=bool((grid < 0).any()))
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * n + 2), 1.1 + 0.55 * len(rows)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm)
    k = min(8, max(1, n // 2))
    low = np.argsort(grid, axis=None, kind="stable")[:k]
    for j, flat in enumerate(low):
        y, x = divmod(int(flat), n)
        ax.text(x, y, str(j + 1), ha="center", va="center", color="white", fontsize=7, fontweight="bold")
    ax.set_yticks(range(len(rows)), [{"ffn": "FFN"}.get(x, x) for x in rows])
    ax.set_xticks(range(0, n, max(1, n // 15)))
    ax.set_xlabel("layer")
    ax.set_title(f"{study['model']['name']}: {SHORT[name]} ({study['sources'][source]['label']}); "
                 f"numbers: the {k} least important")
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    cb.set_label(f"importance{scale}")
    return _save(fig, folder / f"layers_{name}_{_tag(study, source)}.png"), \
        f"{DESCRIPTIONS[name]} ({study['sources'][source]['label']}); the {k} least important units numbered from the least."


def removal_order(study: dict, source: str, graph, folder: Path) -> tuple[str, str]:
    from ..figures import plot_removed
    from ..methods._layers import plan_from_removed

    order = study["sources"][source]["criteria"]["finercut"]["order"][:study["options"]["steps"]]
    plan = plan_from_removed(graph, [(o["layer"], o["sublayer"]) for o in order])
    plan.meta["removal_order"] = order
    path = folder / f"finercut_order_{_tag(study, source)}.png"
    plot_removed(plan, graph, path)
    return path.name, (f"FinerCut's greedy removal order, first {len(order)} steps "
                       f"({study['sources'][source]['label']}): filled cells are removed, numbered in order.")


def heads(study: dict, source: str, name: str, folder: Path) -> tuple[str, str]:
    plt = _plt()
    r = study["sources"][source]["criteria"][name]
    m = study["model"]
    q, kv = np.array(r["query_head"], dtype=float).T, np.array(r["kv_group"], dtype=float).T
    signed = name == "flap"
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 0.3 * m["n_layers"] * 1.6 + 3), 2.4 + 0.15 * m["heads"]),
                             gridspec_kw={"width_ratios": [1, 1]})
    for ax, grid, what in ((axes[0], q, "query head"), (axes[1], kv, "KV group")):
        norm, scale = _norm(grid, signed)
        im = ax.imshow(grid, aspect="auto", cmap="RdBu_r" if signed else "magma", norm=norm, origin="lower")
        ax.set_xlabel("layer")
        ax.set_ylabel(what)
        ax.set_yticks(range(grid.shape[0]))
        ax.set_xticks(range(0, m["n_layers"], max(1, m["n_layers"] // 10)))
        ax.set_title(f"per {what}")
        cb = fig.colorbar(im, ax=ax, pad=0.01)
        cb.set_label(f"importance{scale}")
    fig.suptitle(f"{m['name']}: {SHORT[name]} per head ({study['sources'][source]['label']})")
    fig.tight_layout()
    return _save(fig, folder / f"heads_{name}_{_tag(study, source)}.png"), \
        f"{DESCRIPTIONS[name]} ({study['sources'][source]['label']}), per layer and query head (left) / KV group (right)."


def ffn_distribution(study: dict, source: str, names: list[str], folder: Path) -> tuple[str, str]:
    plt = _plt()
    m = study["model"]
    fig, axes = plt.subplots(len(names), 1, figsize=(max(7, 0.3 * m["n_layers"] + 2), 2.0 * len(names)),
                             squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        rows = [np.asarray(x, dtype=float) for x in study["sources"][source]["criteria"][name]["ffn_channel"]]
        positive = all((x > 0).all() for x in rows)
        ax.boxplot(rows, positions=range(m["n_layers"]), widths=0.6, showfliers=False, whis=(1, 99))
        if positive:
            ax.set_yscale("log")
        ax.set_ylabel(f"{SHORT[name]}{' (log)' if positive else ''}")
        ax.set_xticks(range(0, m["n_layers"], max(1, m["n_layers"] // 15)),
                      [str(i) for i in range(0, m["n_layers"], max(1, m["n_layers"] // 15))])
    axes[-1, 0].set_xlabel("layer")
    fig.suptitle(f"{m['name']}: FFN channel importance per layer ({study['sources'][source]['label']}; "
                 f"boxes 25-75%, whiskers 1-99%)")
    fig.tight_layout()
    return _save(fig, folder / f"ffn_channels_{_tag(study, source)}.png"), \
        f"Distribution of FFN channel importance in every layer, one panel per criterion ({study['sources'][source]['label']})."


def cheapest(study: dict, source: str, names: list[str], folder: Path) -> tuple[str, str]:
    plt = _plt()
    m = study["model"]
    d = study["sources"][source]["derived"]
    fig, ax = plt.subplots(figsize=(7, 3))
    share = None
    for name in names:
        c = d[f"{name}_cheapest"]
        share = c["share"]
        ax.plot(range(m["n_layers"]), c["fraction_per_layer"], marker="o", ms=3, label=SHORT[name])
    ax.set_xlabel("layer")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("fraction of the layer's\nhead + FFN parameters")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"{m['name']}: where the cheapest {share:.0%} of width parameters are "
                 f"({study['sources'][source]['label']})")
    return _save(fig, folder / f"cheapest_{_tag(study, source)}.png"), \
        (f"Per layer, the share of its query-head and FFN-channel parameters that fall in the cheapest {share:.0%} "
         f"of all of them, ranked by importance per parameter (FLAP: its standardised score; OBS: divided by the "
         f"residual norm).")


def data_dependence(study: dict, folder: Path) -> list[tuple[str, str]]:
    plt = _plt()
    m = study["model"]
    sources = list(study["sources"])
    names = [c for c in LAYER_CRITERIA if all(c in study["sources"][s]["criteria"] for s in sources)]
    from matplotlib.ticker import MaxNLocator

    figs = []
    if names:
        fig, axes = plt.subplots(len(names), 1, figsize=(7.5, 2.1 * len(names)), squeeze=False)
        for ax, name in zip(axes[:, 0], names):
            for j, s in enumerate(sources):
                r = study["sources"][s]["criteria"][name]
                for kind, style in (("block", "-"), ("attention", "-"), ("ffn", "--")):
                    if kind in r:
                        ax.plot(range(m["n_layers"]), r[kind], style, color=f"C{j}", marker="o", ms=2.5,
                                label=f"{study['sources'][s]['label']}" + ("" if kind == "block" else f" {kind}"))
            ax.set_ylabel(SHORT[name])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if all(min(study["sources"][s]["criteria"][name].get(k, [1])) > 0 for s in sources
                   for k in ("block", "attention", "ffn") if k in study["sources"][s]["criteria"][name]):
                ax.set_yscale("log")
            ax.legend(fontsize=6, ncol=2)
        axes[-1, 0].set_xlabel("layer")
        fig.suptitle(f"{m['name']}: layer criteria per data source")
        fig.tight_layout()
        figs.append((_save(fig, folder / "data_layers.png"),
                     "Each layer criterion on every data source (solid: block or attention, dashed: FFN)."))
    rows = [r for r in study["correlations"]["sources"] if r["spearman"] is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(rows) + 1.2))
        labels = [f"{r['criterion']} / {r['units']}" + ("" if len(sources) == 2 else f" ({r['a']} vs {r['b']})")
                  for r in rows]
        y = np.arange(len(rows))
        ax.barh(y - 0.2, [r["spearman"] for r in rows], height=0.4, color="tab:blue", label="Spearman")
        ax.barh(y + 0.2, [r["kendall"] for r in rows], height=0.4, color="tab:orange", label="Kendall")
        ax.set_yticks(y, labels, fontsize=7)
        low = min(min(r["kendall"] for r in rows), min(r["spearman"] for r in rows))
        ax.set_xlim(min(0, low - 0.05), 1)
        ax.axvline(0, color="black", lw=0.5)
        ax.set_xlabel("rank correlation between data sources")
        ax.axvline(1, color="grey", lw=0.5)
        # outside the axes: the bars can fill either end of the plot
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title(f"{m['name']}: agreement of each criterion across "
                     f"{' / '.join(study['sources'][s]['label'] for s in sources)}")
        figs.append((_save(fig, folder / "data_agreement.png"),
                     "Rank correlation of each criterion's scores between the data sources (1: same ranking)."))
    return figs


def curves(study: dict, folder: Path) -> tuple[str, str]:
    plt = _plt()
    c = study["curves"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, r in c["methods"].items():
        pts = r["points"]
        ax.plot([100 * (1 - p["kept"]) for p in pts], [p["ppl"] for p in pts], marker="o", label=name)
    ax.axhline(c["dense_ppl"], color="grey", ls=":", label=f"dense ({c['dense_ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.legend(fontsize=7)
    h = c["heldout"]
    ax.set_title(f"{study['model']['name']}: cost curves ({h['tokens']} held-out tokens, window {h['window']})")
    return _save(fig, folder / "cost_curves.png"), \
        "Held-out perplexity against the fraction of parameters removed, per method."


def _tag(study: dict, source: str) -> str:
    from .run import slug

    return slug(source)


def draw_all(study: dict, graph, folder: Path) -> dict:
    """Every figure of the study -> {key: (file name, caption)}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for source in study["sources"]:
        crit = study["sources"][source]["criteria"]
        names = [c for c in study["options"]["criteria"] if c in crit]
        for name in names:
            if name in LAYER_CRITERIA:
                out[f"layers_{name}/{source}"] = layer_criterion(study, source, name, folder)
        if "finercut" in names:
            out[f"order/{source}"] = removal_order(study, source, graph, folder)
        width = [c for c in names if c in WIDTH_CRITERIA]
        for name in width:
            out[f"heads_{name}/{source}"] = heads(study, source, name, folder)
        if width:
            out[f"ffn/{source}"] = ffn_distribution(study, source, width, folder)
            out[f"cheapest/{source}"] = cheapest(study, source, width, folder)
    if len(study["sources"]) > 1:
        for j, fig in enumerate(data_dependence(study, folder)):
            out[f"data/{j}"] = fig
    if study.get("curves"):
        out["curves"] = curves(study, folder)
    return out
