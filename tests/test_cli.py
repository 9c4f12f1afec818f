"""The command line: complete help, eval end to end on a local folder, one clear error each."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from structlm import cli
from helpers import SAMPLE_TEXT, tiny_llama, tiny_tokenizer


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "structlm.cli", *argv], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "STRUCTLM_THREADS": "1"})


def test_help_is_complete():
    out = run_cli("--help")
    assert out.returncode == 0
    for verb in ("eval", "graph"):
        assert verb in out.stdout
        sub = run_cli(verb, "--help")
        assert sub.returncode == 0 and "MODEL" in sub.stdout


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


@pytest.mark.parametrize("argv, message", [
    (["eval", "no-such-model"], "unknown model 'no-such-model'"),
    (["eval", "."], "not a model"),
    (["eval", "smollm2-135m", "--max-tokens", "0"], "--max-tokens must be positive"),
])
def test_bad_input_gives_one_clear_error(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("structlm eval: error:")


def test_max_tokens_beyond_the_text_is_an_error(tiny_folder, capsys):
    folder, text = tiny_folder
    assert cli.main(["eval", str(folder), "--ppl", "--data", str(text), "--max-tokens", "10000000"]) == 2
    assert "larger than the held-out text" in capsys.readouterr().err
