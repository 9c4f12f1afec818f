"""Checking a latency table against end-to-end measurements: the dense model and a fixed set of
pruned plans (uniform, heterogeneous, removed sublayers, removed blocks), shrunk on random weights
and timed beside the dense model (paired, :func:`structlm.latency.regime.measure_models`)."""

from __future__ import annotations

import copy
import random

from ..graph import build_graph
from ..plan import LayerPlan, PrunePlan, align_count
from ..surgery import shrink
from .measure import random_model
from .regime import measure_models
from .table import LatencyTable


def _attention(graph, groups: int, per_group: int) -> dict:
    full = graph.n_heads // graph.n_kv
    if (groups, per_group) == (graph.n_kv, full):
        return {}
    return {"kv_groups": list(range(groups)),
            "query_heads": [g * full + h for g in range(groups) for h in range(per_group)]}


def validation_plans(graph, align: int = 8, seed: int = 0) -> dict[str, PrunePlan]:
    """Six plans that exercise every part of a table: uniform FFN, uniform heads + FFN,
    heterogeneous widths, removed sublayers, removed blocks, and all of it mixed."""
    L, n_kv, per_group, inter = graph.n_layers, graph.n_kv, graph.n_heads // graph.n_kv, graph.intermediate
    rng = random.Random(seed)

    def width(frac):
        return align_count(max(align, int(inter * frac)), align, inter)

    def fewer_heads():
        return (n_kv - 1, per_group) if n_kv > 1 else (1, max(1, per_group - 1))

    def random_layer():
        a = (rng.randint(1, n_kv), rng.randint(1, per_group))
        return LayerPlan(**_attention(graph, *a), ffn_channels=list(range(width(rng.uniform(0.2, 1.0)))))

    plans = {
        "uniform FFN 75%": {i: LayerPlan(ffn_channels=list(range(width(0.75)))) for i in range(L)},
        "uniform heads -1, FFN 50%": {i: LayerPlan(**_attention(graph, *fewer_heads()),
                                                   ffn_channels=list(range(width(0.5)))) for i in range(L)},
        "heterogeneous widths": {i: random_layer() for i in range(L)},
        "removed sublayers": {**{i: LayerPlan(attention=False) for i in range(L // 2, L, 2)},
                              **{i: LayerPlan(ffn=False) for i in range(1, L // 3, 3)}},
    }
    out = {name: PrunePlan(layers=layers, family=graph.family, align=align) for name, layers in plans.items()}
    out["removed blocks (25%)"] = PrunePlan(removed_blocks=list(range(L - max(1, L // 4) - 1, L - 1)),
                                            family=graph.family, align=align)
    mixed = {i: random_layer() for i in range(L)}
    for i in range(L // 2, L - 1, 3):
        mixed[i] = LayerPlan(attention=False, ffn_channels=list(range(width(0.6))))
    mixed[1] = LayerPlan(**_attention(graph, *fewer_heads()), ffn=False)
    mixed.pop(L - 2)
    out["mixed"] = PrunePlan(layers=mixed, removed_blocks=[L - 2], family=graph.family, align=align)
    for plan in out.values():
        plan.validate(graph)
    return out


def validate_table(table: LatencyTable, config, *, plans: dict | None = None, rounds: int = 9,
                   progress: bool = True) -> dict:
    """Predicted vs measured latency and speedup of the dense model and ``plans`` (default:
    :func:`validation_plans`) on random weights in ``config``'s shape, in the table's regime."""
    regime = table.regime
    dense = random_model(config)
    graph = build_graph(dense)
    plans = plans if plans is not None else validation_plans(graph, align=table.data["ffn"].get("align", 8))
    variants = {"dense": dense}
    for name, plan in plans.items():
        variants[name] = shrink(copy.deepcopy(dense), plan, graph)
    for m in variants.values():
        m.to(regime.device, regime.torch_dtype)
    measured = measure_models(variants, regime, reference="dense", rounds=rounds, progress=progress)
    dense_pred = table.dense_ms(graph)
    rows = []
    for name in variants:
        predicted = dense_pred if name == "dense" else table.predict(graph, plans[name])["total_ms"]
        m = measured[name]
        row = {"plan": name, "predicted_ms": predicted, "measured_ms": m["ms"],
               "latency_error": predicted / m["ms"] - 1,
               "predicted_speedup": dense_pred / predicted, "measured_speedup": m["speedup"],
               "speedup_error": (dense_pred / predicted) / m["speedup"] - 1, "spread": m["spread"]}
        rows.append(row)
    worst = max(abs(r["speedup_error"]) for r in rows)
    return {"regime": regime.to_dict(), "rows": rows, "max_abs_speedup_error": worst,
            "max_abs_latency_error": max(abs(r["latency_error"]) for r in rows), "rounds": rounds}


def validation_text(result: dict) -> str:
    lines = [f"{'plan':<28} {'predicted ms':>12} {'measured ms':>12} {'error':>7} {'pred. x':>8} {'meas. x':>8} "
             f"{'x error':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['plan']:<28} {r['predicted_ms']:12.2f} {r['measured_ms']:12.2f} "
                     f"{100 * r['latency_error']:+6.1f}% {r['predicted_speedup']:8.3f} {r['measured_speedup']:8.3f} "
                     f"{100 * r['speedup_error']:+7.1f}%")
    lines.append(f"largest speedup error {100 * result['max_abs_speedup_error']:.1f}%, largest latency error "
                 f"{100 * result['max_abs_latency_error']:.1f}%")
    return "\n".join(lines)
