"""Building a latency table on this machine: probes of identical decoder layers, on random weights
in the exact shapes, built from the model's config alone (no checkpoint needed).

A probe is the model's decoder stack with ``probe_layers`` copies of one layer configuration,
shaped by structlm's own ``shrink`` (so a probe's layers are exactly what a pruned checkpoint
holds, placeholders of removed sublayers included).  One layer's time is
``(probe - empty stack) / probe_layers``.  Probes run the stack on input embeddings (the
embedding and lm_head are measured once, in ``base_ms``, on the model with no layers, at the real
vocabulary).  Every probe is timed once per round, round-robin, with the same statistic as the
end-to-end measurement (:func:`structlm.latency.regime.time_round_robin`).

Which probes: per layer kind, a dense layer and every attention configuration a plan can give
(1..KV groups x 1..query heads per group, FFN removed); FFN widths (attention removed) on a grid
every ``ffn_step`` channels (a multiple of the alignment) plus off-grid widths whose measured
times check the interpolation; and, with ``check_dense``, the dense model itself end to end.
"""

from __future__ import annotations

import copy
import datetime
import time

import torch
from tqdm.auto import tqdm

from ..graph import build_graph
from ..plan import LayerPlan, PrunePlan
from ..surgery import shrink
from .regime import LatencyError, Regime, TimedCall, device_name, software, time_paired
from .table import FORMAT, LatencyTable, attention_key, fingerprint, layer_kinds

PROBE_VOCAB = 256


def _config_for(config, n_layers: int, kind: str | None, vocab: int | None):
    c = copy.deepcopy(config)
    c.num_hidden_layers = n_layers
    if getattr(c, "layer_types", None) is not None:
        c.layer_types = [kind] * n_layers
    if vocab is not None:
        c.vocab_size = vocab
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(c, key, None)
            if isinstance(value, int) and value >= vocab:
                setattr(c, key, 0)
    return c


def random_model(config, seed: int = 0):
    """A causal LM of ``config`` with random weights, float32 on the CPU (where ``shrink`` runs; the
    callers move it to the regime's device and dtype afterwards)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model


def probe(config, regime: Regime, n: int, kind: str, attention, ffn, seed: int = 0):
    """The decoder stack of ``n`` identical layers: ``attention`` = (KV groups, query heads per
    group) or None (removed), ``ffn`` = width or None (removed)."""
    model = random_model(_config_for(config, n, kind, PROBE_VOCAB), seed)
    graph = build_graph(model)
    per_group = graph.n_heads // graph.n_kv
    layers = {}
    for i in range(n):
        lp = LayerPlan()
        if attention is None:
            lp.attention = False
        elif attention != (graph.n_kv, per_group):
            groups, q = attention
            lp.kv_groups = list(range(groups))
            lp.query_heads = [g * per_group + h for g in range(groups) for h in range(q)]
        if ffn is None:
            lp.ffn = False
        elif ffn != graph.intermediate:
            lp.ffn_channels = list(range(ffn))
        layers[i] = lp
    plan = PrunePlan(layers=layers, family=graph.family, align=1)
    if any(not lp.is_identity for lp in layers.values()):
        shrink(model, plan.validate(graph), graph)
    return model.to(regime.device, regime.torch_dtype)


def per_layer_of(ms: dict, name: str, n: int) -> float:
    return max(0.0, (ms[name] - ms["stack/empty"]) / n)


def isotonic(values: list[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent violators)."""
    blocks = []                                   # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(count)]


def ffn_grid(intermediate: int, step: int, align: int) -> tuple[list[int], list[int]]:
    """Grid widths (every ``step`` channels, and the full width) and off-grid check widths (aligned
    widths half-way between grid points, spread over the range)."""
    step = max(align, step - step % align)
    grid = list(range(step, intermediate, step)) + [intermediate]
    mids = []
    for a, b in zip(grid, grid[1:]):
        mid = (a + b) // 2
        mid -= mid % align
        if a < mid < b:
            mids.append(mid)
    if len(mids) > 4:   # four spread over the range are enough to state the error
        mids = [mids[round(j * (len(mids) - 1) / 3)] for j in range(4)]
    return grid, sorted(set(mids))


def build_table(config, regime: Regime, *, probe_layers: int = 8, rounds: int = 12, reps: int | None = None,
                ffn_step: int = 64, align: int = 8, check_dense: bool = True, progress: bool = True,
                seed: int = 0) -> LatencyTable:
    """Measure a latency table for ``config``'s shape in ``regime`` on this machine."""
    started = time.perf_counter()
    if torch.device(regime.device).type == "cpu" and regime.threads:
        torch.set_num_threads(regime.threads)
    reps = reps or (2 if regime.phase == "prefill" else 5)
    dense = random_model(config, seed)
    graph = build_graph(dense)
    n_kv, per_group = graph.n_kv, graph.n_heads // graph.n_kv
    kinds = sorted(set(layer_kinds(graph)))
    grid, checks = ffn_grid(graph.intermediate, ffn_step, align)
    n = max(1, min(probe_layers, graph.n_layers))

    specs = {}                                  # name -> (kind, attention, ffn)
    for kind in kinds:
        specs[f"{kind}/dense"] = (kind, (n_kv, per_group), graph.intermediate)
        for g in range(1, n_kv + 1):
            for q in range(1, per_group + 1):
                specs[f"{kind}/attention/{attention_key(g, q)}"] = (kind, (g, q), None)
    for w in sorted(set(grid) | set(checks)):
        specs[f"ffn/{w}"] = (kinds[0], None, w)
    bar = tqdm(total=len(specs) + 2, desc="building probes", disable=not progress)
    calls = {}
    for name, (kind, attention, ffn) in specs.items():
        calls[name] = TimedCall(probe(config, regime, n, kind, attention, ffn, seed), regime, stack=True)
        bar.update()
    empty = random_model(_config_for(config, 0, kinds[0], PROBE_VOCAB), seed).to(regime.device,
                                                                                        regime.torch_dtype)
    calls["stack/empty"] = TimedCall(empty, regime, stack=True)
    base = random_model(_config_for(config, 0, kinds[0], None), seed).to(regime.device, regime.torch_dtype)
    calls["base"] = TimedCall(base, regime)
    bar.update(2)
    if check_dense:
        calls["dense_model"] = TimedCall(dense.to(regime.device, regime.torch_dtype), regime)
    bar.close()
    reference = f"{kinds[0]}/dense"
    with tqdm(total=rounds * (len(calls) - 1), desc=f"timing probes ({regime.phase})", disable=not progress) as tbar:
        timed = time_paired(calls, reference, regime, rounds=rounds, reps=reps, progress=tbar)
    ms = {name: t["ms"] for name, t in timed.items()}
    raw_ffn = [per_layer_of(ms, f"ffn/{w}", n) for w in grid]

    def per_layer(name):
        return per_layer_of(ms, name, n)

    data = {
        "format": FORMAT,
        "regime": regime.to_dict(),
        "hardware": {"device_name": device_name(regime.device)},
        "software": software(),
        "model": fingerprint(graph),
        "protocol": {"probe_layers": n, "rounds": rounds, "reps": reps, "warmup": 1,
                     "statistic": "median over rounds of the ratio to the dense probe timed beside it, times the dense probe's "
                                  "fastest run", "reference": reference, "seed": seed,
                     "max_spread": max(t["spread"] for t in timed.values())},
        "base_ms": ms["base"],
        "stack_empty_ms": ms["stack/empty"],
        "kinds": {kind: {"dense_ms": per_layer(f"{kind}/dense"),
                         "attention_ms": {attention_key(g, q): per_layer(f"{kind}/attention/{attention_key(g, q)}")
                                          for g in range(1, n_kv + 1) for q in range(1, per_group + 1)}}
                  for kind in kinds},
        # more channels never cost less: the grid's noise is removed by a monotone (isotonic) fit
        "ffn": {"widths": grid, "ms": isotonic(raw_ffn), "measured_ms": raw_ffn,
                "step": grid[1] - grid[0] if len(grid) > 1 else grid[0], "align": align, "fit": "isotonic"},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    table = LatencyTable(data)
    if checks:
        measured = [per_layer(f"ffn/{w}") for w in checks]
        interpolated = [table.ffn_ms(w) for w in checks]
        errors = [abs(i - m) / m for i, m in zip(interpolated, measured) if m > 0]
        data["interpolation"] = {"widths": checks, "measured_ms": measured, "interpolated_ms": interpolated,
                                 "max_rel_error": max(errors, default=0.0),
                                 "mean_rel_error": sum(errors) / len(errors) if errors else 0.0}
    if check_dense:
        predicted = table.dense_ms(graph)
        data["dense_check"] = {"layers": graph.n_layers, "predicted_ms": predicted, "measured_ms": ms["dense_model"],
                               "rel_error": predicted / ms["dense_model"] - 1, "spread": timed["dense_model"]["spread"]}
        layers_part = predicted - table.base_ms
        if layers_part > 0:
            data["calibration"] = {"factor": (ms["dense_model"] - table.base_ms) / layers_part,
                                   "from": "the dense model measured end to end, paired with the dense probe"}
    data["dense_predicted_ms"] = LatencyTable(data).dense_ms(graph)
    data["built_seconds"] = round(time.perf_counter() - started, 1)
    return LatencyTable(data)


def check_regime_device(regime: Regime) -> None:
    dev = torch.device(regime.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LatencyError(f"--device {regime.device}: no CUDA device here; build the table on the GPU machine "
                           f"(`structlm latency MODEL --device cuda --out table.json`) and pass --latency-table")
    if dev.type not in ("cpu", "cuda"):
        raise LatencyError(f"--device {regime.device}: use cpu or cuda[:N]")
