"""Text for calibration and held-out perplexity.

Sources: the built-in Wikipedia sample (``wikipedia``; 101 articles, the first 59 for
calibration and the last 42 held out), a local ``.txt`` / ``.jsonl`` file, a local folder
saved with ``datasets.save_to_disk``, or a ``datasets`` hub name where a hub is reachable.
"""

from __future__ import annotations

import bz2
import json
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

import torch

from . import assets
from .outputs import write_atomic

BUILTIN = "wikipedia"
WIKI_CALIBRATION_ARTICLES = 59
WIKI_HELDOUT_ARTICLES = 42
SPLITS = ("calibration", "heldout")


class DataError(ValueError):
    """Text source missing, unreadable, or too small for the request."""


@lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[tuple[str, str], ...]:
    """(title, plain text) of the 101 articles of the built-in sample, in file order."""
    import mwparserfromhell

    path = assets.fetch(BUILTIN)
    stripped = path.with_name("articles.json")  # markup stripping takes seconds; keep the result
    if stripped.is_file():
        try:
            return tuple(tuple(a) for a in json.loads(stripped.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError):
            stripped.unlink()
    assets.verify(BUILTIN)  # a damaged cached file is named and removed (sha256), so it is fetched afresh
    root = ET.fromstring(bz2.open(path).read())
    ns = root.tag.split("}")[0] + "}"
    articles = []
    for page in root.iter(ns + "page"):
        title = page.findtext(ns + "title") or ""
        text = page.find(ns + "revision").findtext(ns + "text") or ""
        # redirects and disambiguation pages are lists of links, not prose
        if page.findtext(ns + "ns") != "0" or page.find(ns + "redirect") is not None:
            continue
        if text.lstrip().upper().startswith("#REDIRECT") or "(disambiguation)" in title:
            continue
        plain = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True).strip()
        articles.append((title, plain))
    expected = WIKI_CALIBRATION_ARTICLES + WIKI_HELDOUT_ARTICLES
    if len(articles) != expected:
        raise DataError(f"the built-in Wikipedia sample has {len(articles)} articles, expected {expected}; "
                        f"the cached file may be damaged: delete {path} and retry")
    write_atomic(stripped, json.dumps(articles).encode("utf-8"))
    return tuple(articles)


def load_documents(source: str = BUILTIN, split: str = "calibration", text_field: str = "text") -> list[str]:
    """Documents of a text source. ``split`` selects the part of the built-in sample or of a
    dataset with splits; a plain local file is used whole for either split."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
    if source == BUILTIN:
        texts = [text for _, text in wikipedia_articles()]
        return texts[:WIKI_CALIBRATION_ARTICLES] if split == "calibration" else texts[-WIKI_HELDOUT_ARTICLES:]
    path = Path(source).expanduser()
    if path.is_file():
        return _file_documents(path, text_field)
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{source!r} is a folder but not a dataset saved with datasets.save_to_disk "
                            f"({e}); pass a .txt/.jsonl file, a saved dataset folder or {BUILTIN!r}") from e
        return _dataset_texts(ds, split, text_field, source)
    looks_local = source.startswith((".", "/", "~")) or path.suffix in (".txt", ".jsonl", ".json")
    if not looks_local:
        return _hub_documents(source, split, text_field)
    raise DataError(f"text source {source!r} not found: use {BUILTIN!r}, a .txt/.jsonl file, "
                    f"a folder saved with datasets.save_to_disk, or a datasets hub name")


def _file_documents(path: Path, text_field: str) -> list[str]:
    """A .jsonl file (one JSON object per line, text in ``text_field``) or any other file read
    whole as UTF-8 text."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                        f"give a .txt or .jsonl text file, or a folder saved with datasets.save_to_disk") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line)[text_field])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: expected a JSON object with a {text_field!r} "
                            f"field ({e})") from e
    return docs


def _dataset_texts(ds, split, text_field, source) -> list[str]:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        wanted = ["train"] if split == "calibration" else ["validation", "test"]
        names = [s for s in wanted if s in ds] or list(ds)
        ds = ds[names[0]]
    if text_field not in ds.column_names:
        raise DataError(f"dataset {source!r} has no {text_field!r} column (columns: {ds.column_names}); "
                        f"choose one with text_field")
    return [t for t in ds[text_field] if t]


def _hub_documents(name: str, split: str, text_field: str) -> list[str]:
    import datasets

    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    assets.require_hub(f"text source {name!r}", instead=f"{BUILTIN!r}, a local .txt/.jsonl file or a saved dataset folder")
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as e:
        raise DataError(f"could not load dataset {name!r} from a hub ({type(e).__name__}); no hub may be "
                        f"reachable here. Use {BUILTIN!r}, a local .txt/.jsonl file or a saved dataset folder.") from e
    return _dataset_texts(ds, split, text_field, name)


def tokenize_documents(tokenizer, documents: list[str]) -> torch.Tensor:
    """Join documents with blank lines and tokenize once (no special tokens), as SparseGPT/SliceGPT do."""
    text = "\n\n".join(documents)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def needs_bos(tokenizer) -> int | None:
    """The BOS id to put at the start of every window, for tokenizers that add one (Gemma)."""
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return None


def _windows(ids: torch.Tensor, length: int, bos: int | None) -> torch.Tensor:
    body = length - 1 if bos is not None else length
    n = ids.numel() // body
    windows = ids[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def calibration_samples(tokenizer, n_samples: int = 32, seq_len: int = 256, source: str = BUILTIN,
                        seed: int = 0, text_field: str = "text") -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens, drawn without overlap, seeded -> [N, L] tensor."""
    if n_samples < 1 or seq_len < 2:
        raise DataError(f"calibration needs at least 1 sample of at least 2 tokens (got {n_samples} x {seq_len})")
    ids = tokenize_documents(tokenizer, load_documents(source, "calibration", text_field))
    windows = _windows(ids, seq_len, needs_bos(tokenizer))
    if windows.shape[0] < n_samples:
        raise DataError(
            f"too little calibration text: {n_samples} samples x {seq_len} tokens requested, but "
            f"{source!r} has {ids.numel()} tokens ({windows.shape[0]} non-overlapping windows); "
            f"ask for fewer or shorter samples, or give more text"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows.shape[0], generator=generator)[:n_samples]
    return windows[chosen.sort().values].clone()


def heldout_windows(tokenizer, seq_len: int = 2048, max_tokens: int | None = None, source: str = BUILTIN,
                    text_field: str = "text") -> torch.Tensor:
    """Non-overlapping windows of the held-out text, from its start -> [W, seq_len] tensor.

    ``max_tokens`` caps the tokens used (rounded down to whole windows)."""
    ids = tokenize_documents(tokenizer, load_documents(source, "heldout", text_field))
    if max_tokens is not None:
        if max_tokens > ids.numel():
            raise DataError(f"{max_tokens} held-out tokens asked for (eval --max-tokens, prune --eval-tokens) "
                            f"is larger than the held-out text of {source!r} ({ids.numel()} tokens); "
                            f"ask for at most {ids.numel()}")
        if max_tokens < seq_len:
            raise DataError(f"{max_tokens} held-out tokens asked for (eval --max-tokens, prune --eval-tokens) "
                            f"is shorter than one window of {seq_len} tokens (--seq-len); raise it or "
                            f"lower the window length")
        ids = ids[:max_tokens]
    windows = _windows(ids, seq_len, needs_bos(tokenizer))
    if windows.shape[0] == 0:
        raise DataError(f"the held-out text of {source!r} has {ids.numel()} tokens, fewer than one "
                        f"window of {seq_len}; use a shorter window or more text")
    return windows
