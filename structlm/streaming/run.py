"""The streaming driver: score and shrink a checkpoint one decoder layer at a time.

Pass 1 (scoring; skipped for a given plan or a weight-free method): the embeddings run once on the
calibration ids, then each decoder layer in turn is read from the checkpoint, the activations run
through it (:class:`structlm.methods._layers.LayerRunner`, the layer-by-layer twin of the stock
forward) while the method's input statistics are recorded, the method scores that layer, and the
layer is dropped; its outputs go on to the next layer.  The method then allocates over every
layer's scores (FLAP's allocation is global) and the plan is aligned and validated as
:func:`structlm.pipeline.make_plan` does.

Pass 2 (shrinking): each layer is read again, gets its weight updates (FLAP's compensated
biases), is shrunk by :func:`structlm.surgery.shrink` on a meta copy of the model in which only
that layer is real, is cast to the output dtype and written as its own safetensors shard into the
output's staging folder, and is dropped.  The embeddings, final norm and lm_head make the last
shard.  Config, index, plan, recipe, report and model card are written by
:func:`structlm.export.write_checkpoint` from the shrunk meta model, and the folder is renamed
into place (:class:`structlm.outputs.OutputFolder`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from .checkpoint import INDEX_FILE, StreamError, StreamingCheckpoint
from .methods import stream_method


@dataclass
class StreamResult:
    out: Path | None
    plan: object
    info: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    model: object = None       # the shrunk model on the meta device (shapes, config, layout)
    graph: object = None       # the dense model's graph (for plan.summary_text)


def _layer_prefixes(adapter, n: int) -> list[str]:
    return [adapter.layer(i) for i in range(n)]


def _dtype(dtype, source: torch.dtype) -> torch.dtype:
    if dtype in (None, "auto"):
        return source
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _observe(observer, stage: str, i, model) -> None:
    if observer is not None:
        observer(stage, i, model)


@torch.no_grad()
def score_pass(ckpt: StreamingCheckpoint, spec, graph, adapter, calib: torch.Tensor, *, device="cpu",
               observer=None, progress: bool = True) -> dict:
    """Pass 1: every layer's scores, one layer resident at a time."""
    from ..methods._layers import LayerRunner, UnsupportedRunnerError

    model = ckpt.work_model()
    if torch.device(device).type != "cpu":   # the real buffers (rotary frequencies) go where the layers run
        buffers = [name for name, b in model.named_buffers() if not b.is_meta]
        ckpt.cast(model, buffers, None, device)
    n = graph.n_layers
    prefixes = _layer_prefixes(adapter, n)
    scores: dict = {}
    h = None
    runner = None
    if spec.needs_activations:
        try:
            runner = LayerRunner(model)
        except UnsupportedRunnerError as e:
            raise StreamError(f"--stream: {spec.name} runs the calibration activations layer by layer and {e}; "
                              f"magnitude and last_blocks stream without activations") from None
        embed_module = next(name for name, m in model.named_modules() if m is runner.base.embed_tokens)
        embed = [n_ for n_ in ckpt.other_names(prefixes) if n_.startswith(embed_module + ".")]
        ckpt.load(model, embed, device)
        bs = spec.batch_size
        calib = distributed.shard(calib, bs)   # under torchrun: this rank's batches (structlm.distributed)
        h = [runner.embed(calib[s:s + bs].to(device)) for s in range(0, calib.shape[0], bs)]
        ckpt.release(model, embed)
    last = max(spec.layers) if spec.layers else -1
    for i in tqdm(range(last + 1), desc="stream pass 1: score", disable=not progress, unit="layer"):
        names = ckpt.layer_names(prefixes[i])
        ckpt.load(model, names, device)
        _observe(observer, "score", i, model)
        if runner is not None:
            handles = spec.stats.attach(spec.stat_modules(model, i), model) if spec.stats is not None else []
            try:
                h = spec.run_layer(runner, i, h)
            finally:
                for handle in handles:
                    handle.remove()
            if spec.stats is not None:   # summed over the ranks before the layer is scored
                distributed.reduce_input_stats(spec.stats, spec.stat_modules(model, i))
        if i in spec.layers:
            if torch.device(device).type != "cpu":   # the scores combine weights with CPU float64 statistics
                ckpt.cast(model, names, torch.float32, "cpu")
            scores.update(spec.score_layer(model, i))
        ckpt.release(model, names)
    return scores


class ShardWriter:
    """Safetensors shards written one by one into ``folder`` and named ``model-0000k-of-0000N`` with
    ``model.safetensors.index.json`` at the end (a single shard is ``model.safetensors``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        path = self.folder / f".shard-{len(self.parts):05d}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt"})
        self.total += sum(v.numel() * v.element_size() for v in tensors.values())
        self.parts.append((path, sorted(tensors)))

    def finish(self) -> list[str]:
        if len(self.parts) == 1:
            os.replace(self.parts[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for k, (path, keys) in enumerate(self.parts):
            name = f"model-{k + 1:05d}-of-{len(self.parts):05d}.safetensors"
            os.replace(path, self.folder / name)
            names.append(name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names + [INDEX_FILE]


def _tensors(module, prefix: str, dtype) -> dict[str, torch.Tensor]:
    """Real parameters and persistent buffers of ``module`` under ``prefix``, cast to ``dtype``."""
    out = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        if attr in getattr(sub, "_non_persistent_buffers_set", set()) or t.is_meta:
            continue
        out[f"{prefix}.{name}" if prefix else name] = t.to(dtype) if t.is_floating_point() else t
    return out


@torch.no_grad()
def shrink_pass(ckpt: StreamingCheckpoint, spec, plan, graph, adapter, writer: ShardWriter, dtype, *,
                observer=None, progress: bool = True):
    """Pass 2: shrink and write every layer, then the embeddings / final norm / lm_head; returns
    the shrunk meta model (with every update of the plan, for the config and the layout)."""
    from ..surgery import shrink

    n = graph.n_layers
    prefixes = _layer_prefixes(adapter, n)
    future = spec.future_updates(ckpt.skeleton, plan) if spec is not None else {}
    kept = [i for i in range(n) if i not in set(plan.removed_blocks)]
    new_index = {old: new for new, old in enumerate(kept)}

    def shrunk_copy(load_names, load_dtype):   # on the CPU: pass 2 runs no forward, and the shards are written from it
        model = ckpt.work_model()
        ckpt.load(model, load_names, "cpu", load_dtype)
        return model

    # as in memory, where the float32 model is cast to the output dtype and then shrunk: weight updates
    # (FLAP's biases, computed while scoring) read float32 weights, the shrink runs in the output dtype
    updates_read_weights = spec is not None and spec.compensate
    for i in tqdm(range(n), desc="stream pass 2: shrink + write", disable=not progress, unit="layer"):
        if i not in new_index:
            continue
        names = ckpt.layer_names(prefixes[i])
        model = shrunk_copy(names, torch.float32 if updates_read_weights else dtype)
        _observe(observer, "shrink", i, model)
        if spec is not None:
            spec.layer_updates(model, plan, i)
        ckpt.cast(model, names, dtype)
        step = copy.copy(plan)
        step.updates = {**future, **plan.updates}
        shrink(model, step, graph)
        new_prefix = adapter.layer(new_index[i])
        writer.write(_tensors(model.get_submodule(new_prefix), new_prefix, dtype))
        del model
    others = ckpt.other_names(prefixes)
    model = shrunk_copy(others, dtype)
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    _observe(observer, "rest", None, model)
    step = copy.copy(plan)
    step.updates = {**future, **plan.updates}
    shrink(model, step, graph)
    layer_prefix = adapter.layer_prefix.split("{i}")[0]
    rest = {k: v for k, v in _tensors(model, "", dtype).items() if not k.startswith(layer_prefix)}
    writer.write(rest)
    del model
    final = ckpt.work_model()
    shrink(final, plan, graph)
    final.to(dtype)
    final.config.dtype = dtype
    return final


def stream_prune(model_dir, out=None, *, method: str | None = None, target=None, calib: torch.Tensor | None = None,
                 plan=None, options: dict | None = None, align: int | None = None, dtype="auto", tokenizer=None,
                 device: str = "cpu", force: bool = False, recipe: dict | None = None, report: dict | None = None,
                 dry_run: bool = False, observer=None, progress: bool = True, output=None) -> StreamResult:
    """Prune the local safetensors checkpoint ``model_dir`` with memory bounded by one decoder
    layer, writing a sharded checkpoint to ``out`` (the Python twin of ``structlm prune MODEL_DIR
    --stream``).  Either ``plan`` or ``method`` + ``target`` with calibration ids ``calib`` [N, L]
    (or a ``tokenizer`` for the default samples; the folder's own tokenizer is used when there is
    one).  ``dtype``: of the saved weights ("auto": the checkpoint's); scores are float32.
    ``recipe``: a dict, or ``recipe(plan, dtype) -> dict``.
    ``observer(stage, layer, model)`` is called after each layer is read (tests count the
    resident layers with it).  ``output``: an already reserved :class:`OutputFolder` (the CLI's)."""
    from ..export import removes_sublayers, write_checkpoint
    from ..families import get_adapter
    from ..graph import build_graph
    from ..models import count_parameters
    from ..outputs import OutputFolder
    from ..pipeline import PeakMemory, make_plan
    from ..targets import parse_target

    started = time.perf_counter()
    ckpt = StreamingCheckpoint(model_dir)
    skeleton = ckpt.skeleton
    graph = build_graph(skeleton)
    adapter = get_adapter(skeleton.config)
    if plan is None and (method is None or target is None):
        raise StreamError("--stream: give either a plan or a method and a target (e.g. method='flap', "
                          "target='params=0.8')")
    if not dry_run and out is None and output is None:
        raise StreamError("--stream: an output folder is needed (out=..., --out), or dry_run=True")
    if tokenizer is None:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(ckpt.folder)
        except (OSError, ValueError):
            tokenizer = None
    spec, info, stats = None, {}, {}
    if plan is None:
        target = parse_target(target)
        if target.is_latency:
            raise StreamError(f"--stream: latency targets ({target}) are not supported in streaming mode; use a "
                              f"params target (params=0.8)")
        spec = stream_method(method, skeleton, graph, target, options or {})
        if calib is None and spec.needs_activations:
            if tokenizer is None:
                raise StreamError(f"--stream: calibration ids are needed and {model_dir} has no tokenizer; pass "
                                  f"calib (token ids [N, L]) or a tokenizer")
            from ..data import calibration_samples

            calib = calibration_samples(tokenizer)
    out_dtype = _dtype(dtype, ckpt.source_dtype)
    with contextlib.ExitStack() as stack:
        if not dry_run and output is None:   # reserved (checked, locked, staged) before the long work
            output = stack.enter_context(OutputFolder(out, force))
            owned = True
        else:
            owned = False
        if spec is not None:
            t0 = time.perf_counter()
            with PeakMemory() as mem:
                scores = (score_pass(ckpt, spec, graph, adapter, calib, device=device, observer=observer,
                                     progress=progress) if spec.needs_weights else {})
                plan, info = spec.plan(skeleton, scores, list(calib.shape) if calib is not None else None)
            stats.update(score_seconds=round(time.perf_counter() - t0, 2), score_peak_extra_bytes=mem.extra_bytes)
            plan.meta.update(method=spec.name, target=str(target))
        plan, _, _ = make_plan(skeleton, plan=plan, align=align, graph=graph)
        if dry_run:
            return StreamResult(None, plan, info, stats, graph=graph)
        fraction = target.value if getattr(target, "kind", None) == "params" else 1.0
        output.require_space(int(count_parameters(skeleton) * out_dtype.itemsize * fraction) + (16 << 20),
                             "the checkpoint")
        t0 = time.perf_counter()
        writer = ShardWriter(output.staging)
        with PeakMemory() as mem:
            final = shrink_pass(ckpt, spec, plan, graph, adapter, writer, out_dtype, observer=observer,
                                progress=progress)
        stats.update(shrink_seconds=round(time.perf_counter() - t0, 2), shrink_peak_extra_bytes=mem.extra_bytes,
                     params_before=count_parameters(skeleton), params_after=count_parameters(final),
                     checkpoint_reads=ckpt.reads, stream_passes=2 if spec is not None and spec.needs_weights else 1)
        stats["params_kept"] = stats["params_after"] / stats["params_before"]
        stats.update(planned=plan.cost(graph))
        full_report = {"model": str(model_dir), "method": method or "plan",
                       "target": str(target) if target is not None else None, "mode": "stream", "stats": stats,
                       "shapes": plan.shapes(graph), "before": None, "after": None, "method_info": info,
                       "total_seconds": round(time.perf_counter() - started, 1),
                       "environment": {"python": platform.python_version(), "platform": platform.platform()},
                       **(report or {})}
        if removes_sublayers(plan):   # which blocks / sublayers went, in order (as structlm prune draws it)
            from ..figures import plot_removed

            plot_removed(plan, graph, output.staging / "removed.png")

        def weights(folder, config):
            config.dtype = out_dtype     # as save_pretrained records the weights' dtype
            config.save_pretrained(folder)
            if getattr(final, "generation_config", None) is not None and final.can_generate():
                final.generation_config.save_pretrained(folder)
            writer.finish()
        if callable(recipe):   # the CLI's recipe records the plan's alignment
            recipe = recipe(plan, out_dtype)
        stats["format"] = write_checkpoint(final, tokenizer, output.staging, plan=plan, recipe=recipe,
                                           report=full_report, name=Path(out or output.out).name, weights=weights)
        result = StreamResult(output.out, plan, info, stats, final, graph)
        if owned:
            output.commit()
        return result
