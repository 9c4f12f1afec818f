"""Targets as plain data: ``params=0.8`` keeps 80% of the parameters (tied embeddings counted
once), ``blocks=7`` removes seven blocks, ``sublayers=12`` removes twelve attention/FFN
sublayers, ``speedup=1.5`` makes the model 1.5x faster and ``latency_ms=12`` at most 12 ms, both
as predicted by a latency table (:mod:`structlm.latency`; the regime -- device, prefill/decode,
batch, sequence -- is the table's).  Parsed from ``--target`` strings or given as dicts
(``{"params": 0.8}``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

KINDS = {
    "params": "fraction of the model's parameters to keep (0 < x < 1)",
    "blocks": "number of whole blocks to remove",
    "sublayers": "number of attention/FFN sublayers to remove",
    "speedup": "times faster than the dense model, predicted by the latency table (x > 1)",
    "latency_ms": "latency in milliseconds, predicted by the latency table (x > 0)",
}
LATENCY_KINDS = ("speedup", "latency_ms")


class TargetError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    kind: str
    value: float
    # a latency target's table (structlm.latency.LatencyTable), attached by the pipeline
    latency: object = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"

    @property
    def is_latency(self) -> bool:
        return self.kind in LATENCY_KINDS

    def with_latency(self, table) -> "Target":
        return dataclasses.replace(self, latency=table)

    def latency_budget(self, graph) -> float:
        """The predicted milliseconds this target allows (a latency target with its table)."""
        if self.latency is None:
            raise TargetError(f"target {self} needs a latency table (structlm.prune(..., latency_table=FILE) or "
                              f"--latency-table FILE; without one, a table is measured on this machine)")
        return self.latency.budget_ms(graph, self)

    def to_dict(self) -> dict:
        return {self.kind: self.value}


def parse_target(spec) -> Target:
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, dict):
        if len(spec) != 1:
            raise TargetError(f"a target has exactly one constraint, got {spec}")
        (kind, value), = spec.items()
    else:
        kind, sep, value = str(spec).partition("=")
        if not sep:
            raise TargetError(f"target {spec!r} is not KIND=VALUE; kinds: "
                              + "; ".join(f"{k} ({v})" for k, v in KINDS.items()))
    kind = kind.strip()
    if kind not in KINDS:
        raise TargetError(f"unknown target kind {kind!r}; kinds: " + "; ".join(f"{k} ({v})" for k, v in KINDS.items()))
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TargetError(f"target {kind}={value!r}: the value must be a number") from None
    if not math.isfinite(value):
        raise TargetError(f"target {kind}={value:g}: the value must be a finite number")
    if kind == "params" and not 0 < value < 1:
        raise TargetError(f"impossible target params={value:g}: keep a fraction strictly between 0 and 1 "
                          f"(params=0.8 keeps 80% of the parameters)")
    if kind == "speedup" and not value > 1:
        raise TargetError(f"impossible target speedup={value:g}: ask for more than 1 (speedup=1.5 is 1.5x faster "
                          f"than the dense model)")
    if kind == "latency_ms" and not value > 0:
        raise TargetError(f"impossible target latency_ms={value:g}: give a positive number of milliseconds")
    if kind in ("blocks", "sublayers") and (value < 1 or value != int(value)):
        raise TargetError(f"target {kind}={value:g} must be a positive whole number")
    return Target(kind, value)


def check_fits(target: Target, n_layers: int) -> None:
    """Refuse, before any scoring, a block or sublayer count the model does not have (at least
    one block must stay)."""
    if target.kind == "blocks" and target.value >= n_layers:
        raise TargetError(f"target {target} asks for {target.value:g} blocks removed, but the model has "
                          f"{n_layers} blocks and at least one must stay; use blocks=1..{n_layers - 1}")
    if target.kind == "sublayers" and target.value >= 2 * n_layers:
        raise TargetError(f"target {target} asks for {target.value:g} sublayers removed, but the model has "
                          f"{2 * n_layers} (attention and FFN in {n_layers} blocks) and at least one must stay; "
                          f"use sublayers=1..{2 * n_layers - 1}")


def parse_targets(spec: str) -> list[Target]:
    """Several targets in one run: "params=0.9,0.8,0.7" (a bare value takes the kind before it),
    each checked like one target; a target given twice is refused."""
    targets: list[Target] = []
    kind = None
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            raise TargetError(f"target list {spec!r} has an empty item; write e.g. params=0.9,0.8")
        if "=" not in part and kind is not None:
            part = f"{kind}={part}"
        t = parse_target(part)
        kind = t.kind
        if t in targets:
            raise TargetError(f"target {t} is listed twice in {spec!r}")
        targets.append(t)
    return targets


def folder_name(target: Target) -> str:
    """The subfolder of a multi-target run's output: params=0.9, blocks=4."""
    return str(target)
