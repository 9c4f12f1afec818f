"""Bad inputs, table-driven: each one gets a non-zero exit, one message naming the problem, no
traceback, and leaves nothing on disk (no output, no staging folder, no lock, no created parent).

The CLI runs in-process (``structlm.cli.main``) on tiny models saved to a temporary folder; only
the signal cases run a subprocess.  Every case fails before any real work: that is the point.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from helpers import SAMPLE_TEXT, tiny_gguf, tiny_llama, tiny_tokenizer
from structlm import assets, cli, data
from structlm.outputs import OutputLock

REPO = Path(__file__).resolve().parents[1]
TINY_LAYERS = 2
TINY_CONTEXT = 256  # tiny_llama's max_position_embeddings


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Everything the cases point at, in one folder that no case may change."""
    w = tmp_path_factory.mktemp("bad-inputs")
    tiny_llama(layers=TINY_LAYERS).save_pretrained(w / "tiny")
    tiny_tokenizer().save_pretrained(w / "tiny")
    (w / "text.txt").write_text(SAMPLE_TEXT * 20)
    (w / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (w / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    (w / "a_file").write_text("not a folder")
    (w / "nonempty").mkdir()
    (w / "nonempty" / "keep.txt").write_text("mine")
    (w / "empty.gguf").write_bytes(b"")
    whole = tiny_gguf(w / "whole.gguf")
    (w / "truncated.gguf").write_bytes(whole.read_bytes()[:-100])
    whole.unlink()
    plans = {
        "out_of_range": {"layers": {"9": {"ffn": False}}},
        "bad_index": {"layers": {"0": {"ffn_channels": [0, 1, 99999]}}},
        "every_block": {"removed_blocks": list(range(TINY_LAYERS))},
        "not_json": None,
        # the plan schema is the lead's (plan.py); these land with it
        "align_eight": {"align": "eight"},
        "attention_no": {"layers": {"0": {"attention": "no"}}},
        "string_block": {"removed_blocks": ["1"]},
        "gpt2_family": {"family": "gpt2", "layers": {"0": {"ffn": False}}},
    }
    for name, plan in plans.items():
        text = "{not json" if plan is None else json.dumps({"format": "structlm-plan/1", **plan})
        (w / f"plan_{name}.json").write_text(text)
    _unsupported_model(w / "neox")
    _nan_model(w / "nan")
    return w


def _unsupported_model(folder: Path) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=len(tiny_tokenizer()), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def _nan_model(folder: Path) -> None:
    model = tiny_llama(layers=TINY_LAYERS)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its size (files) or None (folders); the isolated caches
    some set-ups make (``root/cache``) are checked by their own test."""
    return {rel: (p.stat().st_size if p.is_file() else None) for p in sorted(root.rglob("*"))
            if not (rel := p.relative_to(root).as_posix()).startswith("cache")}


# ---- set-ups for cases that need a condition rather than an argument --------------------------------

def _no_hub(monkeypatch, w, tmp):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(assets, "hub_reachable", lambda timeout=3.0: False)


def _disk_full(monkeypatch, w, tmp):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 30, 1 << 30, 1 << 20))


def _read_only_file_system(monkeypatch, w, tmp):
    """Creating anything under tmp/ro fails as on a read-only mount (EROFS)."""
    import errno

    (tmp / "ro").mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(real):
        def call(path, *args, **kw):
            if str(path).startswith(str(tmp / "ro") + os.sep):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real(path, *args, **kw)
        return call

    monkeypatch.setattr(os, "open", refuse(real_open))
    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))


def _read_only_folder(monkeypatch, w, tmp):
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    return lambda: (tmp / "ro").chmod(0o755)


def _locked(monkeypatch, w, tmp):
    lock = OutputLock(w / "locked")
    lock.acquire()
    return lock.release


def _cache_with_damaged_wikipedia(monkeypatch, w, tmp):
    cache = tmp / "cache"
    monkeypatch.setenv("STRUCTLM_CACHE", str(cache))
    target = cache / "assets" / "wikipedia" / assets.WIKI_BZ2
    target.parent.mkdir(parents=True)
    target.write_bytes(b"BZh9 this is not what was downloaded")
    data.wikipedia_articles.cache_clear()
    monkeypatch.setattr(assets, "_pip_download", _no_registry)
    return data.wikipedia_articles.cache_clear


def _cache_with_damaged_arrow(monkeypatch, w, tmp):
    import datasets

    from structlm import zeroshot

    cache = tmp / "cache"
    monkeypatch.setenv("STRUCTLM_CACHE", str(cache))
    root = cache / "assets" / "zero-shot" / "hf_datasets"
    sub = root / zeroshot.TASKS["arc_easy"].subdir
    datasets.Dataset.from_dict({"question": ["q?"], "choices": [{"text": ["a", "b"], "label": ["A", "B"]}],
                                "answerKey": ["A"]}).save_to_disk(str(sub))
    assets._write_manifest(root)
    arrow = next(sub.glob("*.arrow"))
    arrow.write_bytes(b"\0" * arrow.stat().st_size)  # same size, garbage inside
    monkeypatch.setattr(assets, "_pip_download", _no_registry)


def _no_registry(package, dest):
    raise AssertionError("a case must not download anything")


# ---- the table -------------------------------------------------------------------------------------------

AS_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")

PRUNE = ["prune", "{w}/tiny", "--calib-data", "{w}/text.txt", "--calib-samples", "2", "--calib-len", "16",
         "--no-eval", "--threads", "1"]
SHORTGPT = PRUNE + ["--method", "shortgpt", "--target", "blocks=1"]
OUT = ["--out", "{tmp}/new/deeper/out"]  # parents that do not exist: they must not be left behind
EVAL = ["eval", "{w}/tiny", "--threads", "1"]
PPL = EVAL + ["--ppl", "--data", "{w}/text.txt", "--seq-len", "32"]


def ppl_on(source: str) -> list[str]:
    return EVAL + ["--ppl", "--seq-len", "32", "--data", source]


def case(id, argv, *fragments, setup=None, marks=()):
    return pytest.param(argv, fragments, setup, id=id, marks=marks)


CASES = [
    # MODEL
    case("unknown-model", ["eval", "no-such-model"], "unknown model 'no-such-model'"),
    case("folder-not-a-model", ["eval", "{w}/nonempty"], "not a model", "config.json"),
    case("file-not-a-model", ["eval", "{w}/a_file"], "a_file", "not a model"),
    case("empty-gguf", ["eval", "{w}/empty.gguf"], "empty.gguf", "empty"),
    case("truncated-gguf", ["eval", "{w}/truncated.gguf"], "truncated.gguf", "truncated"),
    case("hub-id-offline", ["eval", "someorg/somemodel"], "someorg/somemodel", "cannot be reached",
         setup=_no_hub),
    case("unsupported-architecture", SHORTGPT[:1] + ["{w}/neox"] + SHORTGPT[2:] + OUT, "gpt_neox"),
    case("nan-weights", PRUNE[:1] + ["{w}/nan"] + PRUNE[2:] + ["--method", "magnitude", "--target",
                                                               "params=0.8"] + OUT, ("nan", "finite")),
    # eval lengths and sizes
    case("seq-len-1", PPL + ["--seq-len", "1"], "--seq-len", "at least 2"),
    case("seq-len-0", PPL + ["--seq-len", "0"], "--seq-len", "at least 2"),
    case("seq-len-not-a-number", PPL + ["--seq-len", "abc"], "--seq-len", "whole number"),
    case("seq-len-above-context", PPL + ["--seq-len", "100000"], "--seq-len", f"context of {TINY_CONTEXT}"),
    case("latency-seq-0", EVAL + ["--latency", "--latency-seq", "0"], "--latency-seq", "at least 1"),
    case("latency-seq-above-context", EVAL + ["--latency", "--latency-seq", "1000"], "--latency-seq",
         f"context of {TINY_CONTEXT}"),
    case("latency-batch-0", EVAL + ["--latency", "--latency-batch", "0"], "--latency-batch", "at least 1"),
    case("batch-size-0", PPL + ["--batch-size", "0"], "--batch-size", "at least 1"),
    case("max-tokens-0", PPL + ["--max-tokens", "0"], "--max-tokens", "at least 1"),
    case("max-tokens-beyond-text", PPL + ["--max-tokens", "10000000"], "larger than the held-out text"),
    case("limit-0", EVAL + ["--zero-shot", "arc_easy", "--limit", "0"], "--limit", "at least 1"),
    case("threads-0", EVAL + ["--threads", "0"], "--threads", "at least 1"),
    case("unknown-zero-shot-task", EVAL + ["--zero-shot", "nosuchtask"], "nosuchtask", "known tasks"),
    case("device-cuda-without-cuda", EVAL + ["--device", "cuda"], "cuda", "not available", marks=NO_CUDA),
    case("device-nonsense", EVAL + ["--device", "gpu7"], "gpu7", "not a torch device"),
    # text
    case("binary-data", ppl_on("{w}/binary.txt"), "binary.txt", "not UTF-8"),
    case("missing-data", ppl_on("./no/such.txt"), "no/such.txt", "not found"),
    case("jsonl-without-text", ppl_on("{w}/bad.jsonl"), "bad.jsonl:2", "'text'"),
    case("hub-dataset-offline", ppl_on("someorg/someset"), "someorg/someset", "cannot be reached",
         setup=_no_hub),
    case("damaged-cached-wikipedia", EVAL + ["--ppl", "--seq-len", "32"], assets.WIKI_BZ2, "removed",
         setup=_cache_with_damaged_wikipedia),
    case("damaged-cached-arrow", EVAL + ["--zero-shot", "arc_easy", "--limit", "1"], ".arrow", "removed",
         setup=_cache_with_damaged_arrow),
    # --json
    case("json-under-proc", PPL + ["--json", "/proc/structlm-test/r.json"], "--json", "/proc"),
    case("json-under-a-file", PPL + ["--json", "{w}/a_file/r.json"], "a_file", "is a file"),
    case("json-is-a-folder", PPL + ["--json", "{w}/nonempty"], "--json", "is a folder"),
    # what to remove
    case("nothing-to-remove", PRUNE + OUT, "say what to remove"),
    case("plan-and-method", SHORTGPT + ["--plan", "{w}/plan_out_of_range.json"] + OUT, "either --plan"),
    case("no-out", SHORTGPT, "--out DIR is required"),
    case("unknown-method", PRUNE + ["--method", "nope", "--target", "params=0.8"] + OUT, "unknown pruning method 'nope'"),
    case("params-above-1", PRUNE + ["--method", "flap", "--target", "params=1.5"] + OUT, "params=1.5"),
    case("params-not-a-number", PRUNE + ["--method", "flap", "--target", "params=abc"] + OUT, "must be a number"),
    case("blocks-inf", PRUNE + ["--method", "shortgpt", "--target", "blocks=inf"] + OUT, "blocks=inf", "finite"),
    case("blocks-nan", PRUNE + ["--method", "shortgpt", "--target", "blocks=nan"] + OUT, "blocks=nan", "finite"),
    case("blocks-fraction", PRUNE + ["--method", "shortgpt", "--target", "blocks=1.5"] + OUT, "whole number"),
    case("unknown-target-kind", PRUNE + ["--method", "shortgpt", "--target", "layers=2"] + OUT,
         "unknown target kind 'layers'"),
    case("target-without-kind", PRUNE + ["--method", "shortgpt", "--target", "0.8"] + OUT, "KIND=VALUE"),
    case("more-blocks-than-the-model", PRUNE + ["--method", "shortgpt", "--target", "blocks=100"] + OUT,
         "blocks=100", f"has {TINY_LAYERS} blocks"),
    case("more-sublayers-than-the-model", PRUNE + ["--method", "sleb", "--target", "sublayers=100"] + OUT,
         "sublayers=100", f"has {2 * TINY_LAYERS}"),
    case("option-batch-size-0", SHORTGPT + ["-O", "batch_size=0"] + OUT, "batch_size", "positive whole number"),
    case("option-batch-size-negative", SHORTGPT + ["-O", "batch_size=-1"] + OUT, "batch_size", "positive"),
    case("option-batch-size-text", SHORTGPT + ["-O", "batch_size=abc"] + OUT, "batch_size", "positive"),
    case("option-without-value", SHORTGPT + ["-O", "batch_size"] + OUT, "KEY=VALUE"),
    case("option-with-a-plan", PRUNE + ["--plan", "{w}/plan_out_of_range.json", "-O", "x=1"] + OUT,
         "-O/--option"),
    case("align-0", SHORTGPT + ["--align", "0"] + OUT, "--align", "at least 1"),
    case("calib-len-above-context", SHORTGPT + ["--calib-len", "100000"] + OUT, "--calib-len",
         f"context of {TINY_CONTEXT}"),
    case("calib-len-1", SHORTGPT + ["--calib-len", "1"] + OUT, "--calib-len", "at least 2"),
    case("calib-samples-0", SHORTGPT + ["--calib-samples", "0"] + OUT, "--calib-samples", "at least 1"),
    case("too-little-calibration-text", SHORTGPT + ["--calib-samples", "1000", "--calib-len", "64"] + OUT,
         "too little calibration text"),
    case("binary-calib-data", SHORTGPT + ["--calib-data", "{w}/binary.txt"] + OUT, "binary.txt", "not UTF-8"),
    case("eval-seq-len-above-context", [a for a in SHORTGPT if a != "--no-eval"] + ["--seq-len", "4096"] + OUT,
         "--seq-len", f"context of {TINY_CONTEXT}"),
    case("eval-data-binary", [a for a in SHORTGPT if a != "--no-eval"] + ["--seq-len", "32", "--latency-seq", "8",
                                                                           "--eval-data", "{w}/binary.txt"] + OUT,
         "binary.txt", "not UTF-8"),
    case("eval-tokens-below-one-window", [a for a in SHORTGPT if a != "--no-eval"] + ["--seq-len", "64",
                                                                                       "--eval-tokens", "10"] + OUT,
         "10 held-out tokens", "--eval-tokens", "shorter than one window"),
    # plans
    case("plan-missing", PRUNE + ["--plan", "{w}/no-such-plan.json"] + OUT, "no-such-plan.json", "not found"),
    case("plan-not-json", PRUNE + ["--plan", "{w}/plan_not_json.json"] + OUT, "not valid JSON"),
    case("plan-layer-out-of-range", PRUNE + ["--plan", "{w}/plan_out_of_range.json"] + OUT, "layer 9", "0..1"),
    case("plan-index-out-of-range", PRUNE + ["--plan", "{w}/plan_bad_index.json"] + OUT, "99999"),
    case("plan-removes-every-block", PRUNE + ["--plan", "{w}/plan_every_block.json"] + OUT, "every block"),
    case("plan-align-text", PRUNE + ["--plan", "{w}/plan_align_eight.json"] + OUT, "align"),
    case("plan-bool-as-text", PRUNE + ["--plan", "{w}/plan_attention_no.json"] + OUT, "attention"),
    case("plan-block-as-text", PRUNE + ["--plan", "{w}/plan_string_block.json"] + OUT, "removed_blocks",
         ("integer", "whole number", "int ")),
    case("plan-of-another-family", PRUNE + ["--plan", "{w}/plan_gpt2_family.json"] + OUT, "gpt2"),
    # --out
    case("out-exists", SHORTGPT + ["--out", "{w}/nonempty"], "nonempty", "--force"),
    case("out-under-a-file", SHORTGPT + ["--out", "{w}/a_file/out"], "a_file", "is a file"),
    case("out-under-proc", SHORTGPT + ["--out", "/proc/structlm-test-out"], "/proc/structlm-test-out"),
    case("out-is-the-current-folder", SHORTGPT + ["--out", ".", "--force"], "current folder"),
    case("out-is-the-model", SHORTGPT + ["--out", "{w}/tiny", "--force"], "model being pruned"),
    case("out-read-only-file-system", SHORTGPT + ["--out", "{tmp}/ro/out"], "ro", "read-only",
         setup=_read_only_file_system),
    case("out-read-only-folder", SHORTGPT + ["--out", "{tmp}/ro/out"], "ro", "permission denied",
         setup=_read_only_folder, marks=AS_ROOT),
    case("json-read-only-folder", PPL + ["--json", "{tmp}/ro/r.json"], "--json", "permission denied",
         setup=_read_only_folder, marks=AS_ROOT),
    case("out-disk-full", SHORTGPT + OUT, "not enough disk space", setup=_disk_full),
    case("out-being-written", SHORTGPT + ["--out", "{w}/locked"], "another structlm process", setup=_locked),
]


@pytest.mark.parametrize("argv, fragments, setup", CASES)
def test_bad_input(argv, fragments, setup, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(world)
    argv = [a.format(w=world, tmp=tmp_path) for a in argv]
    world_before = snapshot(world)
    undo = setup(monkeypatch, world, tmp_path) if setup else None
    before = world_before, snapshot(tmp_path)
    try:
        rc = cli.main(argv)
    finally:
        if undo:
            undo()
    out, err = capsys.readouterr()
    assert rc != 0, f"exit 0 for a bad input; stdout: {out[-500:]}"
    assert "Traceback" not in err + out
    message = [line for line in err.splitlines() if "error" in line]
    assert len(message) == 1, f"expected one error line, got: {err[-2000:]}"
    for fragment in fragments:  # a tuple: any one of its spellings
        spellings = fragment if isinstance(fragment, tuple) else (fragment,)
        assert any(f.lower() in message[0].lower() for f in spellings), message[0]
    assert (snapshot(world), snapshot(tmp_path)) == before  # nothing written, nothing half-written, no lock, no parents


def test_the_table_covers_enough_cases():
    assert len(CASES) >= 40


def test_the_damaged_cache_files_are_removed(world, tmp_path, monkeypatch, capsys):
    _cache_with_damaged_wikipedia(monkeypatch, world, tmp_path)
    try:
        assert cli.main(["eval", str(world / "tiny"), "--ppl", "--seq-len", "32"]) == 2
    finally:
        data.wikipedia_articles.cache_clear()
    assert not (tmp_path / "cache" / "assets" / "wikipedia" / assets.WIKI_BZ2).exists()
    _cache_with_damaged_arrow(monkeypatch, world, tmp_path / "z")
    assert cli.main(["eval", str(world / "tiny"), "--zero-shot", "arc_easy", "--limit", "1"]) == 2
    assert not (tmp_path / "z" / "cache" / "assets" / "zero-shot" / "hf_datasets").exists()
    assert "run the command again" in capsys.readouterr().err


# ---- signals: a subprocess each --------------------------------------------------------------------------

SLOW_PRUNE = textwrap.dedent("""
    import signal, sys, time
    # a test run started in the background (nohup, &) inherits SIGINT ignored: act as a terminal's Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from structlm import cli, export
    real = export.write_checkpoint
    def slow(*a, **kw):
        kind = real(*a, **kw)                      # the checkpoint is in the staging folder...
        open({marker!r}, "w").close()
        time.sleep(60)                             # ...when the signal comes
        return kind
    export.write_checkpoint = slow
    sys.exit(cli.main({argv!r}))
""")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_during_save_cleans_up(world, tmp_path, sig, code, word):
    root = tmp_path / "run"
    root.mkdir()
    marker = tmp_path / "writing"
    argv = [a.format(w=world, tmp=tmp_path) for a in SHORTGPT] + ["--out", str(root / "new" / "out")]
    script = SLOW_PRUNE.format(marker=str(marker), argv=argv)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                                 "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1][-2000:]
    assert list(root.rglob("*.partial-*")) and list(root.rglob("*.lock"))  # staged and locked...
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert word in err and "Traceback" not in err
    assert list(root.iterdir()) == []  # ...and all of it gone, the created parent folder included
