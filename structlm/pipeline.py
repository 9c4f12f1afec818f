"""``structlm.prune``: score, plan and shrink in one call (the Python twin of ``structlm prune``)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil
import torch

from . import methods
from .graph import build_graph
from .models import count_parameters
from .plan import PrunePlan, align_plan
from .surgery import shrink
from .targets import TargetError, parse_target


@dataclass
class PruneResult:
    model: object
    plan: PrunePlan
    info: dict = field(default_factory=dict)  # the method's scores and decisions
    stats: dict = field(default_factory=dict)  # params, time and memory


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 10 ms)."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra_bytes(self) -> int:
        return self.peak - self.start


def latency_table_for(model, graph, latency_table=None, regime=None, progress: bool = True):
    """The latency table a latency target is measured against: ``latency_table`` (a file or a
    LatencyTable) when given, else the cached table of ``regime`` on this machine (measured now
    when there is none; default regime: CPU prefill 1 x 128 in the model's dtype)."""
    from .latency import Regime, table_for

    if regime is None and latency_table is None:
        from .models import dtype_name

        device = next(model.parameters()).device
        regime = Regime.here(device=str(device), dtype=dtype_name(model))
    table, _ = table_for(graph, model.config, regime, table=latency_table, progress=progress)
    return table


def latency_summary(table, graph, plan: PrunePlan, target=None) -> dict:
    """The plan's predicted latency per layer and in all, against the dense model and the budget."""
    predicted = table.predict(graph, plan)
    dense_pred = table.predict(graph)
    dense = dense_pred["total_ms"]
    out = {"table": table.source, "regime": table.regime.to_dict(),
           "device_name": table.data["hardware"]["device_name"], "dense_predicted_ms": round(dense, 4),
           "predicted_ms": round(predicted["total_ms"], 4),
           "predicted_speedup": round(dense / predicted["total_ms"], 4), "base_ms": round(predicted["base_ms"], 4),
           "layers": predicted["layers"], "dense_layer_ms": [entry["ms"] for entry in dense_pred["layers"]]}
    if target is not None and target.is_latency:
        out["budget_ms"] = round(target.latency_budget(graph), 4)
    return out


def make_plan(model, *, method: str | None = None, target=None, calib: torch.Tensor | None = None,
              plan: PrunePlan | None = None, align: int | None = None, graph=None, options: dict | None = None,
              tokenizer=None, latency_table=None, regime=None) -> tuple[PrunePlan, dict, dict]:
    """Score and plan without changing the model: (plan, method info, stats).

    A latency target (``speedup=1.5``, ``latency_ms=20``) is priced by ``latency_table`` (a file
    written by ``structlm latency``, or a LatencyTable), else by this machine's cached table for
    ``regime`` (a :class:`structlm.latency.Regime`; measured on first use)."""
    graph = graph or build_graph(model)
    info: dict = {}
    stats: dict = {}
    table = None
    if plan is None:
        if method is None or target is None:
            raise ValueError("give either a plan or a method and a target (e.g. method='finercut', "
                             "target='params=0.8')")
        fn = methods.get(method)
        target = parse_target(target)
        if target.is_latency:
            table = target.latency or latency_table_for(model, graph, latency_table, regime)
            target = target.with_latency(table)
        elif latency_table is not None:
            table = latency_table_for(model, graph, latency_table)
        if calib is None:
            if tokenizer is None:
                raise ValueError("calibration data is needed: pass calib (token ids [N, L]) or a tokenizer")
            from .data import calibration_samples

            calib = calibration_samples(tokenizer)
        start = time.perf_counter()
        with PeakMemory() as mem, torch.no_grad():
            plan, info = fn(model, graph, target, calib, **(options or {}))
        stats.update(score_seconds=round(time.perf_counter() - start, 2), score_peak_extra_bytes=mem.extra_bytes)
        plan.meta.update(method=method, target=str(target))
    if align is not None:
        plan.align = align
    plan.validate(graph)            # a plan written for another family is refused here, before it is filled
    align_plan(plan, graph)
    plan.family = plan.family or graph.family
    plan.validate(graph)
    if table is not None:
        summary = latency_summary(table, graph, plan, target)
        if target.is_latency and summary["predicted_ms"] > summary["budget_ms"] * (1 + 1e-6):
            raise TargetError(f"{method} did not meet target {target}: its plan is predicted at "
                              f"{summary['predicted_ms']:.2f} ms against a budget of {summary['budget_ms']:.2f} ms")
        info["latency"] = summary
        plan.meta["predicted_ms"] = summary["predicted_ms"]
        plan.meta["predicted_speedup"] = summary["predicted_speedup"]
    return plan, info, stats


def prune(model, method: str | None = None, target=None, calib: torch.Tensor | None = None, *,
          plan: PrunePlan | None = None, align: int | None = None, options: dict | None = None,
          tokenizer=None, latency_table=None, regime=None) -> PruneResult:
    """Prune ``model`` in place and return it with its plan, the method's info and statistics.

    Either ``plan`` (a :class:`PrunePlan`) or ``method`` + ``target`` (``"params=0.8"``,
    ``{"params": 0.8}``, ``"speedup=1.5"`` with ``latency_table`` / ``regime`` as in :func:`make_plan`) with calibration token ids ``calib`` [N, L] (or a ``tokenizer`` to
    draw the default 32 x 256 Wikipedia calibration samples)."""
    graph = build_graph(model)
    params_before = count_parameters(model)
    plan, info, stats = make_plan(model, method=method, target=target, calib=calib, plan=plan, align=align,
                                  graph=graph, options=options, tokenizer=tokenizer, latency_table=latency_table,
                                  regime=regime)
    start = time.perf_counter()
    with PeakMemory() as mem:
        shrink(model, plan, graph)
    stats.update(shrink_seconds=round(time.perf_counter() - start, 3), shrink_peak_extra_bytes=mem.extra_bytes,
                 params_before=params_before, params_after=count_parameters(model))
    stats["params_kept"] = stats["params_after"] / params_before
    stats.update(planned=plan.cost(graph))
    return PruneResult(model, plan, info, stats)
