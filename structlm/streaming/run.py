"""The streaming driver: score and shrink a checkpoint one decoder layer at a time.

Pass 1 (scoring; skipped for a given plan or a weight-free method): the embeddings run once on the
calibration ids, then each decoder layer in turn is read from the checkpoint, the activations run
through it (:class:`structlm.methods._layers.LayerRunner`, the layer-by-layer twin of the stock
forward) while the method's input statistics are recorded, the method scores that layer, and the
layer is dropped; its outputs go on to the next layer.  The method then allocates over every
layer's scores (FLAP's allocation is global) and the plan is aligned and validated as
:func:`structlm.pipeline.make_plan` does.

Calibration pass (ziplm, modegpt, between the two): the calibration ids are embedded again and
each layer in turn is read, changed by the method (re-fitted, decomposed) on the states the
earlier *changed* layers give, the states move on through it (:class:`structlm.calibration.Sequential`,
as in memory), and its new weights are written to a scratch safetensors file in the output's
staging folder (:class:`UpdatesStore`) before the layer is dropped.

Pass 2 (shrinking): each layer is read again, gets its weight updates (FLAP's compensated
biases), is shrunk by :func:`structlm.surgery.shrink` on a meta copy of the model in which only
that layer is real, is cast to the output dtype and written as its own safetensors shard into the
output's staging folder, and is dropped.  The embeddings, final norm and lm_head make the last
shard.  A calibrating method's updates are read back layer by layer and assembled, tensor by
tensor, into the plan's ``updates.safetensors``.  Config, index, plan, recipe, report and model card are written by
:func:`structlm.export.write_checkpoint` from the shrunk meta model, and the folder is renamed
into place (:class:`structlm.outputs.OutputFolder`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import shutil
import struct
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
    if spec.sequential:
        seq = sequential_states(ckpt, model, prefixes, calib, spec.batch_size, device)
        last = max(spec.layers) if spec.layers else -1
        for i in tqdm(range(last + 1), desc="stream pass 1: score", disable=not progress, unit="layer"):
            names = ckpt.layer_names(prefixes[i])
            ckpt.load(model, names, device)
            _observe(observer, "score", i, model)
            scores.update(spec.score_sequential(model, seq, i))
            ckpt.release(model, names)
        return scores
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


def _embedding_names(ckpt: StreamingCheckpoint, model, prefixes) -> list[str]:
    from ..methods._layers import LayerRunner

    embed_module = next(name for name, m in model.named_modules() if m is LayerRunner(model).base.embed_tokens)
    return [n for n in ckpt.other_names(prefixes) if n.startswith(embed_module + ".")]


def sequential_states(ckpt: StreamingCheckpoint, model, prefixes, calib: torch.Tensor, batch_size: int, device,
                      propagate: bool = True):
    """A :class:`structlm.calibration.Sequential` on ``model`` (a meta work model): the embeddings
    are read, embed the calibration ids (in the in-memory batches) and are dropped again."""
    from ..calibration import Sequential

    embed = _embedding_names(ckpt, model, prefixes)
    ckpt.load(model, embed, device)
    try:
        if next(model.parameters()).is_meta:   # Sequential embeds on the device of the first parameter
            raise StreamError("--stream: this model's first parameter is not its token embedding; the sequential "
                              "calibration of ziplm/modegpt cannot stream it (prune in memory)")
        return Sequential(model, calib.to(device), batch_size=batch_size, propagate=propagate)
    finally:
        ckpt.release(model, embed)


# ---- updates written layer by layer and assembled into one safetensors file ----------------------

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _st_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as copy-on-write memory maps (read from disk when touched)."""
    import mmap

    header, start = _st_header(path)
    if not header:
        return {}
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, h in header.items():
        dtype = _ST_DTYPES[h["dtype"]]
        a, b = h["data_offsets"]
        count = (b - a) // torch.empty((), dtype=dtype).element_size()
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=start + a) if count else torch.empty(0, dtype=dtype)
        out[name] = t.view(h["shape"])
    return out


class UpdatesStore:
    """A calibrating method's weight updates, one safetensors file per layer in ``folder`` (a
    scratch folder inside the output's staging folder), read back by the shrink pass
    (:meth:`layer`) and assembled into one file by :meth:`assemble`, tensor by tensor, so the
    updates of all layers are never in memory together."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files: dict[int, Path] = {}
        self.bytes = 0

    def add(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        path = self.folder / f"layer-{i:05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        self.files[i] = path
        self.bytes += sum(v.numel() * v.element_size() for v in tensors.values())

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.files[i])) if i in self.files else {}

    def assemble(self, path: Path) -> bool:
        """Write every layer's updates into the one safetensors file ``path`` (names sorted, as
        :meth:`PrunePlan.save` would); False (and no file) when there are none."""
        entries = []
        for file in self.files.values():
            header, start = _st_header(file)
            entries += [(name, h, file, start) for name, h in header.items()]
        if not entries:
            return False
        entries.sort(key=lambda e: e[0])
        header, offset = {}, 0
        for name, h, _, _ in entries:
            size = h["data_offsets"][1] - h["data_offsets"][0]
            header[name] = {"dtype": h["dtype"], "shape": h["shape"], "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)                  # the data starts 8-byte aligned
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for name, h, file, start in entries:
                a, b = h["data_offsets"]
                with open(file, "rb") as f:
                    f.seek(start + a)
                    left = b - a
                    while left:
                        chunk = f.read(min(left, 64 << 20))
                        out.write(chunk)
                        left -= len(chunk)
        return True

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@torch.no_grad()
def calibration_pass(ckpt: StreamingCheckpoint, spec, plan, graph, adapter, calib: torch.Tensor,
                     store: UpdatesStore | None, *, device="cpu", observer=None, progress: bool = True):
    """The calibration pass of a calibrating method (ziplm, modegpt): every layer up to the last
    one the method changes, in order, one resident at a time; returns the method's (plan, info)."""
    model = ckpt.work_model()
    if torch.device(device).type != "cpu":
        buffers = [name for name, b in model.named_buffers() if not b.is_meta]
        ckpt.cast(model, buffers, None, device)
    prefixes = _layer_prefixes(adapter, graph.n_layers)
    seq = sequential_states(ckpt, model, prefixes, calib, spec.batch_size, device, propagate=spec.propagate)
    spec.begin(model, seq, plan)
    end = spec.calibration_end(plan)
    for i in tqdm(range(end), desc=f"stream pass 2: {spec.name} calibration", disable=not progress, unit="layer"):
        names = ckpt.layer_names(prefixes[i])
        ckpt.load(model, names, device)
        _observe(observer, "calibrate", i, model)
        updates = spec.calibrate_layer(model, i)
        if store is not None:
            store.add(i, updates)
        del updates
        ckpt.release(model, names)
    return spec.finish(plan)


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
                observer=None, progress: bool = True, store: UpdatesStore | None = None):
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
    desc = f"stream pass {3 if store is not None else 2}: shrink + write"
    for i in tqdm(range(n), desc=desc, disable=not progress, unit="layer"):
        if i not in new_index:
            continue
        names = ckpt.layer_names(prefixes[i])
        model = shrunk_copy(names, torch.float32 if updates_read_weights else dtype)
        _observe(observer, "shrink", i, model)
        if spec is not None:
            spec.layer_updates(model, plan, i)
        ckpt.cast(model, names, dtype)
        step = copy.copy(plan)
        # a calibrating method's updates of this layer only (the other layers are not resident)
        step.updates = {**future, **plan.updates, **(store.layer(i) if store is not None else {})}
        shrink(model, step, graph)
        del step
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


class _PlanBesideUpdates:
    """The plan as :func:`structlm.export.write_checkpoint` saves it when its ``updates.safetensors``
    is already in the folder (assembled tensor by tensor): ``save`` writes only ``plan.json``."""

    def __init__(self, plan):
        self._plan = plan

    def __getattr__(self, name):
        return getattr(self._plan, name)

    def save(self, folder) -> Path:
        from ..plan import UPDATES_FILE

        if self._plan.updates and not (Path(folder) / UPDATES_FILE).is_file():
            raise StreamError(f"--stream: {UPDATES_FILE} was not assembled into {folder}")
        path = Path(folder) / "plan.json"
        path.write_text(self._plan.to_json())
        return path


def _latency(skeleton, graph, target, latency_table, regime, device, out_dtype):
    """The latency table of a latency target, as :func:`structlm.pipeline.make_plan` finds it: a
    latency table of the shapes (measured from the config alone, or given)."""
    from ..latency import Regime
    from ..pipeline import latency_table_for

    if target.latency is not None:
        return target.latency
    if regime is None and latency_table is None:
        regime = Regime.here(device=str(device), dtype=str(out_dtype).removeprefix("torch."))
    return latency_table_for(skeleton, graph, latency_table, regime)


def stream_prune(model_dir, out=None, *, method: str | None = None, target=None, calib: torch.Tensor | None = None,
                 plan=None, options: dict | None = None, align: int | None = None, dtype="auto", tokenizer=None,
                 device: str = "cpu", force: bool = False, recipe: dict | None = None, report: dict | None = None,
                 dry_run: bool = False, observer=None, progress: bool = True, output=None, latency_table=None,
                 regime=None) -> StreamResult:
    """Prune the local safetensors checkpoint ``model_dir`` with memory bounded by one decoder
    layer, writing a sharded checkpoint to ``out`` (the Python twin of ``structlm prune MODEL_DIR
    --stream``).  Either ``plan`` or ``method`` + ``target`` with calibration ids ``calib`` [N, L]
    (or a ``tokenizer`` for the default samples; the folder's own tokenizer is used when there is
    one).  ``dtype``: of the saved weights ("auto": the checkpoint's); scores are float32.
    A latency target (speedup=, latency_ms=) is priced by ``latency_table`` or this machine's
    table for ``regime``, as in :func:`structlm.make_plan`.
    ``recipe``: a dict, or ``recipe(plan, dtype) -> dict``.
    ``observer(stage, layer, model)`` is called after each layer is read (tests count the
    resident layers with it).  ``output``: an already reserved :class:`OutputFolder` (the CLI's)."""
    from ..export import removes_sublayers, write_checkpoint
    from ..families import get_adapter
    from ..graph import build_graph
    from ..models import count_parameters
    from ..outputs import OutputFolder
    from ..pipeline import PeakMemory, latency_summary, make_plan
    from ..plan import UPDATES_FILE
    from ..targets import TargetError, parse_target

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
    out_dtype = _dtype(dtype, ckpt.source_dtype)
    spec, info, stats, table = None, {}, {}, None
    if plan is None:
        target = parse_target(target)
        spec = stream_method(method, skeleton, graph, target, options or {})
        if target.is_latency:   # from the config alone: no weights are read for it
            table = _latency(skeleton, graph, target, latency_table, regime, device, out_dtype)
            target = target.with_latency(table)
            spec.target = target
        if calib is None and spec.needs_activations:
            if tokenizer is None:
                raise StreamError(f"--stream: calibration ids are needed and {model_dir} has no tokenizer; pass "
                                  f"calib (token ids [N, L]) or a tokenizer")
            from ..data import calibration_samples

            calib = calibration_samples(tokenizer)
    store = None
    passes = 0
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
                passes += bool(spec.needs_weights)
                plan, info = spec.plan(skeleton, scores, list(calib.shape) if calib is not None else None)
                if spec.calibrates and (plan is None or not dry_run):   # ziplm's dry run needs no updates
                    if not dry_run:
                        store = UpdatesStore(output.staging / ".updates")
                        stack.callback(store.remove)
                    plan, info = calibration_pass(ckpt, spec, plan, graph, adapter, calib, store, device=device,
                                                  observer=observer, progress=progress)
                    passes += 1
            stats.update(score_seconds=round(time.perf_counter() - t0, 2), score_peak_extra_bytes=mem.extra_bytes)
            plan.meta.update(method=spec.name, target=str(target))
        plan, _, _ = make_plan(skeleton, plan=plan, align=align, graph=graph)
        if table is not None:   # as make_plan checks a latency plan in memory
            summary = latency_summary(table, graph, plan, target)
            if target.is_latency and summary["predicted_ms"] > summary["budget_ms"] * (1 + 1e-6):
                raise TargetError(f"{method} did not meet target {target}: its plan is predicted at "
                                  f"{summary['predicted_ms']:.2f} ms against a budget of {summary['budget_ms']:.2f} ms")
            info["latency"] = summary
            plan.meta["predicted_ms"] = summary["predicted_ms"]
            plan.meta["predicted_speedup"] = summary["predicted_speedup"]
        if dry_run:
            return StreamResult(None, plan, info, stats, graph=graph)
        fraction = target.value if getattr(target, "kind", None) == "params" else 1.0
        output.require_space(int(count_parameters(skeleton) * out_dtype.itemsize * fraction) + (16 << 20)
                             + (2 * store.bytes if store is not None else 0), "the checkpoint")
        t0 = time.perf_counter()
        writer = ShardWriter(output.staging)
        with PeakMemory() as mem:
            final = shrink_pass(ckpt, spec, plan, graph, adapter, writer, out_dtype, observer=observer,
                                progress=progress, store=store)
            if store is not None:   # the plan's updates file, tensor by tensor; the plan maps it
                if store.assemble(output.staging / UPDATES_FILE):
                    plan.updates = mapped_tensors(output.staging / UPDATES_FILE)
                store.remove()
        passes += 1
        stats.update(shrink_seconds=round(time.perf_counter() - t0, 2), shrink_peak_extra_bytes=mem.extra_bytes,
                     params_before=count_parameters(skeleton), params_after=count_parameters(final),
                     checkpoint_reads=ckpt.reads, stream_passes=passes)
        if store is not None:
            stats["updates_bytes"] = store.bytes
        stats["params_kept"] = stats["params_after"] / stats["params_before"]
        stats.update(planned=plan.cost(graph))
        full_report = {"model": str(model_dir), "method": method or "plan",
                       "target": str(target) if target is not None else None, "mode": "stream", "stats": stats,
                       "shapes": plan.shapes(graph), "before": None, "after": None, "method_info": info,
                       "total_seconds": round(time.perf_counter() - started, 1),
                       "environment": {"python": platform.python_version(), "platform": platform.platform()},
                       **(report or {})}
        if "layers" in info.get("latency", {}):
            from ..figures import plot_latency

            plot_latency(info["latency"], graph, plan, output.staging / "latency.png")  # widths and time per layer
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
        saved_plan = _PlanBesideUpdates(plan) if store is not None else plan
        stats["format"] = write_checkpoint(final, tokenizer, output.staging, plan=saved_plan, recipe=recipe,
                                           report=full_report, name=Path(out or output.out).name, weights=weights)
        result = StreamResult(output.out, plan, info, stats, final, graph)
        if owned:
            output.commit()
        return result
