"""Figures drawn from a plan alone (matplotlib, Agg backend).

``plot_removed(plan, graph, path)``: a layers x {attention, FFN} grid in the style of FinerCut's
interpretability figures; removed sublayers are filled and numbered in the order of removal
(``plan.meta["removal_order"]``: [{"layer", "sublayer", "score"}], sublayer "attention" | "ffn" |
"block"); a plan without an order is drawn unnumbered.
"""

from __future__ import annotations

from pathlib import Path

ROWS = ("attention", "ffn")
LABELS = {"attention": "attention", "ffn": "FFN"}


def removed_cells(plan, n_layers: int) -> dict:
    """{(layer, "attention"|"ffn"): removal rank (1-based) or None} for every removed sublayer."""
    cells: dict = {}
    for rank, entry in enumerate(plan.meta.get("removal_order") or [], start=1):
        i, kind = int(entry["layer"]), entry["sublayer"]
        for sub in (ROWS if kind == "block" else (kind,)):
            cells.setdefault((i, sub), rank)
    for i in range(n_layers):
        lp = plan.layer(i)
        gone = ROWS if i in plan.removed_blocks else [s for s in ROWS if not getattr(lp, s)]
        for sub in gone:
            cells.setdefault((i, sub), None)
    return cells


def plot_removed(plan, graph, path) -> Path:
    """Draw which sublayers/blocks ``plan`` removes (and in which order) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = graph.n_layers
    cells = removed_cells(plan, n)
    ranks = [r for r in cells.values() if r is not None]
    last = max(ranks) if ranks else 1
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * n + 1.5), 2.6))
    for i in range(n):
        for row, sub in enumerate(ROWS):
            y = len(ROWS) - 1 - row
            if (i, sub) in cells:
                rank = cells[(i, sub)]
                color = cmap(0.15 + 0.75 * (rank - 1) / max(last - 1, 1)) if rank else "0.35"
                ax.add_patch(Rectangle((i, y), 1, 1, facecolor=color, edgecolor="white"))
                if rank:
                    ax.text(i + 0.5, y + 0.5, str(rank), ha="center", va="center", color="white",
                            fontsize=7 if rank < 100 else 5)
            else:
                ax.add_patch(Rectangle((i, y), 1, 1, facecolor="0.92", edgecolor="white"))
    ax.set_xlim(0, n)
    ax.set_ylim(0, len(ROWS))
    ax.set_xticks([i + 0.5 for i in range(n)])
    ax.set_xticklabels([str(i) for i in range(n)], fontsize=7)
    ax.set_yticks([len(ROWS) - 1 - r + 0.5 for r in range(len(ROWS))])
    ax.set_yticklabels([LABELS[s] for s in ROWS])
    ax.set_xlabel("layer")
    cost = plan.cost(graph)
    method = plan.meta.get("method") or "plan"
    removed = sum(1 for _ in cells)
    ax.set_title(f"{method}: {removed} of {2 * n} sublayers removed, {cost['params_ratio']:.1%} of parameters "
                 f"kept (numbers: order of removal)", fontsize=9)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def plot_latency(summary: dict, graph, plan, path) -> Path:
    """Per layer: the kept fraction of query heads and FFN channels (top) and the predicted time
    against the dense layer's (bottom), from a latency summary (``pipeline.latency_summary``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = graph.n_layers
    layers = summary["layers"]
    heads = [len(plan.kept_heads(graph, i)) / graph.n_heads for i in range(n)]
    ffn = [len(plan.kept_ffn(graph, i)) / graph.intermediate for i in range(n)]
    ms = [entry["ms"] for entry in layers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.5, 0.3 * n + 2), 4.8), sharex=True)
    x = list(range(n))
    top.bar([i - 0.2 for i in x], heads, width=0.4, label="query heads kept", color="tab:blue")
    top.bar([i + 0.2 for i in x], ffn, width=0.4, label="FFN channels kept", color="tab:orange")
    top.set_ylim(0, 1.3)
    top.set_ylabel("fraction kept")
    top.legend(fontsize=7, loc="upper center", ncol=2)
    total = summary["predicted_ms"]
    bottom.bar(x, ms, color="tab:green", label="predicted ms of the layer")
    dense_layer = summary.get("dense_layer_ms")
    if dense_layer:
        bottom.step([i - 0.5 for i in x] + [n - 0.5], dense_layer + [dense_layer[-1]], where="post", color="0.3",
                    linewidth=0.8, label="dense layer")
    bottom.set_ylabel("predicted ms")
    bottom.set_xlabel("layer")
    bottom.set_ylim(0, 1.35 * max(ms + (dense_layer or []) + [1e-9]))
    bottom.legend(fontsize=7, loc="upper center", ncol=2)
    share = [100 * m / total for m in ms]
    for i, s in enumerate(share):
        if ms[i] > 0:
            bottom.text(i, ms[i], f"{s:.0f}%", ha="center", va="bottom", fontsize=5)
    reg = summary["regime"]
    what = f"prefill {reg['batch']}x{reg['seq']}" if reg["phase"] == "prefill" else \
        f"decode b{reg['batch']} kv{reg['seq']}"
    budget = f", budget {summary['budget_ms']:.1f} ms" if "budget_ms" in summary else ""
    fig.suptitle(f"{plan.meta.get('method') or 'plan'}: predicted {total:.1f} ms (x{summary['predicted_speedup']:.2f} "
                 f"vs dense {summary['dense_predicted_ms']:.1f} ms{budget}); {what}, {reg['device']}; "
                 f"labels: share of the total", fontsize=8)
    top.set_xticks(x)
    bottom.set_xticklabels([str(i) for i in x], fontsize=6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
