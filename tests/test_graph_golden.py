"""The checked-in graphs/*.json must equal freshly built graphs.

Update them on purpose with:  STRUCTLM_UPDATE_GOLDEN=1 pytest tests/test_graph_golden.py
                          or:  python -m structlm.graph.golden --update
"""

from __future__ import annotations

import os

import pytest

from structlm.graph import Graph
from structlm.graph import golden
from tiny_models import FAMILIES

UPDATE = os.environ.get("STRUCTLM_UPDATE_GOLDEN") == "1"


def _check(name: str, text: str):
    if UPDATE:
        golden.golden_path(name).write_text(text)
        return
    d = golden.diff(name, text)
    assert not d, f"graphs/{name}.json differs from the rebuilt graph:\n{d}\nIf intended, run: {golden.UPDATE_CMD}"


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_tiny(family):
    _check(family, golden.render(family))


@pytest.mark.real
@pytest.mark.parametrize("name", golden.REAL_MODELS)
def test_golden_real(name):
    try:
        from structlm.models import load_config  # noqa: F401
    except ImportError as e:
        pytest.skip(f"structlm.models.load_config is not available ({e}); cannot read the {name} config")
    _check(name, golden.render(name))


@pytest.mark.parametrize("name", list(FAMILIES) + list(golden.REAL_MODELS))
def test_golden_files_parse_and_account(name):
    """Every golden file round-trips and its units add up to its parameter count."""
    text = golden.golden_path(name).read_text()
    g = Graph.from_json(text)
    assert g.to_json() == text
    acc = g.accounting()
    assert acc["total"] == acc["model_parameters"]
    for layer in acc["layers"]:
        i = layer["layer"]
        assert layer["attention"] == g.group("kv_group", i).params + sum(layer["attention_shared"].values())
        assert layer["ffn"] == g.group("ffn_channel", i).params + sum(layer["ffn_shared"].values())
        assert layer["block"] == g.group("block", i).params_per_unit


def test_golden_covers_all_families_and_real_models():
    names = {p.stem for p in golden.GOLDEN_DIR.glob("*.json")}
    assert names == set(FAMILIES) | set(golden.REAL_MODELS)
