"""Streaming mode (structlm.streaming, ``structlm prune MODEL_DIR --stream``): on tiny random models
saved as safetensors, the streamed run gives the in-memory run's plan (updates included) and the
same logits of the saved outputs, with at most one decoder layer resident at any time; sharded
and single-file inputs; refusals are one clear line."""

from __future__ import annotations

import json
import weakref

import pytest
import torch

import structlm
from helpers import SAMPLE_TEXT, tiny_gguf, tiny_tokenizer
from structlm import cli
from structlm.families import get_adapter
from structlm.streaming import StreamError, StreamingCheckpoint, resident_layers, stream_prune
from tiny_models import tiny_inputs, tiny_model

LAYERS = 3


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny 3-layer Llama (GQA 9/3 heads, tied) saved as several safetensors shards with an index."""
    folder = tmp_path_factory.mktemp("stream-src") / "llama"
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    model.save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()
    return folder, model


class ResidentCounter:
    """Counts the decoder layers holding real weights, over every model streaming loads into,
    after every read from the checkpoint."""

    def __init__(self, monkeypatch, adapter, n_layers):
        self.models: weakref.WeakSet = weakref.WeakSet()
        self.peak = 0
        self.loads = 0
        original = StreamingCheckpoint.load

        def load(ckpt, model, names, *a, **kw):
            original(ckpt, model, names, *a, **kw)
            self.models.add(model)
            self.loads += 1
            self.peak = max(self.peak, sum(len(resident_layers(m, adapter, n_layers)) for m in list(self.models)))
        monkeypatch.setattr(StreamingCheckpoint, "load", load)


def logits(folder, ids):
    with torch.no_grad():
        return structlm.load(folder)(ids).logits


@pytest.mark.parametrize("method,options", [("magnitude", {}), ("wanda_sp", {}), ("flap", {}),
                                            ("wanda_sp", {"allocation": "global"}), ("last_blocks", {}),
                                            ("shortgpt", {"batch_size": 4}), ("shortgpt_angular", {})])
def test_stream_equals_in_memory(sharded, tmp_path, monkeypatch, method, options):
    folder, model = sharded
    calib = tiny_inputs(model.config, batch=6, seq=16)   # 6 samples: batches of 4 and 2
    target = "sublayers=2" if method == "shortgpt_angular" else "params=0.8"
    dense = structlm.load(folder)
    mem = structlm.prune(dense, method, target, calib, options=dict(options))
    structlm.save(mem.model, None, tmp_path / "mem", plan=mem.plan)

    counter = ResidentCounter(monkeypatch, get_adapter(model.config), LAYERS)
    res = stream_prune(folder, tmp_path / "stream", method=method, target=target, calib=calib,
                       options=dict(options), progress=False)
    assert counter.loads >= LAYERS and counter.peak == 1     # one decoder layer at a time, never more
    if method.startswith("shortgpt"):   # the scores themselves (the seconds differ)
        drop = ("seconds",)
        assert {k: v for k, v in res.info.items() if k not in drop} == {k: v for k, v in mem.info.items()
                                                                        if k not in drop}

    assert res.plan.to_dict() == mem.plan.to_dict()
    assert sorted(res.plan.updates) == sorted(mem.plan.updates)
    for name, value in mem.plan.updates.items():
        torch.testing.assert_close(res.plan.updates[name], value, rtol=0, atol=1e-6)
    if method == "flap":
        assert mem.plan.updates, "flap on llama compensates biases: the test must cover updates"
    assert res.stats["params_after"] == mem.stats["params_after"]
    ids = tiny_inputs(model.config, batch=2, seq=12, seed=5)
    torch.testing.assert_close(logits(tmp_path / "stream", ids), logits(tmp_path / "mem", ids), rtol=0, atol=1e-5)
    files = {p.name for p in (tmp_path / "stream").iterdir()}
    assert {"config.json", "plan.json", "report.json", "README.md"} <= files
    assert "model.safetensors.index.json" in files and not any(f.startswith((".", "model.safetensors.tmp"))
                                                               for f in files)
    assert ("removed.png" in files) == method.startswith(("shortgpt", "last_blocks"))
    report = json.loads((tmp_path / "stream" / "report.json").read_text())
    assert report["mode"] == "stream" and report["stats"]["stream_passes"] == (1 if method == "last_blocks" else 2)
    assert not list(tmp_path.glob(".stream.partial-*"))   # staging renamed into place


def test_single_file_bf16_checkpoint_loads_with_stock_transformers(tmp_path):
    """A single model.safetensors in bfloat16: saved in its dtype, uniform widths load with plain
    from_pretrained and match the in-memory result of the same (float32-scored) plan."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3", num_hidden_layers=2)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "src")
    assert (tmp_path / "src" / "model.safetensors").is_file()
    calib = tiny_inputs(model.config, batch=4, seq=16)
    res = stream_prune(tmp_path / "src", tmp_path / "out", method="magnitude", target="params=0.8", calib=calib,
                       options={"allocation": "uniform"}, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    mem = structlm.prune(dense, "magnitude", "params=0.8", calib, options={"allocation": "uniform"})
    assert mem.plan.to_dict() == res.plan.to_dict()
    # the saved bf16 tensors are the in-memory result's, cast (a bf16 forward of a model cast with .to()
    # differs by its bf16 rotary buffer, so the weights are compared, bit for bit)
    expected = {k: v.to(torch.bfloat16) for k, v in mem.model.state_dict().items()}
    got = loaded.state_dict()
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("family,method", [("gemma3", "wanda_sp"), ("mistral", "flap"), ("gpt2", "magnitude"),
                                           ("gemma3", "ziplm"), ("qwen3", "modegpt")])
def test_other_families_stream(tmp_path, family, method):
    """Gemma 3 (sliding + global attention layers, per-type rotary) through the layer runner; an
    untied lm_head (Mistral: its own shard; FLAP skips its biases, which Mistral cannot hold); GPT-2's
    Conv1D projections (magnitude needs no layer runner)."""
    model = tiny_model(family, num_hidden_layers=3)
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB")
    calib = tiny_inputs(model.config, batch=5, seq=16)
    mem = structlm.prune(structlm.load(tmp_path / "src"), method, "params=0.85", calib)
    structlm.save(mem.model, None, tmp_path / "mem", plan=mem.plan)
    res = stream_prune(tmp_path / "src", tmp_path / "out", method=method, target="params=0.85", calib=calib,
                       progress=False)
    assert res.plan.to_dict() == mem.plan.to_dict()
    ids = tiny_inputs(model.config, batch=2, seq=10, seed=4)
    torch.testing.assert_close(logits(tmp_path / "out", ids), logits(tmp_path / "mem", ids), rtol=0, atol=1e-5)


def _without_seconds(info: dict) -> dict:
    drop = ("seconds",)
    return {k: v for k, v in info.items() if k not in drop}


@pytest.mark.parametrize("method,target,options", [
    ("ziplm", "params=0.8", {}),
    ("ziplm", "params=0.75", {"sequential": False, "batch_size": 4}),   # dense inputs; batches of 4 and 2
    ("ziplm", "speedup=1.3", {}),                                         # a latency target (synthetic table)
    ("modegpt", "params=0.8", {}),
    ("modegpt", "params=0.85", {"allocation": "uniform", "modules": "ffn,vo"}),   # no importance pass
])
def test_calibrating_methods_stream_equal_in_memory(sharded, tmp_path, monkeypatch, method, target, options):
    """ziplm and modegpt: the level database / block importance in pass 1, the re-fit / decomposition
    layer by layer in the calibration pass, on the states the earlier changed layers give (as in
    memory); the same plan, the same updates (updates.safetensors assembled tensor by tensor) and
    the same logits, one decoder layer resident at a time."""
    from structlm.graph import build_graph
    from structlm.plan import PrunePlan
    from test_latency import synthetic_table

    folder, model = sharded
    calib = tiny_inputs(model.config, batch=6, seq=16)
    options = {"progress": False, **options}
    table = synthetic_table(build_graph(model), per_channel=0.02) if target.startswith("speedup") else None
    mem = structlm.prune(structlm.load(folder), method, target, calib, options=dict(options), latency_table=table)
    structlm.save(mem.model, None, tmp_path / "mem", plan=mem.plan)
    assert mem.plan.updates, "the test must cover the reconstructed weights"

    counter = ResidentCounter(monkeypatch, get_adapter(model.config), LAYERS)
    res = stream_prune(folder, tmp_path / "stream", method=method, target=target, calib=calib, options=dict(options),
                       latency_table=table, progress=False)
    assert counter.peak == 1 and counter.loads >= 2 * LAYERS
    assert res.plan.to_dict() == mem.plan.to_dict()
    assert json.loads((tmp_path / "stream" / "plan.json").read_text()) == json.loads(
        (tmp_path / "mem" / "plan.json").read_text())
    saved = PrunePlan.load(tmp_path / "stream" / "plan.json").updates   # the assembled file reads back
    assert sorted(saved) == sorted(res.plan.updates) == sorted(mem.plan.updates)
    for name, value in mem.plan.updates.items():
        torch.testing.assert_close(res.plan.updates[name], value, rtol=0, atol=1e-6)
        torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-6)
    mem_info, res_info = _without_seconds(mem.info), _without_seconds(res.info)
    if "latency" in mem_info:
        assert res_info.pop("latency")["predicted_ms"] == mem_info.pop("latency")["predicted_ms"]
    assert res_info == mem_info
    ids = tiny_inputs(model.config, batch=2, seq=12, seed=5)
    torch.testing.assert_close(logits(tmp_path / "stream", ids), logits(tmp_path / "mem", ids), rtol=0, atol=1e-5)
    report = json.loads((tmp_path / "stream" / "report.json").read_text())
    scored = not (method == "modegpt" and options.get("allocation") == "uniform")
    assert report["stats"]["stream_passes"] == 2 + scored and report["stats"]["updates_bytes"] > 0
    assert not [p.name for p in (tmp_path / "stream").iterdir() if p.name.startswith(".")]   # scratch updates gone


def test_ziplm_stream_with_a_level_database_and_refusals(sharded, tmp_path):
    """--levels DIR: no scoring pass (the calibration pass and the shrink only); -O search=evo (the
    whole assembled model per candidate) is refused in one line naming the fixes."""
    folder, model = sharded
    calib = tiny_inputs(model.config, batch=4, seq=16)
    first = stream_prune(folder, tmp_path / "a", method="ziplm", target="params=0.8", calib=calib,
                         options={"save_levels": str(tmp_path / "levels"), "progress": False}, progress=False)
    again = stream_prune(folder, tmp_path / "b", method="ziplm", target="params=0.8", calib=calib,
                         options={"levels": str(tmp_path / "levels"), "progress": False}, progress=False)
    assert again.stats["stream_passes"] == 2 and again.plan.to_dict() == first.plan.to_dict()
    with pytest.raises(StreamError, match=r"search=evo .* use -O search=dp .* or prune in memory") as e:
        stream_prune(folder, tmp_path / "c", method="ziplm", target="params=0.8", calib=calib,
                     options={"search": "evo"}, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "c").exists()


@pytest.mark.parametrize("method", ["finercut", "sleb", "llm_pruner"])
def test_refused_methods_say_why(sharded, tmp_path, method):
    folder, model = sharded
    with pytest.raises(StreamError, match=f"{method} cannot run in streaming mode: .*Prune in memory") as e:
        stream_prune(folder, tmp_path / "o", method=method, target="params=0.8",
                     calib=tiny_inputs(model.config), progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_prune_hidden_is_refused(sharded, tmp_path):
    folder, model = sharded
    with pytest.raises(StreamError, match="--prune-hidden is not supported in streaming mode"):
        stream_prune(folder, tmp_path / "o", method="magnitude", target="params=0.8",
                     options={"prune_hidden": True}, progress=False)


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-cli")
    model = tiny_model("llama", num_hidden_layers=2, vocab_size=len(tiny_tokenizer()))
    model.save_pretrained(root / "tiny", max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(root / "tiny")
    (root / "text.txt").write_text(SAMPLE_TEXT * 20)
    return root


FAST = ["--calib-samples", "4", "--calib-len", "32", "--threads", "1"]


def test_cli_stream_prune(cli_folder, tmp_path, capsys):
    root = cli_folder
    out = tmp_path / "flap"
    rc = cli.main(["prune", str(root / "tiny"), "--stream", "--method", "flap", "--target", "params=0.8",
                   "--calib-data", str(root / "text.txt"), "--out", str(out), *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "plan for llama" in printed and "does not evaluate" in printed and "saved to" in printed
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["mode"] == "stream" and recipe["method"] == "flap" and "--stream" in recipe["command"]
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    # the same run in memory: same plan, same logits
    mem_out = tmp_path / "mem"
    assert cli.main(["prune", str(root / "tiny"), "--method", "flap", "--target", "params=0.8", "--no-eval",
                     "--calib-data", str(root / "text.txt"), "--out", str(mem_out), *FAST]) == 0
    assert json.loads((out / "plan.json").read_text()) == json.loads((mem_out / "plan.json").read_text())
    ids = torch.randint(3, 100, (2, 12))
    torch.testing.assert_close(logits(out, ids), logits(mem_out, ids), rtol=0, atol=1e-5)
    # --dry-run prints the plan and writes nothing
    rc = cli.main(["prune", str(root / "tiny"), "--stream", "--method", "wanda_sp", "--target", "params=0.8",
                   "--calib-data", str(root / "text.txt"), "--dry-run", *FAST])
    assert rc == 0 and "plan for llama" in capsys.readouterr().out


def _cli_error(argv, capsys) -> str:
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_cli_stream_errors(cli_folder, tmp_path, capsys):
    root = cli_folder
    text = str(root / "text.txt")
    base = ["--target", "params=0.8", "--calib-data", text, "--out", str(tmp_path / "o"), *FAST]
    err = _cli_error(["prune", str(root / "tiny"), "--stream", "--method", "sleb", *base], capsys)
    assert "sleb cannot run in streaming mode" in err and "whole network" in err
    gguf = tiny_gguf(tmp_path / "m.gguf")
    err = _cli_error(["prune", str(gguf), "--stream", "--method", "flap", *base], capsys)
    assert "local Hugging Face folder with safetensors" in err and "without --stream" in err
    bin_folder = tmp_path / "binonly"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((root / "tiny" / "config.json").read_text())
    (bin_folder / "pytorch_model.bin").write_bytes(b"0")
    err = _cli_error(["prune", str(bin_folder), "--stream", "--method", "flap", *base], capsys)
    assert "has no model.safetensors" in err and "pytorch_model.bin" in err
    err = _cli_error(["prune", str(root / "tiny"), "--stream", "--method", "flap", "--target", "params=0.9,0.8",
                      "--calib-data", text, "--out", str(tmp_path / "o"), *FAST], capsys)
    assert "one target per run" in err
    err = _cli_error(["prune", str(root / "tiny"), "--stream", "--method", "ziplm", "-O", "search=evo", *base], capsys)
    assert "search=evo" in err and "search=dp" in err
    assert not (tmp_path / "o").exists()


def test_cli_stream_ziplm_equals_in_memory(cli_folder, tmp_path):
    """The CLI's streamed ziplm (calibration pass, updates.safetensors beside plan.json) against the
    same run in memory."""
    root = cli_folder
    common = ["--method", "ziplm", "--target", "params=0.8", "--calib-data", str(root / "text.txt"), *FAST]
    assert cli.main(["prune", str(root / "tiny"), "--stream", "--out", str(tmp_path / "s"), *common]) == 0
    assert cli.main(["prune", str(root / "tiny"), "--no-eval", "--out", str(tmp_path / "m"), *common]) == 0
    assert json.loads((tmp_path / "s" / "plan.json").read_text()) == json.loads((tmp_path / "m" / "plan.json").read_text())
    assert (tmp_path / "s" / "updates.safetensors").is_file()
    ids = torch.randint(3, 100, (2, 12))
    torch.testing.assert_close(logits(tmp_path / "s", ids), logits(tmp_path / "m", ids), rtol=0, atol=1e-5)


def test_automatic_streaming(cli_folder, tmp_path, monkeypatch, capsys):
    """Weights too big for the available memory (a monkeypatched figure): a streamable method
    streams by itself (one line, and report.json says so), a non-streamable one is refused in one
    line, and --no-stream forces in memory."""
    from structlm.streaming import auto

    root = cli_folder
    fp32 = auto.float32_weight_bytes(root / "tiny")
    assert fp32 == 4 * sum(p.numel() for p in structlm.load(root / "tiny").parameters())
    monkeypatch.setattr(auto, "available_memory", lambda device="cpu": fp32)   # below the margin
    common = ["--target", "params=0.8", "--calib-data", str(root / "text.txt"), *FAST]
    assert cli.main(["prune", str(root / "tiny"), "--method", "flap", "--out", str(tmp_path / "a"), *common]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("streaming mode:")]
    assert len(lines) == 1 and "do not fit the available memory" in lines[0] and "--no-stream" in lines[0]
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["mode"] == "stream" and report["stream"]["automatic"] is True
    assert report["stream"]["memory"]["available_bytes"] == fp32 and not report["stream"]["memory"]["fits"]
    err = _cli_error(["prune", str(root / "tiny"), "--method", "sleb", "--out", str(tmp_path / "b"), *common], capsys)
    assert "too big to prune in memory" in err and "sleb cannot stream" in err and "--no-stream" in err
    assert not (tmp_path / "b").exists()
    err = _cli_error(["prune", str(root / "tiny"), "--method", "flap", "--target", "params=0.9,0.8", "--calib-data",
                      str(root / "text.txt"), "--out", str(tmp_path / "b"), *FAST], capsys)
    assert "one target per run" in err and "--no-stream" in err
    assert cli.main(["prune", str(root / "tiny"), "--method", "flap", "--no-stream", "--no-eval",
                     "--out", str(tmp_path / "c"), *common]) == 0
    assert "streaming mode:" not in capsys.readouterr().out
    assert json.loads((tmp_path / "c" / "report.json").read_text()).get("mode") != "stream"
    monkeypatch.setattr(auto, "available_memory", lambda device="cpu": 1 << 40)   # fits: in memory, nothing said
    assert auto.memory_estimate(root / "tiny")["fits"]


def test_flap_saved_in_bfloat16_equals_in_memory_bit_for_bit(sharded, tmp_path):
    """dtype=bfloat16 from a float32 checkpoint: FLAP's biases are computed from float32 weights and
    the shrink runs in bfloat16, as in memory (score in float32, cast, shrink)."""
    folder, model = sharded
    calib = tiny_inputs(model.config, batch=4, seq=16)
    res = stream_prune(folder, tmp_path / "out", method="flap", target="params=0.8", calib=calib, dtype="bfloat16",
                       progress=False)
    dense = structlm.load(folder)
    plan, _, _ = structlm.make_plan(dense, method="flap", target="params=0.8", calib=calib)
    assert plan.to_dict() == res.plan.to_dict()
    pruned = structlm.prune(dense.to(torch.bfloat16), plan=plan).model
    got = structlm.load(tmp_path / "out", dtype=torch.bfloat16).state_dict()
    expected = pruned.state_dict()
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert v.dtype == torch.bfloat16 and torch.equal(got[k], v), k


def test_non_finite_weights_are_refused(tmp_path):
    model = tiny_model("llama", num_hidden_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(StreamError, match=r"model.layers.1.mlp.down_proj.weight .* NaN or infinite"):
        stream_prune(tmp_path / "src", tmp_path / "out", method="magnitude", target="params=0.8", progress=False)
    # the output was reserved before pass 1 found the bad tensor: nothing of it is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_plan_streams_without_scoring(sharded, tmp_path, monkeypatch):
    """A hand-written plan (a removed block, a removed FFN, fewer KV groups and FFN channels): pass 2
    only, the same checkpoint as shrinking in memory."""
    from structlm.plan import LayerPlan, PrunePlan

    folder, model = sharded

    def plan():
        return PrunePlan(layers={0: LayerPlan(kv_groups=[1], ffn_channels=list(range(0, 128, 2))),
                                 2: LayerPlan(ffn=False)}, removed_blocks=[1])
    counter = ResidentCounter(monkeypatch, get_adapter(model.config), LAYERS)
    res = stream_prune(folder, tmp_path / "stream", plan=plan(), progress=False)
    assert counter.peak == 1 and res.stats["stream_passes"] == 1
    mem = structlm.prune(structlm.load(folder), plan=plan())
    structlm.save(mem.model, None, tmp_path / "mem", plan=mem.plan)
    assert res.plan.to_dict() == mem.plan.to_dict()
    ids = tiny_inputs(model.config, batch=2, seq=12, seed=6)
    torch.testing.assert_close(logits(tmp_path / "stream", ids), logits(tmp_path / "mem", ids), rtol=0, atol=1e-5)


@pytest.mark.real
def test_real_alias_streams_from_its_cached_folder(smollm2, capsys):
    """`structlm prune smollm2-135m --stream` reads the alias's converted safetensors folder."""
    rc = cli.main(["prune", "smollm2-135m", "--stream", "--method", "magnitude", "--target", "params=0.9",
                   "--dry-run", "--threads", "1"])
    assert rc == 0
    assert "plan for llama" in capsys.readouterr().out
