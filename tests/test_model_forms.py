"""Every MODEL form through eval, graph and prune: structlm's own outputs (uniform, depth-pruned,
per-layer widths, removed sublayers), a .gguf path; weights and results that are not finite; the
converted cache's recorded hashes."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from plans import random_plan
from structlm import cli, evaluate, export, models, surgery
from structlm.graph import GraphBuildError, build_graph
from structlm.plan import LayerPlan, PrunePlan
from helpers import SAMPLE_TEXT, tiny_tokenizer
from tiny_models import FAMILIES, tiny_inputs, tiny_model

CHEAP = ["--threads", "1"]
CALIBRATION = ["--calib-samples", "2", "--calib-len", "16", "--no-eval", *CHEAP]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A 4-layer tiny Llama saved as a plain Hugging Face folder, and a text file for calibration
    and perplexity."""
    root = tmp_path_factory.mktemp("forms")
    tok = tiny_tokenizer()
    folder = root / "dense"
    tiny_model("llama", num_hidden_layers=4, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    text = root / "text.txt"
    text.write_text(SAMPLE_TEXT * 6)
    return folder, text


def _prune(source, out, text, *how) -> int:
    return cli.main(["prune", str(source), *how, "--out", str(out), "--calib-data", str(text), *CALIBRATION])


def _graph_json(model_arg, tmp_path) -> dict:
    out = tmp_path / "graph.json"
    assert cli.main(["graph", str(model_arg), "--format", "json", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _sublayer_plan(path):
    plan = PrunePlan(layers={1: LayerPlan(attention=False), 2: LayerPlan(ffn=False)})
    path.write_text(json.dumps(plan.to_dict()))
    return path


# (name, prune arguments, saved format, whether its output can be pruned again)
OUTPUTS = [
    ("uniform-width", ["--method", "magnitude", "--target", "params=0.8"], "uniform", True),
    ("depth", ["--method", "last_blocks", "--target", "blocks=1"], "uniform", True),
    ("per-layer-widths", ["--method", "magnitude", "--target", "params=0.8", "--allocation", "global"],
     "heterogeneous", False),
    ("removed-sublayers", ["--plan", "SUBLAYER_PLAN"], "heterogeneous", False),
]


@pytest.mark.parametrize("name, how, fmt, prunable", OUTPUTS, ids=[o[0] for o in OUTPUTS])
def test_a_pruned_output_evaluates_describes_itself_and_prunes_again_or_refuses(
        dense, tmp_path, capsys, name, how, fmt, prunable):
    folder, text = dense
    how = [str(_sublayer_plan(tmp_path / "plan.json")) if a == "SUBLAYER_PLAN" else a for a in how]
    out = tmp_path / "out"
    assert _prune(folder, out, text, *how) == 0
    assert json.loads((out / "report.json").read_text())["format"] == fmt
    reference = export.load(out)

    # eval: loads as structlm.load does, the perplexity is that of structlm.load's model
    results = tmp_path / "eval.json"
    assert cli.main(["eval", str(out), "--ppl", "--seq-len", "16", "--data", str(text), "--json", str(results),
                     *CHEAP]) == 0
    got = json.loads(results.read_text())
    expected = evaluate.perplexity(reference, tiny_tokenizer(), seq_len=16, source=str(text), progress=False)
    assert got["perplexity"]["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
    assert got["size"]["params"] == models.count_parameters(reference)

    # graph: the real per-layer shapes and parameter count
    graph = _graph_json(out, tmp_path)
    assert graph["accounting"]["total"] == graph["accounting"]["model_parameters"] == models.count_parameters(reference)
    config = reference.config
    layout = getattr(config, "structlm", None)
    for row in (layout["layers"] if layout else []):
        i = row["layer"]
        counts = {g["kind"]: g["count"] for g in graph["groups"] if g["layer"] == i}
        assert counts.get("query_head", 0) == row["heads"] and counts.get("kv_group", 0) == row["kv_heads"]
        assert counts.get("ffn_channel", 0) == row["ffn"]
    assert ("per_layer" in graph["config"]) == (fmt == "heterogeneous")
    if not layout:  # a uniform output is a stock checkpoint: its graph is the config's
        assert graph["config"]["heads"] == config.num_attention_heads
        assert graph["config"]["intermediate"] == config.intermediate_size
    capsys.readouterr()

    # prune again: a uniform output prunes like any model; per-layer shapes are refused in one line
    again = tmp_path / "again"
    rc = _prune(out, again, text, "--method", "last_blocks", "--target", "blocks=1")
    captured = capsys.readouterr()
    if prunable:
        assert rc == 0 and json.loads((again / "report.json").read_text())["format"] == "uniform"
        assert models.count_parameters(export.load(again)) < models.count_parameters(reference)
    else:
        assert rc == 2 and not again.exists()
        errors = [line for line in captured.err.splitlines() if line.startswith("structlm prune:")]
        assert len(errors) == 1 and "Traceback" not in captured.err  # (transformers' loading bar aside)
        assert "per-layer shapes" in errors[0] and "Prune the original model" in errors[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_heterogeneous_checkpoints_load_and_graph_as_they_are(family, tmp_path):
    """Random per-layer plans in every family: load_model gives structlm.load's logits; the graph from
    the saved config, from the loaded model and from the shrunk model in memory agree and count every
    parameter; pruning code (the default build_graph) refuses them."""
    model = tiny_model(family, num_hidden_layers=4)
    graph = build_graph(model)
    plan = random_plan(graph, random.Random(5))
    shrunk = surgery.shrink(model, plan, graph)
    export.save(shrunk, None, tmp_path / "het", plan=plan)
    tiny_tokenizer().save_pretrained(tmp_path / "het")
    assert json.loads((tmp_path / "het" / "report.json").read_text())["format"] == "heterogeneous"

    loaded, _ = models.load_model(str(tmp_path / "het"))
    ids = tiny_inputs(shrunk.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, export.load(tmp_path / "het")(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(loaded(ids).logits, shrunk(ids).logits, atol=1e-5, rtol=0)

    from_config = build_graph(models.load_config(str(tmp_path / "het")), per_layer_shapes=True)
    from_loaded = build_graph(loaded, per_layer_shapes=True)
    in_memory = build_graph(shrunk, per_layer_shapes=True)
    assert from_config.to_json() == from_loaded.to_json() == in_memory.to_json()
    assert from_config.total_params == models.count_parameters(loaded)
    rows = shrunk.structlm_layout["layers"]
    assert from_config.config["per_layer"] == [{"heads": r["heads"], "kv_heads": r["kv_heads"], "ffn": r["ffn"]}
                                               for r in rows]
    with pytest.raises(GraphBuildError, match="per-layer shapes"):
        build_graph(loaded)


def test_the_graph_text_of_a_heterogeneous_checkpoint_names_its_shapes(tmp_path, capsys):
    model = tiny_model("llama", num_hidden_layers=3)
    graph = build_graph(model)
    plan = PrunePlan(layers={0: LayerPlan(kv_groups=[0, 2], ffn_channels=list(range(96))),
                             1: LayerPlan(attention=False)}, align=1)
    export.save(surgery.shrink(model, plan, graph), None, tmp_path / "het", plan=plan)
    assert cli.main(["graph", str(tmp_path / "het")]) == 0
    text = capsys.readouterr().out
    assert "per-layer query heads, KV groups and FFN widths" in text
    assert "layer 0: 6 query heads / 2 KV heads / FFN 96" in text
    assert "layer 1: attention removed / FFN 192" in text and "attention removed):" in text
    total = models.count_parameters(export.load(tmp_path / "het"))
    assert f"{total:,}  (model: {total:,})" in text


def test_a_depth_pruned_model_in_memory_can_be_pruned_again():
    model = tiny_model("llama", num_hidden_layers=4)
    shrunk = surgery.shrink(model, PrunePlan(removed_blocks=[2]), build_graph(model))
    again = build_graph(shrunk)  # every kept layer has the config's shape
    assert again.n_layers == 3 and again.total_params == models.count_parameters(shrunk)


# ---- weights and results that are not finite --------------------------------------------------

def _folder_with_nan(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "nan")
    tok.save_pretrained(tmp_path / "nan")
    return tmp_path / "nan"


def test_non_finite_weights_are_refused_at_load_naming_parameter_and_file(tmp_path, capsys):
    folder = _folder_with_nan(tmp_path)
    with pytest.raises(models.NonFiniteError) as e:
        models.load_model(str(folder))
    message = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight (1 NaN, 0 infinite" in message
    assert "model.layers.0.self_attn.o_proj.weight (0 NaN, 1 infinite" in message
    assert str(folder / "model.safetensors") in message
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    assert cli.main(["eval", str(folder), "--ppl", "--data", str(text), *CHEAP]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("structlm eval:")]
    assert len(errors) == 1 and "up_proj.weight" in errors[0] and "Traceback" not in err


# ---- the converted cache's recorded hashes ------------------------------------------------------

def _fake_converted_alias(cache):
    """A converted alias folder as _ensure_alias_folder writes it (a tiny model stands in for the
    dequantized GGUF), with its mark recording every file."""
    folder = cache / "models" / "smollm2-135m"
    tok = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    models._write_mark(folder, {"asset": "smollm2-135m", "files": {
        p.name: models._file_record(p) for p in sorted(folder.iterdir())}})
    return folder


def test_the_converted_cache_is_verified_and_a_damaged_one_removed(isolated_cache):
    folder = _fake_converted_alias(isolated_cache)
    weights = folder / "model.safetensors"
    model, _ = models.load_model("smollm2-135m")
    assert models.count_parameters(model) > 0

    # same bytes, new mtime (a copy, a touch): hashed once, found intact, the new mtime recorded
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    models.load_model("smollm2-135m")
    mark = json.loads((folder / models._CONVERTED_MARK).read_text())
    assert mark["files"]["model.safetensors"]["mtime_ns"] == weights.stat().st_mtime_ns

    # garbage of the same size at the end of the weights: refused, removed, the next run rebuilds it
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.seek(size - 4096)
        f.write(os.urandom(4096))
    assert weights.stat().st_size == size
    with pytest.raises(models.ModelNotFoundError, match="model.safetensors does not match the sha256.*removed"):
        models.load_model("smollm2-135m")
    assert not folder.exists()


def test_a_cache_without_recorded_hashes_is_not_trusted(isolated_cache):
    folder = _fake_converted_alias(isolated_cache)
    models._write_mark(folder, {"asset": "smollm2-135m", "gguf": "x.gguf", "sha256": "0" * 64})  # older format
    assert models._check_converted(folder) == models._UNRECORDED


def test_a_recorded_file_that_is_missing_is_damage(isolated_cache):
    folder = _fake_converted_alias(isolated_cache)
    (folder / "tokenizer.json").unlink()
    assert models._check_converted(folder) == "tokenizer.json is missing"
    with pytest.raises(models.ModelNotFoundError, match="tokenizer.json is missing.*removed"):
        models.load_model("smollm2-135m")
    assert not folder.exists()


# ---- a .gguf file given by path ------------------------------------------------------------------

@pytest.mark.real
def test_a_gguf_path_evaluates_graphs_and_prunes(smollm2, tmp_path, capsys):
    """The cached SmolLM2 .gguf by path: no tensor left on the meta device, the alias's logits,
    through eval, graph and a dry-run prune."""
    from structlm import assets

    gguf = assets.fetch("smollm2-135m")
    model, tok = models.load_model(str(gguf))
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, smollm2[0](ids).logits, atol=1e-4, rtol=0)
    del model

    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 4)
    assert cli.main(["eval", str(gguf), "--ppl", "--seq-len", "64", "--data", str(text), *CHEAP]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert _graph_json(gguf, tmp_path) == _graph_json("smollm2-135m", tmp_path)
    assert cli.main(["prune", str(gguf), "--method", "magnitude", "--target", "params=0.9", "--dry-run",
                     "--calib-data", str(text), *CALIBRATION]) == 0
