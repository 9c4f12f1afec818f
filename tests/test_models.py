"""Resolving MODEL arguments and loading models from folders and caches."""

from __future__ import annotations

import pytest
import torch

from structlm import models
from helpers import tiny_llama, tiny_tokenizer


def test_resolve_kinds(tmp_path):
    assert models.resolve("smollm2-135m")[0] == "alias"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert models.resolve(str(gguf)) == ("gguf", {"dir": str(tmp_path), "file": "m.gguf"})
    assert models.resolve("HuggingFaceTB/SmolLM2-135M")[0] == "hub"


@pytest.mark.parametrize("bad", ["no-such-alias", "./missing/folder", "/definitely/not/here"])
def test_unknown_model_is_a_clear_error(bad):
    with pytest.raises(models.ModelNotFoundError, match="MODEL must be"):
        models.resolve(bad)


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="not a model"):
        models.resolve(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(models.ModelNotFoundError, match="not a model"):
        models.resolve(str(tmp_path / "notes.txt"))


def test_local_folder_loads_and_counts_tied_once(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, tok = models.load_model(str(tmp_path))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    state = model.state_dict()  # holds the tied matrix twice, under both names
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    assert models.count_parameters(model) == sum(t.numel() for t in state.values()) - state["lm_head.weight"].numel()
    assert models.weights_location(str(tmp_path)) == tmp_path
