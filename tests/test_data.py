"""Calibration samples and held-out windows: deterministic, sourced from every kind of input,
and a clear error when the text is too small."""

from __future__ import annotations

import json

import pytest
import torch

from structlm import data
from structlm.data import DataError
from helpers import SAMPLE_TEXT, tiny_tokenizer


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE_TEXT * 3)
    return path


def test_calibration_is_seeded_and_deterministic(text_file):
    tok = tiny_tokenizer()
    a = data.calibration_samples(tok, n_samples=4, seq_len=32, source=str(text_file), seed=1)
    b = data.calibration_samples(tok, n_samples=4, seq_len=32, source=str(text_file), seed=1)
    c = data.calibration_samples(tok, n_samples=4, seq_len=32, source=str(text_file), seed=2)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = data.tokenize_documents(tok, [text_file.read_text()])
    windows = ids[: ids.numel() // 32 * 32].view(-1, 32)
    for row in a:  # every sample is one of the non-overlapping windows of the text
        assert (windows == row).all(dim=1).any()
    assert len({tuple(r.tolist()) for r in a}) == 4  # no window drawn twice


def test_too_little_calibration_text_is_an_error(text_file):
    with pytest.raises(DataError, match="too little calibration text"):
        data.calibration_samples(tiny_tokenizer(), n_samples=1000, seq_len=64, source=str(text_file))


def test_heldout_windows_and_max_tokens(text_file):
    tok = tiny_tokenizer()
    total = data.tokenize_documents(tok, [text_file.read_text()]).numel()
    windows = data.heldout_windows(tok, seq_len=50, source=str(text_file))
    assert windows.shape == (total // 50, 50)
    assert data.heldout_windows(tok, seq_len=50, max_tokens=120, source=str(text_file)).shape == (2, 50)
    with pytest.raises(DataError, match="larger than the held-out text"):
        data.heldout_windows(tok, seq_len=50, max_tokens=total + 1, source=str(text_file))
    with pytest.raises(DataError, match="shorter than one window"):
        data.heldout_windows(tok, seq_len=50, max_tokens=10, source=str(text_file))


def test_bos_is_put_at_the_start_of_every_window(text_file, monkeypatch):
    tok = tiny_tokenizer()
    monkeypatch.setattr(type(tok), "add_bos_token", True, raising=False)
    windows = data.heldout_windows(tok, seq_len=20, source=str(text_file))
    assert (windows[:, 0] == tok.bos_token_id).all()
    plain = data.tokenize_documents(tok, [text_file.read_text()])
    assert torch.equal(windows[1, 1:], plain[19:38])  # 19 text tokens per window after the BOS


def test_jsonl_and_saved_datasets(tmp_path):
    import datasets

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["one doc", "two doc"]) + "\n")
    assert data.load_documents(str(jsonl)) == ["one doc", "two doc"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        data.load_documents(str(bad))

    saved = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["train a", "train b"]}),
        "validation": datasets.Dataset.from_dict({"text": ["val a"]}),
    }).save_to_disk(str(saved))
    assert data.load_documents(str(saved), "calibration") == ["train a", "train b"]
    assert data.load_documents(str(saved), "heldout") == ["val a"]
    with pytest.raises(DataError, match="no 'content' column"):
        data.load_documents(str(saved), "heldout", text_field="content")
    with pytest.raises(DataError, match="not a dataset"):
        data.load_documents(str(tmp_path), "heldout")


def test_binary_text_is_named(tmp_path):
    for name in ("calib.txt", "calib.jsonl"):
        path = tmp_path / name
        path.write_bytes(b'{"text": "ok"}\n' + bytes([0xff, 0xfe, 0x00]))
        with pytest.raises(DataError, match=rf"{name} is not UTF-8 text \(byte 0xff at offset 15\)"):
            data.load_documents(str(path))


def test_a_damaged_cached_wikipedia_sample_is_named_and_removed(isolated_cache):
    from structlm import assets

    cached = isolated_cache / "assets" / "wikipedia" / assets.WIKI_BZ2
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"BZh9 garbage")
    data.wikipedia_articles.cache_clear()
    try:
        with pytest.raises(assets.AssetError, match=f"{assets.WIKI_BZ2} is corrupt.*removed"):
            data.wikipedia_articles()
    finally:
        data.wikipedia_articles.cache_clear()
    assert not cached.exists()


def test_unknown_source_and_split():
    with pytest.raises(DataError, match="not found"):
        data.load_documents("./no/such/file.txt")
    with pytest.raises(DataError, match="unknown split"):
        data.load_documents("wikipedia", "train")


@pytest.mark.real
def test_wikipedia_split_by_article(wikipedia_articles):
    titles = [t for t, _ in wikipedia_articles]
    assert len(titles) == 101 and titles[0] == "Anarchism" and titles[-1] == "Algorithm"
    assert not any("(disambiguation)" in t for t in titles)
    calib, held = data.load_documents("wikipedia", "calibration"), data.load_documents("wikipedia", "heldout")
    assert len(calib) == 59 and len(held) == 42
    assert not set(calib) & set(held)
    # markup stripped: a couple of malformed leftovers in the source survive mwparserfromhell, no more
    assert sum(doc.count("[[") + doc.count("{{") for doc in calib + held) < 10
