"""Zero the slices of units in place (for scoring by ablation and for correctness tests)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .model import Group, Unit


def _units(units) -> Iterable[Unit]:
    if isinstance(units, (Unit, Group)):
        units = [units]
    for u in units:
        if isinstance(u, Group):
            yield from u.units()
        elif isinstance(u, Unit):
            yield u
        else:
            raise TypeError(f"expected Unit or Group, got {type(u).__name__}")


@torch.no_grad()
def mask_units(model: torch.nn.Module, units) -> int:
    """Zero every slice of ``units`` (a Unit, a Group meaning all its units, or an iterable of
    them) in ``model``'s parameters, in place.  Returns the number of slices zeroed.

    A tied lm_head is zeroed with the embedding it shares storage with.  Caveats (see
    docs/graph.md): a masked hidden channel still counts in RMSNorm/LayerNorm statistics, so it
    is not equivalent to removing the channel; in post-LN models (OPT-350m) a zeroed
    sublayer's LayerNorm still acts, so masking a sublayer is not removing it.
    """
    params = dict(model.named_parameters())
    n = 0
    for u in _units(units):
        for name, dim, start, stop in u.slices:
            try:
                p = params[name]
            except KeyError:
                raise KeyError(f"model has no parameter {name!r} (graph built for another model?)") from None
            p.narrow(dim, start, stop - start).zero_()
            n += 1
    return n
