"""The command line: complete help, eval end to end on a local folder, one clear error each."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from structlm import cli
from helpers import SAMPLE_TEXT, tiny_llama, tiny_tokenizer


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "structlm.cli", *argv], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "STRUCTLM_THREADS": "1"})


def test_help_is_complete(capsys):
    out = run_cli("--help")
    assert out.returncode == 0
    for verb in ("eval", "graph", "prune"):
        assert verb in out.stdout
        assert cli.main([verb, "--help"]) == 0
        assert "MODEL" in capsys.readouterr().out
    cli.main(["prune", "--help"])
    text = capsys.readouterr().out
    assert "--dtype" in text and "--eval-data" in text and "dequantized to float32" in text


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = folder.parent / "held.txt"
    text.write_text(SAMPLE_TEXT * 3)
    return folder, text


def test_eval_end_to_end_on_a_local_folder(tiny_folder, tmp_path, capsys):
    folder, text = tiny_folder
    out_json = tmp_path / "r" / "eval.json"
    rc = cli.main(["eval", str(folder), "--ppl", "--seq-len", "32", "--data", str(text), "--latency",
                   "--latency-seq", "8", "--json", str(out_json), "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "prefill" in printed
    result = json.loads(out_json.read_text())
    assert result["perplexity"]["window"] == 32 and result["perplexity"]["ppl"] > 1
    assert result["size"]["params"] == sum(p.numel() for p in tiny_llama().parameters())
    assert result["size"]["bytes_on_disk"] > 0


# bad inputs (each with one clear message, nothing left on disk) are in test_bad_inputs.py


PRUNE_FAST = ["--calib-samples", "4", "--calib-len", "32", "--eval-tokens", "256", "--seq-len", "64",
              "--latency-seq", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def pruned(tiny_folder, tmp_path_factory):
    """The same ShortGPT prune of the tiny model saved in float32 and in bfloat16, under umask 022."""
    folder, text = tiny_folder
    root = tmp_path_factory.mktemp("pruned")
    old = os.umask(0o022)
    try:
        for dtype in ("float32", "bfloat16"):
            rc = cli.main(["prune", str(folder), "--method", "shortgpt", "--target", "blocks=1",
                           "--calib-data", str(text), "--eval-data", str(text), "--dtype", dtype,
                           "--out", str(root / dtype), *PRUNE_FAST])
            assert rc == 0
    finally:
        os.umask(old)
    return root


def test_prune_output_is_complete_and_shareable(pruned):
    out = pruned / "float32"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "plan.json", "recipe.json", "report.json", "removed.png",
            "README.md", "tokenizer.json"} <= names
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert sorted(p.name for p in pruned.iterdir()) == ["bfloat16", "float32"]  # no staging, no lock


def test_eval_data_is_used_for_the_before_after_perplexity(pruned, tiny_folder):
    report = json.loads((pruned / "float32" / "report.json").read_text())
    assert report["before"]["perplexity"]["source"] == str(tiny_folder[1])
    assert report["after"]["perplexity"]["window"] == 64


def test_bfloat16_halves_the_size_and_reloads_with_the_in_memory_logits(pruned, tiny_folder):
    from transformers import AutoModelForCausalLM

    import structlm
    from structlm.plan import PrunePlan

    sizes = {d: (pruned / d / "model.safetensors").stat().st_size for d in ("float32", "bfloat16")}
    assert 0.45 < sizes["bfloat16"] / sizes["float32"] < 0.55
    assert json.loads((pruned / "bfloat16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((pruned / "bfloat16" / "recipe.json").read_text())["dtype"] == "bfloat16"
    # the plan is scored in float32 either way, so both runs remove the same block
    plans = [json.loads((pruned / d / "plan.json").read_text()) for d in ("float32", "bfloat16")]
    assert plans[0]["removed_blocks"] == plans[1]["removed_blocks"]

    in_memory = structlm.prune(tiny_llama(), plan=PrunePlan.from_dict(plans[0])).model
    ids = torch.randint(3, in_memory.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    reloaded = {d: AutoModelForCausalLM.from_pretrained(pruned / d, dtype="auto").eval() for d in sizes}
    assert next(reloaded["bfloat16"].parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        ref = in_memory(ids).logits
        torch.testing.assert_close(reloaded["float32"](ids).logits, ref, atol=1e-5, rtol=0)
        half = reloaded["bfloat16"](ids).logits.float()
    torch.testing.assert_close(half, ref, atol=0.02 * ref.abs().max().item(), rtol=0.02)


def test_the_model_card_follows_the_hub_conventions(pruned):
    card = (pruned / "bfloat16" / "README.md").read_text()
    report = json.loads((pruned / "bfloat16" / "report.json").read_text())
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert 'library_name: "transformers"' in front and 'pipeline_tag: "text-generation"' in front
    assert '- "shortgpt"' in front and '- "layer-pruning"' in front
    assert "bfloat16" in body and "from_pretrained" in body and "trust_remote_code" not in body
    assert "structlm prune" in body and "--method shortgpt" in body  # the command as typed
    assert f"{report['before']['perplexity']['ppl']:.2f}" in body and f"{report['after']['perplexity']['ppl']:.2f}" in body
    assert "removed.png" in body


@pytest.mark.parametrize("spelling", ["llm-pruner", "LLM_Pruner", "Wanda-SP", "ShortGPT"])
def test_method_names_as_papers_write_them(spelling, tiny_folder, capsys):
    folder, text = tiny_folder
    target = "blocks=1" if spelling == "ShortGPT" else "params=0.8"
    assert cli.main(["prune", str(folder), "--method", spelling, "--target", target, "--dry-run",
                     "--calib-data", str(text), *PRUNE_FAST]) == 0
    assert "plan for llama" in capsys.readouterr().out


def test_base_model_and_default_dtype(tiny_folder, tmp_path):
    from structlm.cli_prune import _base_model, _save_dtype

    assert _base_model("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _base_model("someorg/somemodel") == "someorg/somemodel"
    assert _base_model(str(tiny_folder[0])) is None
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert _save_dtype(argparse.Namespace(dtype="auto", model=str(tmp_path / "bf16"))) == torch.bfloat16
    assert _save_dtype(argparse.Namespace(dtype="auto", model=str(tiny_folder[0]))) == torch.float32
    assert _save_dtype(argparse.Namespace(dtype="auto", model="smollm2-135m")) == torch.float32
    assert _save_dtype(argparse.Namespace(dtype="float16", model="smollm2-135m")) == torch.float16


def test_modegpt_prune_reloads_with_the_in_memory_logits(tiny_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from structlm import export
    folder, text = tiny_folder
    out = tmp_path / "m"
    rc = cli.main(["prune", str(folder), "--method", "modegpt", "--target", "params=0.8", "--calib-data", str(text),
                   "--eval-data", str(text), "--out", str(out), *PRUNE_FAST])
    assert rc == 0, capsys.readouterr().err
    assert "modegpt compress" in capsys.readouterr().err      # per-layer progress
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "heterogeneous" and report["stats"]["params_kept"] <= 0.8
    assert report["after"]["perplexity"]["ppl"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["structlm"]["channel_maps"]
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        a = export.load(out)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True)(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_ziplm_several_targets_one_scoring_pass_and_level_reuse(tiny_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from structlm import export
    folder, text = tiny_folder
    out, levels = tmp_path / "z", tmp_path / "levels"
    rc = cli.main(["prune", str(folder), "--method", "ziplm", "--target", "params=0.9,0.8", "--calib-data", str(text),
                   "--eval-data", str(text), "--out", str(out), "--save-levels", str(levels), *PRUNE_FAST])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["params=0.8", "params=0.9"]
    ids = torch.randint(0, 100, (1, 12))
    for sub in ("params=0.9", "params=0.8"):
        ckpt = out / sub
        assert {"plan.json", "updates.safetensors", "recipe.json", "report.json", "README.md"} <= {
            p.name for p in ckpt.iterdir()}
        report = json.loads((ckpt / "report.json").read_text())
        assert report["target"] == sub and report["stats"]["params_kept"] <= float(sub.split("=")[1])
        assert report["stats"]["shared_score_seconds"] > 0
        recipe = json.loads((ckpt / "recipe.json").read_text())
        assert recipe["target"] == sub and recipe["options"]["levels"].startswith("built in this run")
        with torch.no_grad():
            a = export.load(ckpt)(ids).logits
            b = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, trust_remote_code=True)(ids).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (levels / "levels.json").is_file()
    capsys.readouterr()
    # a later run reuses the database: same plan for the same target, no scoring pass
    rc = cli.main(["prune", str(folder), "--method", "ziplm", "--target", "params=0.8", "--levels", str(levels),
                   "--calib-data", str(text), "--dry-run", *PRUNE_FAST])
    assert rc == 0
    assert "ziplm levels" not in capsys.readouterr().err
    assert cli.main(["prune", str(folder), "--method", "flap", "--target", "params=0.8", "--levels", str(levels),
                     "--dry-run", *PRUNE_FAST]) == 2
    assert "only --method ziplm" in capsys.readouterr().err
