"""A local safetensors checkpoint opened without its weights: a model skeleton on the meta device
(``accelerate.init_empty_weights``: parameters on meta, buffers such as rotary frequencies real)
whose tensors are read one by one from the checkpoint files into the modules that are being worked
on, and dropped back to meta afterwards.

Tensors are read with plain file reads into a fresh tensor (the offsets from the safetensors
header), not through a memory map: the pages of a mapped shard that has been read count toward the
process's resident memory until the map is closed, which for an 8B model's 1 GB embedding or
lm_head shard doubles the memory of that read (``safetensors.safe_open`` is the fallback for a
dtype the reader does not know)."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class StreamError(ValueError):
    """An input or a request that streaming mode cannot serve (one line, with the fix)."""


def checkpoint_files(folder: Path) -> dict[str, str]:
    """tensor name -> safetensors file name of a local HF folder (single file or sharded with an
    index); a clear StreamError for anything else."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise StreamError(f"--stream reads a local Hugging Face folder with safetensors weights; {folder} is not a "
                          f"folder (a .gguf file is dequantised in memory: prune it without --stream)")
    if not (folder / "config.json").is_file():
        raise StreamError(f"--stream: {folder} has no config.json; give a Hugging Face model folder")
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise StreamError(f"--stream: {folder / INDEX_FILE} is not a safetensors index (no weight_map)") from None
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise StreamError(f"--stream: shards {missing[:3]} named by {INDEX_FILE} are missing from {folder}")
        return dict(weight_map)
    if (folder / SINGLE_FILE).is_file():
        with safe_open(str(folder / SINGLE_FILE), "pt") as f:
            return {k: SINGLE_FILE for k in f.keys()}
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    raise StreamError(f"--stream reads safetensors weights; {folder} has no {SINGLE_FILE} or {INDEX_FILE}"
                      + (f" (it has {', '.join(others[:3])}: convert it with save_pretrained(safe_serialization=True), "
                         f"or prune without --stream)" if others else ""))


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_FINITE_CHUNK = 1 << 24     # elements per isfinite() call: its bool temporary stays small (16 MB)


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where its data starts."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _read_into(f, offset: int, t: torch.Tensor) -> None:
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    f.seek(offset)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise StreamError(f"--stream: {f.name} ends before its tensors do (a truncated shard); download it again")
        done += got


def _finite(t: torch.Tensor) -> bool:
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[s:s + _FINITE_CHUNK]).all()) for s in range(0, flat.numel(), _FINITE_CHUNK))


_libc_trim = None


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere): the
    layers' tensors are freed one by one and the heap otherwise keeps growing with fragments."""
    global _libc_trim
    if _libc_trim is None:
        _libc_trim = False
        if sys.platform.startswith("linux"):
            try:
                _libc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _libc_trim:
        _libc_trim(0)


def _set(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


class StreamingCheckpoint:
    """A checkpoint folder opened for streaming: ``config``, the meta ``skeleton`` (never holds
    weights; copy it for work) and :meth:`load` / :meth:`release` of named tensors."""

    def __init__(self, folder, attn_implementation: str | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..models import is_structlm_layout

        self.folder = Path(folder)
        self.files = checkpoint_files(self.folder)
        if is_structlm_layout(self.folder):
            raise StreamError(f"--stream: {folder} is a structlm output with per-layer shapes; streaming reads "
                              f"stock-shaped checkpoints: prune it in memory (without --stream)")
        try:
            self.config = AutoConfig.from_pretrained(self.folder)
        except (ValueError, OSError) as e:
            raise StreamError(f"--stream: cannot read {self.folder / 'config.json'}: {str(e).splitlines()[0]}") from None
        source = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        if isinstance(source, str):
            source = getattr(torch, source, None)
        self.source_dtype = source if isinstance(source, torch.dtype) and source.is_floating_point else torch.float32
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        with init_empty_weights():
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32, **kw).eval()
        self.skeleton.requires_grad_(False)
        self.tied_embeddings = bool(getattr(self.config.get_text_config(), "tie_word_embeddings", False))
        if self.tied_embeddings:
            self.skeleton.tie_weights()
        self.names = [n for n, _ in self.skeleton.named_parameters()]
        tied = {n for n, _ in self.skeleton.named_parameters(remove_duplicate=False)} - set(self.names)
        absent = [n for n in self.names if n not in self.files]
        if absent:
            raise StreamError(f"--stream: {len(absent)} parameters of the model are not in the checkpoint's "
                              f"tensors (e.g. {absent[:2]}); its tensor names must be the model's "
                              f"(as save_pretrained writes them)")
        self.tied = tied
        self.reads = 0
        self._headers: dict = {}

    def work_model(self) -> nn.Module:
        """A fresh meta copy of the skeleton to load tensors into."""
        return copy.deepcopy(self.skeleton)

    def layer_names(self, prefix: str) -> list[str]:
        return [n for n in self.names if n.startswith(prefix + ".")]

    def other_names(self, layer_prefixes: list[str]) -> list[str]:
        """Parameters outside every decoder layer (embeddings, final norm, untied lm_head)."""
        return [n for n in self.names if not any(n.startswith(p + ".") for p in layer_prefixes)]

    def load(self, model: nn.Module, names, device="cpu", dtype=torch.float32) -> None:
        """Read ``names`` from the checkpoint into ``model`` (on ``device``, in ``dtype``)."""
        _trim_heap()   # what the previous layer freed
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        for file, group in by_file.items():
            for n, t in self._read(file, group):
                if t.is_floating_point() and not _finite(t):
                    raise StreamError(f"--stream: tensor {n} in {self.folder / file} has NaN or infinite values; "
                                      f"the checkpoint is broken (weights that are not finite are refused)")
                _set(model, n, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
                del t
                self.reads += 1

    def _read(self, file: str, names):
        """(name, tensor) of ``names`` in ``file``, each read into its own CPU tensor."""
        path = self.folder / file
        if file not in self._headers:
            try:
                self._headers[file] = _header(path)
            except (OSError, ValueError, UnicodeDecodeError):   # safe_open below says what is wrong
                self._headers[file] = ({}, 0)
        header, base = self._headers[file]
        infos = [header.get(n) if isinstance(header, dict) else None for n in names]
        plain = sys.byteorder == "little" and all(
            isinstance(i, dict) and i.get("dtype") in _DTYPES and len(i.get("data_offsets", ())) == 2 for i in infos)
        if plain:
            with open(path, "rb", buffering=0) as f:
                for n, info in zip(names, infos):
                    t = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
                    start, end = info["data_offsets"]
                    if end - start != t.numel() * t.element_size():
                        raise StreamError(f"--stream: tensor {n} in {path} has {end - start} bytes for shape "
                                          f"{info['shape']} {info['dtype']}; the shard is broken")
                    _read_into(f, base + start, t)
                    yield n, t
                    del t    # not held while the next one is read
            return
        from safetensors import safe_open

        with safe_open(str(path), "pt", device="cpu") as f:
            for n in names:
                yield n, f.get_tensor(n)

    @staticmethod
    def cast(model: nn.Module, names, dtype, device=None) -> None:
        """Cast the loaded floating-point tensors ``names`` of ``model`` to ``dtype`` (and move them
        to ``device``), in place."""
        params = dict(model.named_parameters())
        for n in names:
            t = params[n] if n in params else model.get_buffer(n)
            want = dtype if t.is_floating_point() and dtype is not None else t.dtype
            if t.dtype != want or (device is not None and t.device != torch.device(device)):
                _set(model, n, t.detach().to(device=device or t.device, dtype=want))

    @staticmethod
    def release(model: nn.Module, names) -> None:
        """Drop ``names`` back to the meta device (their memory is freed)."""
        for n in names:
            module_name, _, attr = n.rpartition(".")
            module = model.get_submodule(module_name)
            p = module._parameters.get(attr)
            if p is not None:
                module._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def resident_layers(model: nn.Module, adapter, n_layers: int) -> list[int]:
    """The decoder layers of ``model`` that hold at least one real (non-meta) parameter."""
    out = []
    for i in range(n_layers):
        try:
            layer = model.get_submodule(adapter.layer(i))
        except AttributeError:
            continue
        if any(not p.is_meta for p in layer.parameters()):
            out.append(i)
    return out
