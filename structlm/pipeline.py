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
from .targets import parse_target


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


def make_plan(model, *, method: str | None = None, target=None, calib: torch.Tensor | None = None,
              plan: PrunePlan | None = None, align: int | None = None, graph=None, options: dict | None = None,
              tokenizer=None) -> tuple[PrunePlan, dict, dict]:
    """Score and plan without changing the model: (plan, method info, stats)."""
    graph = graph or build_graph(model)
    info: dict = {}
    stats: dict = {}
    if plan is None:
        if method is None or target is None:
            raise ValueError("give either a plan or a method and a target (e.g. method='finercut', "
                             "target='params=0.8')")
        fn = methods.get(method)
        target = parse_target(target)
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
    return plan, info, stats


def prune(model, method: str | None = None, target=None, calib: torch.Tensor | None = None, *,
          plan: PrunePlan | None = None, align: int | None = None, options: dict | None = None,
          tokenizer=None) -> PruneResult:
    """Prune ``model`` in place and return it with its plan, the method's info and statistics.

    Either ``plan`` (a :class:`PrunePlan`) or ``method`` + ``target`` (``"params=0.8"`` or
    ``{"params": 0.8}``) with calibration token ids ``calib`` [N, L] (or a ``tokenizer`` to
    draw the default 32 x 256 Wikipedia calibration samples)."""
    graph = build_graph(model)
    params_before = count_parameters(model)
    plan, info, stats = make_plan(model, method=method, target=target, calib=calib, plan=plan, align=align,
                                  graph=graph, options=options, tokenizer=tokenizer)
    start = time.perf_counter()
    with PeakMemory() as mem:
        shrink(model, plan, graph)
    stats.update(shrink_seconds=round(time.perf_counter() - start, 3), shrink_peak_extra_bytes=mem.extra_bytes,
                 params_before=params_before, params_after=count_parameters(model))
    stats["params_kept"] = stats["params_after"] / params_before
    stats.update(planned=plan.cost(graph))
    return PruneResult(model, plan, info, stats)
