"""Sequential (layer-by-layer) calibration: the loop every reconstruction method runs on.

The calibration batch is embedded once; then, for each decoder layer in order, a method

1. collects statistics of that layer's inputs (:meth:`Sequential.collect`, e.g. the Gram matrix
   ``X^T X`` of a projection's input, accumulated in float64 by forward pre-hooks),
2. decides and reconstructs the layer (changes its weights in place, the method's business),
3. and :meth:`Sequential.advance` pushes the hidden states through the *changed* layer, so the
   next layer is calibrated on what the pruned model really feeds it (SparseGPT / ZipLM style).

Only the current layer's statistics and one hidden state per calibration sample live at a time,
which is also what layer streaming of big models needs.  Layers run through
:class:`structlm.methods._layers.LayerRunner` (the stock decoder forward, one layer at a time).
``propagate=False`` keeps feeding the *dense* layer outputs instead (for ablations: "sequential
vs not").

Under ``torchrun`` (:mod:`structlm.distributed`) each rank keeps the hidden states of its share of
the calibration batches only, and :meth:`Sequential.collect` sums the statistics over the ranks
before returning them, so every method built on this loop decides on all the samples.
"""

from __future__ import annotations

import contextlib

import torch

from . import distributed
from .methods._layers import LayerRunner


class Gram:
    """``sum_t x_t x_t^T`` and the token count over the inputs of one module.  Each batch's product
    is computed in float32 (or the model's dtype widened to it: 4-8x faster than float64 on CPU; a
    batch's few thousand tokens lose nothing that matters) and summed over batches in float64."""

    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        g = (x.T @ x).double()
        self.sum = g if self.sum is None else self.sum + g
        self.count += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """``X^T X / N`` (the mean outer product; ZipLM's H up to its factor 2, which cancels)."""
        if self.sum is None:
            raise RuntimeError("no calibration input reached this module")
        return self.sum.cpu() / self.count

    def check_finite(self, where: str) -> None:
        if self.sum is not None and not bool(torch.isfinite(self.sum).all()):
            raise ValueError(f"the calibration inputs of {where} are not finite (NaN/Inf): the model's weights "
                             f"or the calibration data are broken; check the model with structlm eval")


class Sequential:
    """Push calibration token ids ``calib`` [N, L] through ``model`` one decoder layer at a time."""

    def __init__(self, model, calib: torch.Tensor, batch_size: int = 8, propagate: bool = True):
        if calib.ndim != 2 or calib.shape[0] == 0:
            raise ValueError("sequential calibration needs token ids [N, L] with N >= 1")
        self.model = model
        self.runner = LayerRunner(model)
        self.propagate = propagate
        device = next(model.parameters()).device
        calib = distributed.shard(calib, batch_size)   # this rank's batches (all of them in one process)
        with torch.no_grad():
            self.hidden = [self.runner.embed(calib[s:s + batch_size].to(device))
                           for s in range(0, calib.shape[0], batch_size)]
        self.n_layers = self.runner.n
        self.kept: dict[int, tuple[bool, bool]] = {}   # layer -> (attention kept, ffn kept)

    def remove_sublayers(self, i: int, attention: bool = True, ffn: bool = True) -> None:
        """From now on layer ``i`` runs without its attention (``attention=False``) and/or FFN."""
        self.kept[i] = (attention, ffn)

    def _run(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.runner.layer(i, h, None, *self.kept.get(i, (True, True)))

    @torch.no_grad()
    def collect(self, i: int, modules: list[str], stat=Gram, advance: bool = False) -> dict[str, Gram]:
        """Run layer ``i`` on the current hidden states with a pre-hook on each named module
        (full parameter-path module names) that feeds its input to a fresh ``stat()`` (summed over
        the ranks of a data-parallel run before it is returned).  The
        hidden states move on through the layer only with ``advance`` (for a method that does
        not change the layer: one forward instead of two).  Returns {module name: stat}."""
        stats = {name: stat() for name in modules}
        handles = []
        try:
            for name in modules:
                module = self.model.get_submodule(name)
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, kwargs, s=stats[name]: s.add(args[0] if args else next(iter(kwargs.values()))),
                    with_kwargs=True))
            outputs = [self._run(i, h) for h in self.hidden]
        finally:
            for handle in handles:
                handle.remove()
        if advance:
            self.hidden = outputs
        return distributed.reduce_grams(stats)

    @torch.no_grad()
    def advance(self, i: int, dense_layer=None) -> None:
        """Move the hidden states through layer ``i`` as it is now (reconstructed, if the method
        changed it).  Without propagation, ``dense_layer`` (a context manager restoring the dense
        weights for the duration) gives the dense outputs to feed forward instead."""
        if self.propagate:
            self.hidden = [self._run(i, h) for h in self.hidden]
        else:
            kept, self.kept = self.kept, {}
            try:
                with dense_layer() if dense_layer else contextlib.nullcontext():
                    self.hidden = [self._run(i, h) for h in self.hidden]
            finally:
                self.kept = kept
