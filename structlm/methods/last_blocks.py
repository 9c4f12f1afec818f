"""Baseline: remove the last k blocks before the final one.

With n blocks, removing k blocks removes blocks n-1-k, ..., n-2 (the final block n-1 stays, as in
the layer-pruning literature's "remove the last layers" baseline).  A ``params`` target takes the
smallest k that meets it (overshoot by at most one block, never short); ``sublayers=s`` takes
ceil(s/2) blocks.  Calibration data is not used.
"""

from __future__ import annotations

from . import register, reject_unknown_options
from ._layers import finish_plan, target_reached


def last_block_indices(n_layers: int, k: int) -> list[int]:
    if not 0 < k < n_layers:
        raise ValueError(f"last_blocks: cannot remove {k} of {n_layers} blocks while keeping the final one")
    return list(range(n_layers - 1 - k, n_layers - 1))


@register("last_blocks")
def last_blocks(model, graph, target, calib=None, **unknown):
    """Remove the last k blocks before the final one."""
    reject_unknown_options("last_blocks", unknown, last_blocks)
    n = graph.n_layers
    for k in range(1, n):
        removed = [(i, "block") for i in last_block_indices(n, k)]
        if target_reached(graph, target, removed, "last_blocks"):
            break
    else:
        raise ValueError(f"last_blocks: target {target} cannot be met while keeping the final block")
    removed = removed[::-1]  # removal order: nearest the final block first
    order = [{"layer": i, "sublayer": "block", "score": None} for i, _ in removed]
    plan = finish_plan(graph, removed, order, target, "last_blocks")
    return plan, {"removed_blocks": sorted(i for i, _ in removed), "k": len(removed), "removal_order": order}
