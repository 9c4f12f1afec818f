"""``structlm prune MODEL``: plan (by a method or from a file), shrink, save, evaluate before/after.

The order matters to a user: every argument is checked first, then the output folder is
reserved (checked, locked, staged: :class:`structlm.outputs.OutputFolder`), then the model is
loaded and what depends on it is checked (context length, block counts, disk space), and only
then does the long work start.  Every output file, the figure and the model card included, is
written into the staging folder, which is renamed into place at the very end."""

from __future__ import annotations

import argparse
import copy
import contextlib
import json
import platform
import shlex
import time
from pathlib import Path

from . import __version__, data, distributed, methods, models
from .cli_eval import (add_common_model_args, check_context, eval_lengths, evaluate_model, int_at_least,
                       load_model_arg)
from .plan import PrunePlan

DTYPES = ("auto", "float32", "bfloat16", "float16")
# methods whose streaming pass 1 sums its statistics over the ranks of a torchrun launch (structlm.distributed)
STREAM_DATA_PARALLEL = ("magnitude", "wanda_sp", "flap", "shortgpt", "shortgpt_angular", "last_blocks")
# method options that are sizes in every method that takes them (other options are checked by the methods)
POSITIVE_INT_OPTIONS = ("batch_size",)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prune", help="prune a model and save a smaller dense checkpoint",
        description="Prune MODEL by a method and a target, or by a hand-written plan (--plan), shrink the "
                    "tensors physically, save a checkpoint that loads with stock transformers into --out "
                    "(with plan.json, recipe.json, report.json and a README.md model card), and evaluate "
                    "before/after. Under torchrun (torchrun --nproc_per_node N -m structlm.cli prune ...) each "
                    "process calibrates on a share of the samples and the statistics are summed: the same plan, "
                    "written by rank 0 (docs/scale.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_model_args(p)
    how = p.add_argument_group("what to remove")
    how.add_argument("--plan", type=Path, help="a plan JSON file (format: docs/formats.md)")
    how.add_argument("--method", help=f"a pruning method: {', '.join(methods.available()) or 'none yet'} "
                                      f"(case and hyphens as in the papers are accepted: LLM-Pruner, Wanda-SP)")
    how.add_argument("--target", help="params=0.8 keeps 80%% of parameters; blocks=N or sublayers=N removes N; "
                                      "speedup=1.5 or latency_ms=20 as predicted by the latency table (see below); "
                                      "several, params=0.9,0.8,0.7, write one checkpoint each into OUT/params=0.9/ "
                                      "... from one scoring pass where the method allows (ziplm)")
    how.add_argument("--save-levels", type=Path, default=None, metavar="DIR",
                     help="ziplm: also write its level database (levels.json) into DIR, for --levels")
    how.add_argument("--levels", type=Path, default=None, metavar="DIR",
                     help="ziplm: reuse a level database written by --save-levels (no scoring pass)")
    how.add_argument("--align", type=int_at_least(1), default=None,
                     help="round kept FFN/hidden widths up to a multiple of N (default: the plan's, 8)")
    how.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                     help="a method option, repeatable: -O distance=kl -O screen_samples=16 (values read as "
                          "JSON where they parse: numbers, true/false, null; the options are in each method's "
                          "docs: docs/layer-methods.md, docs/width-methods.md)")
    how.add_argument("--dry-run", action="store_true", help="print the plan and its shapes, change nothing")
    lat = p.add_argument_group("latency targets (speedup=, latency_ms=)")
    lat.add_argument("--latency-table", type=Path, default=None, metavar="FILE",
                     help="price latency targets with this table (written by `structlm latency MODEL --out FILE`, "
                          "e.g. on the deployment machine); without it, this machine's cached table for "
                          "--latency-regime/--latency-batch/--latency-seq is used (measured on first use)")
    lat.add_argument("--latency-regime", choices=("prefill", "decode"), default="prefill",
                     help="the regime of this machine's table: prefill (a [batch, seq] prompt) or decode (one token "
                          "with a KV cache of seq tokens)")
    lat.add_argument("--latency-batch", type=int_at_least(1), default=1, help="batch of this machine's table")
    cal = p.add_argument_group("calibration")
    cal.add_argument("--calib-data", default=data.BUILTIN, help="calibration text (see structlm eval --data)")
    cal.add_argument("--calib-samples", type=int_at_least(1), default=32, help="number of calibration samples")
    cal.add_argument("--calib-len", type=int_at_least(2), default=256, help="tokens per calibration sample")
    cal.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="output folder (required unless --dry-run)")
    out.add_argument("--force", action="store_true", help="replace a non-empty --out")
    streaming = out.add_mutually_exclusive_group()
    streaming.add_argument("--stream", action="store_true",
                           help="streaming mode for models larger than memory: MODEL is a local safetensors folder, "
                                "read one decoder layer at a time (score, [calibrate,] then shrink and write shard by "
                                "shard); methods magnitude, wanda_sp, flap, ziplm, modegpt, shortgpt, "
                                "shortgpt_angular, last_blocks or a --plan; no before/after evaluation. Used by itself "
                                "when the float32 weights would not fit the available memory (docs/scale.md)")
    streaming.add_argument("--no-stream", action="store_true",
                           help="prune in memory even when the weights look too big for the available memory")
    out.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="dtype of the saved weights and of the before/after evaluation (scores are always "
                          "computed in float32). auto: the source checkpoint's dtype; float32 for the built-in "
                          "aliases and .gguf files, which are dequantized to float32. bfloat16 halves the size")
    ev = p.add_argument_group("evaluation before/after")
    ev.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    ev.add_argument("--eval-data", default=data.BUILTIN,
                    help="held-out text for the before/after perplexity (see structlm eval --data)")
    ev.add_argument("--eval-tokens", type=int_at_least(1), default=32768, help="held-out tokens for perplexity")
    ev.add_argument("--seq-len", type=int_at_least(2), default=2048, help="perplexity window")
    ev.add_argument("--latency-seq", type=int_at_least(1), default=128,
                    help="latency prompt length (of the before/after timing, and of this machine's latency table)")
    from .methods._width import add_method_args  # width-method flags (--prune-hidden, --gqa, ...)

    add_method_args(p)
    p.set_defaults(func=run)


# ---- checks that need no model -----------------------------------------------------------------

def _check_args(args) -> None:
    if args.plan is None and not (args.method and args.target):
        raise ValueError("say what to remove: --plan PLAN.json, or --method METHOD --target params=0.8")
    if args.plan is not None and args.method:
        raise ValueError("give either --plan or --method/--target, not both")
    if not args.dry_run and args.out is None:
        raise ValueError("--out DIR is required (or use --dry-run)")
    if args.option and not args.method:
        raise ValueError("-O/--option sets options of a --method; a --plan takes none")
    if args.method:
        from .targets import parse_targets

        methods.get(args.method)
        args.method = methods.canonical_name(args.method)  # "LLM-Pruner" is recorded as llm_pruner
        args.targets = parse_targets(args.target)
    else:
        args.targets = [None]
    if (args.levels or args.save_levels) and not hasattr(methods.get(args.method) if args.method else None,
                                                         "prepare"):
        raise ValueError("--levels/--save-levels hold a level database: only --method ziplm builds one")
    if args.levels is not None and not (args.levels / "levels.json").is_file():
        raise ValueError(f"--levels {args.levels}: no levels.json there (write one with --save-levels DIR)")
    if distributed.world_size() > 1 and args.method and any(t.is_latency for t in args.targets) \
            and args.latency_table is None:
        raise ValueError("under torchrun a latency target needs --latency-table FILE (each rank measuring this "
                         "machine's table would price the plans differently); write one first with structlm "
                         "latency MODEL --out FILE")
    if args.out is not None and not args.dry_run and distributed.is_main():   # only rank 0 writes
        from .outputs import check_output_path

        check_output_path(args.out, args.force)  # again, under a lock, when the output is reserved
        _check_not_the_source(args.out, args.model)


def _check_not_the_source(out: Path, model: str) -> None:
    """--out must not be (or contain) the model folder being pruned: --force would delete it."""
    kind, info = models.resolve(model)
    if kind not in ("folder", "gguf"):
        return
    source, target = Path(info["dir"]).resolve(), out.resolve()
    if target == source or target in source.parents:
        raise ValueError(f"--out {out} is or contains the model being pruned ({info['dir']}); "
                         f"write the pruned checkpoint to a new folder")


def parse_option(item: str) -> tuple[str, object]:
    """"KEY=VALUE" -> (key, value), the value read as JSON where it is JSON, else as text."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"-O {item!r}: write a method option as KEY=VALUE, e.g. -O screen_samples=16")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    key = key.strip()
    if key in POSITIVE_INT_OPTIONS and (isinstance(parsed, bool) or not isinstance(parsed, int) or parsed < 1):
        raise ValueError(f"-O {item}: {key} must be a positive whole number, e.g. -O {key}=4")
    return key, parsed


def _method_options(args) -> dict:
    """The width-method flags plus every -O KEY=VALUE."""
    from .methods._width import method_options

    options = method_options(args)
    if args.method in ("ziplm", "modegpt") and args.align is not None:   # their FFN widths are fitted at it
        options["align"] = args.align
    if args.method == "ziplm":   # its own flags: the alignment is its FFN step, and its level database
        if args.levels is not None:
            options["levels"] = str(args.levels)
        if args.save_levels is not None:
            options["save_levels"] = str(args.save_levels)
    options.update(parse_option(item) for item in args.option)
    if not distributed.is_main():   # only rank 0 writes (ziplm's level database too)
        options.pop("save_levels", None)
    return options


# ---- checks that need the model ----------------------------------------------------------------

def _check_against_model(args, model, tokenizer, graph, output) -> None:
    """Refuse, before calibration and scoring, what the model (or its tokenizer) cannot do."""
    evaluates = not args.dry_run and not args.no_eval
    lengths = {"--calib-len": args.calib_len} if args.method else {}
    if evaluates:
        lengths.update(eval_lengths(ppl=True, latency=True, seq_len=args.seq_len, latency_seq=args.latency_seq))
    check_context(model, lengths)
    if evaluates:  # the held-out text is read again after scoring; a bad --eval-data must not wait for that
        data.heldout_windows(tokenizer, seq_len=args.seq_len, max_tokens=args.eval_tokens, source=args.eval_data)
    fraction = 1.0
    if args.method:
        from .targets import check_fits

        for target in args.targets:
            check_fits(target, graph.n_layers)
        fraction = sum(t.value if t.kind == "params" else 1.0 for t in args.targets)
    if output is not None:
        weights = models.count_parameters(model) * _save_dtype(args).itemsize
        output.require_space(int(weights * fraction) + (16 << 20), "the checkpoint")


def _save_dtype(args):
    """--dtype, with auto read from the source checkpoint (float32 for aliases and .gguf files)."""
    import torch

    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    if models.resolve(args.model)[0] in ("alias", "gguf"):
        return torch.float32
    config = models.load_config(args.model)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


# ---- what is written ---------------------------------------------------------------------------

def _base_model(model_arg: str) -> str | None:
    """The hub id of the original model, for the model card (None where it is not known)."""
    from . import assets

    kind, info = models.resolve(model_arg)
    if kind == "alias":
        return assets.ASSETS[info["alias"]].extra.get("base_model")
    if kind == "hub":
        return info["id"]
    recipe = Path(info["dir"]) / "recipe.json"  # pruning a structlm output again: keep its base model
    if kind == "folder" and recipe.is_file():
        with contextlib.suppress(ValueError, OSError):
            return json.loads(recipe.read_text()).get("base_model")
    return None


def _recorded(options: dict) -> dict:
    """Options as the recipe records them: a level database built in this run is named, not dumped."""
    out = dict(options)
    if out.get("levels") is not None and not isinstance(out["levels"], str):
        out["levels"] = "built in this run" + (f", saved to {options['save_levels']}" if options.get("save_levels")
                                               else "")
    return out


def _recipe(args, options: dict, plan, dtype) -> dict:
    from . import assets

    kind, info = models.resolve(args.model)
    asset = assets.ASSETS.get(info.get("alias")) if kind == "alias" else None
    return {"structlm": __version__, "model": args.model, "base_model": _base_model(args.model),
            "source": f"{asset.description} from PyPI ({asset.wheels[0].package}), dequantized to float32"
            if asset else None, "license": asset.extra.get("license_id") if asset else None,
            "method": args.method, "target": args.target, "options": options,
            "plan_file": str(args.plan) if args.plan else None, "align": plan.align,
            "dtype": str(dtype).removeprefix("torch."),
            "calibration": None if args.plan else {"data": args.calib_data, "samples": args.calib_samples,
                                                     "tokens": args.calib_len, "seed": args.seed},
            "evaluation": None if args.no_eval else {"data": args.eval_data, "tokens": args.eval_tokens,
                                                      "window": args.seq_len, "latency_seq": args.latency_seq},
            "command": "structlm " + shlex.join(getattr(args, "argv", None) or ["prune", args.model])}


def _table(before: dict | None, after: dict, stats: dict) -> str:
    rows = [("params", f"{stats['params_before'] / 1e6:.2f} M", f"{stats['params_after'] / 1e6:.2f} M",
             f"{stats['params_kept']:.1%}")]
    if before and "perplexity" in before:
        b, a = before["perplexity"]["ppl"], after["perplexity"]["ppl"]
        rows.append((f"ppl (w{before['perplexity']['window']}, {before['perplexity']['tokens_scored']} tok)",
                     f"{b:.2f}", f"{a:.2f}", f"x{a / b:.2f}"))
    if before and "latency" in before:
        for key, label in (("prefill_ms", "prefill ms"), ("decode_ms_per_token", "decode ms/token")):
            b, a = before["latency"][key], after["latency"][key]
            rows.append((label, f"{b:.1f}", f"{a:.1f}", f"speedup x{b / a:.2f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"  {'':<{width}}  {'dense':>10}  {'pruned':>10}  ratio"]
    lines += [f"  {r[0]:<{width}}  {r[1]:>10}  {r[2]:>10}  {r[3]}" for r in rows]
    return "\n".join(lines)


def _latency_table(args, model, graph):
    """The latency table of this run: --latency-table, or this machine's for the --latency-* regime
    when a target needs one (None when no target is a latency target and no table is given)."""
    needs = args.method and any(t.is_latency for t in args.targets)
    if not needs and args.latency_table is None:
        return None
    from .latency import Regime
    from .pipeline import latency_table_for

    regime = None
    if args.latency_table is None:
        regime = Regime.here(args.latency_regime, args.latency_batch, args.latency_seq, device=args.device,
                             dtype=str(_save_dtype(args)).removeprefix("torch."), threads=args.threads)
    table = latency_table_for(model, graph, args.latency_table, regime)
    args.targets = [t.with_latency(table) if t is not None and t.is_latency else t for t in args.targets]
    return table


def _measured_here(table, args) -> bool:
    """Whether this machine is the one the table was measured on (then the pruned model is timed too)."""
    import torch

    from .latency.regime import device_name

    regime = table.regime
    return (regime.device.split(":")[0] == str(args.device).split(":")[0]
            and table.data["hardware"]["device_name"] == device_name(regime.device)
            and (regime.threads is None or regime.threads == torch.get_num_threads()))


# ---- the verb ----------------------------------------------------------------------------------

def _check_stream_args(args) -> Path:
    """What streaming mode cannot do, refused before any work (after _check_args); returns the
    checkpoint folder (a built-in alias streams from its converted safetensors folder in the cache)."""
    from .streaming.checkpoint import StreamError, checkpoint_files
    from .streaming.methods import REFUSED, refusal

    kind, info = models.resolve(args.model)
    if kind == "alias":
        folder = models._ensure_alias_folder(info["alias"])   # converted once (small models), then reused
    elif kind == "folder":
        folder = Path(info["dir"])
    else:
        raise StreamError(f"--stream reads a local Hugging Face folder with safetensors weights; {args.model!r} is "
                          f"{'a .gguf file' if kind == 'gguf' else 'a hub id'}, which is loaded (dequantised) in "
                          f"memory: prune it without --stream, or save it as a folder first (docs/scale.md)")
    checkpoint_files(folder)
    if args.method in REFUSED:
        raise StreamError(refusal(args.method))
    if len(args.targets) > 1:
        raise StreamError("--stream prunes to one target per run; give one --target (e.g. params=0.8)")
    if distributed.world_size() > 1 and args.method and args.method not in STREAM_DATA_PARALLEL:
        raise StreamError(f"--stream under torchrun: {args.method}'s streaming statistics are not summed over the "
                          f"ranks; stream it in one process, or use {', '.join(STREAM_DATA_PARALLEL)} (docs/scale.md)")
    return folder


def _auto_stream(args) -> dict | None:
    """Automatic streaming: when MODEL is a local safetensors folder whose float32 weights would not
    fit the available memory, switch a streamable method (or a --plan) to streaming mode, saying so
    in one line; refuse the others in one line instead of running out of memory.  Returns the
    memory estimate when it switched, else None."""
    from .streaming.auto import gib, memory_estimate
    from .streaming.checkpoint import StreamError
    from .streaming.methods import REFUSED, SUPPORTED

    kind, info = models.resolve(args.model)
    if kind != "folder":   # aliases are small; .gguf files and hub ids are loaded in memory (docs/scale.md)
        return None
    try:
        estimate = memory_estimate(info["dir"], args.device)
    except StreamError:   # not a safetensors folder: loaded in memory as before
        return None
    if estimate["fits"]:
        return None
    sizes = (f"its float32 weights ({gib(estimate['float32_weights_bytes'])}, about {gib(estimate['needed_bytes'])} "
             f"with the working margin) do not fit the available memory ({gib(estimate['available_bytes'])})")
    if args.method in REFUSED:
        raise StreamError(f"{args.model} is too big to prune in memory here: {sizes}, and {args.method} cannot stream "
                          f"({REFUSED[args.method]}). Fix: a streamable method ({', '.join(SUPPORTED)}), a machine with "
                          f"more memory, or --no-stream to try in memory anyway")
    if len(args.targets) > 1:
        raise StreamError(f"{args.model} is too big to prune in memory here: {sizes}, and streaming mode prunes one "
                          f"target per run. Fix: one --target per run, or --no-stream to try in memory anyway")
    print(f"streaming mode: {sizes}, so {args.model} is pruned one decoder layer at a time (as with --stream; "
          f"--no-stream forces in memory)")
    return estimate


def _run_stream(args, options: dict, plan, auto: dict | None = None) -> int:
    """``structlm prune MODEL_DIR --stream``: :func:`structlm.streaming.stream_prune`."""
    from transformers import AutoConfig

    from .streaming import stream_prune

    with distributed.main_first():   # a built-in alias is converted once, by rank 0
        folder = _check_stream_args(args)
    config = AutoConfig.from_pretrained(folder)
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if args.method and limit and args.calib_len > limit:
        raise ValueError(f"--calib-len asks for {args.calib_len} tokens, more than the model's context of {limit} "
                         f"(max_position_embeddings); use at most {limit}")
    models.set_threads(args.threads)
    calib = tokenizer = None
    if args.method:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError):
            raise ValueError(f"--stream: {folder} has no tokenizer to draw calibration samples with; add one "
                             f"(tokenizer.save_pretrained) or use --plan") from None
        with distributed.main_first():   # the same seeded samples on every rank
            calib = data.calibration_samples(tokenizer, args.calib_samples, args.calib_len,
                                             source=args.calib_data, seed=args.seed)
    if not args.dry_run and not args.no_eval:
        print("streaming mode does not evaluate before/after (the whole model would be resident); evaluate the "
              f"output with: structlm eval {args.out}")
    regime = None
    target = args.targets[0]
    if target is not None and target.is_latency and args.latency_table is None:   # as in memory: this machine's table
        from .latency import Regime

        regime = Regime.here(args.latency_regime, args.latency_batch, args.latency_seq, device=args.device,
                             dtype=str(_save_dtype(args)).removeprefix("torch."), threads=args.threads)
    dry_run = args.dry_run or not distributed.is_main()   # under torchrun the other ranks only score
    mode = {"stream": {"automatic": True, "memory": auto}} if auto else {"stream": {"automatic": False}}
    result = stream_prune(folder, None if dry_run else args.out, method=args.method, target=args.target,
                          calib=calib, plan=plan, options=options, align=args.align, dtype=args.dtype,
                          tokenizer=tokenizer, device=args.device, force=args.force, dry_run=dry_run,
                          latency_table=args.latency_table, regime=regime, report=mode,
                          recipe=lambda p, dtype: {**_recipe(args, options, p, dtype), "mode": "stream"})
    print(result.plan.summary_text(result.graph))
    if "latency" in result.info:
        lat = result.info["latency"]
        budget = f", budget {lat['budget_ms']:.2f} ms" if "budget_ms" in lat else ""
        print(f"predicted latency: {lat['predicted_ms']:.2f} ms, x{lat['predicted_speedup']:.3f} of the dense "
              f"{lat['dense_predicted_ms']:.2f} ms{budget}")
    if dry_run:
        return 0
    s = result.stats
    print(f"  params {s['params_before']:,} -> {s['params_after']:,} ({s['params_kept']:.1%})")
    print(f"saved to {args.out} ({s['format']} checkpoint, {str(next(result.model.parameters()).dtype).removeprefix('torch.')}, "
          f"sharded safetensors, with a README.md model card)")
    return 0


def run(args) -> int:
    from . import export
    from .graph import build_graph
    from .pipeline import make_plan, prune
    from .targets import folder_name

    # under torchrun (structlm.distributed): join the process group; ranks other than 0 stay quiet
    args.device = distributed.init(args.device)
    distributed.quiet_other_ranks()
    main = distributed.is_main()
    _check_args(args)
    auto = None
    if not getattr(args, "stream", False) and not getattr(args, "no_stream", False):
        auto = _auto_stream(args)
        args.stream = auto is not None
    if getattr(args, "stream", False):
        return _run_stream(args, _method_options(args) if args.method else {},
                           PrunePlan.load(args.plan) if args.plan else None, auto)
    options = _method_options(args) if args.method else {}
    plan = PrunePlan.load(args.plan) if args.plan else None  # read (and schema-checked) before any work
    models.set_threads(args.threads)
    started = time.perf_counter()
    writes = not args.dry_run and main   # only rank 0 writes
    reserved = export.OutputFolder(args.out, args.force) if writes else contextlib.nullcontext()
    with reserved as output:
        with distributed.main_first():   # a first use of an alias converts it once, by rank 0
            model, tokenizer = load_model_arg(args.model, args.device)
        graph = build_graph(model)
        with distributed.main_first():   # reads the held-out text (a first use fetches and extracts it)
            _check_against_model(args, model, tokenizer, graph, output)
        table = _latency_table(args, model, graph)   # before scoring: measuring one takes minutes
        calib = None
        if plan is None:   # every rank draws the same samples (seeded); methods run their rank's share
            with distributed.main_first():
                calib = data.calibration_samples(tokenizer, args.calib_samples, args.calib_len,
                                                 source=args.calib_data, seed=args.seed).to(args.device)
        # a method with a one-pass database (ziplm's levels) builds it once for every target
        prepare = getattr(methods.get(args.method), "prepare", None) if args.method else None
        prepared = time.perf_counter()
        run_options = prepare(model, graph, calib, options) if prepare else options
        shared_seconds = round(time.perf_counter() - prepared, 2) if prepare else None
        plans = []
        for target in args.targets:
            plan_t, info, score_stats = make_plan(model, method=args.method, target=target, calib=calib,
                                                  plan=plan, align=args.align, graph=graph,
                                                  options=dict(run_options), latency_table=table)
            if len(args.targets) > 1:
                print(f"== {target}")
            print(plan_t.summary_text(graph))
            if "latency" in info:
                lat = info["latency"]
                budget = f", budget {lat['budget_ms']:.2f} ms" if "budget_ms" in lat else ""
                print(f"predicted latency: {lat['predicted_ms']:.2f} ms, x{lat['predicted_speedup']:.3f} of the dense "
                      f"{lat['dense_predicted_ms']:.2f} ms{budget} ({table.regime.describe()})")
            plans.append((target, plan_t, info, score_stats))
        if not writes:   # --dry-run, or a rank other than 0 (rank 0 shrinks, evaluates and writes)
            return 0

        dtype = _save_dtype(args)
        model.to(dtype)  # scored in float32 above; evaluated as it will be saved
        eval_kw = dict(ppl=True, latency=True, max_tokens=args.eval_tokens, seq_len=args.seq_len,
                       latency_seq=args.latency_seq, source=args.eval_data)
        before = None if args.no_eval else evaluate_model(model, tokenizer, **eval_kw)
        several = len(plans) > 1
        # on the table's own machine the pruned model is timed against the dense one in the table's regime
        # (paired): with one target the model is pruned in place, so a dense copy is kept for that
        time_here = table is not None and not args.no_eval and _measured_here(table, args)
        timed_dense = copy.deepcopy(model) if time_here and not several else model
        for target, plan_t, info, score_stats in plans:
            pruned = copy.deepcopy(model) if several else model
            result = prune(pruned, plan=plan_t)
            result.stats.update(score_stats)
            if shared_seconds is not None:   # the one scoring pass every target shares (ziplm's levels)
                result.stats["shared_score_seconds"] = shared_seconds
            after = None if args.no_eval else evaluate_model(pruned, tokenizer, **eval_kw)
            if time_here:
                from .latency import measure_models

                timed = measure_models({"dense": timed_dense, "pruned": pruned}, table.regime, rounds=9)
                info.setdefault("latency", {})["measured_here"] = {
                    "speedup": round(timed["pruned"]["speedup"], 4), "ms": round(timed["pruned"]["ms"], 3),
                    "dense_ms": round(timed["dense"]["ms"], 3), "spread": round(timed["pruned"]["spread"], 4),
                    "protocol": "paired with the dense model, 9 rounds (structlm.latency.measure_models)"}
            report = {"model": args.model, "method": args.method or "plan",
                      "target": str(target) if target is not None else None, "targets": args.target,
                      "stats": result.stats, "shapes": plan_t.shapes(graph), "before": before, "after": after,
                      "method_info": info,
                      "environment": {"python": platform.python_version(), "platform": platform.platform()},
                      "total_seconds": round(time.perf_counter() - started, 1)}
            folder = output.staging / folder_name(target) if several else output.staging
            folder.mkdir(exist_ok=True)
            if "layers" in info.get("latency", {}):
                from .figures import plot_latency

                plot_latency(info["latency"], graph, plan_t, folder / "latency.png")  # widths and time per layer
            if export.removes_sublayers(plan_t):
                from .figures import plot_removed

                plot_removed(plan_t, graph, folder / "removed.png")  # removed sublayers/blocks, in order
            recipe = _recipe(args, _recorded(run_options), plan_t, dtype)
            recipe["target"] = str(target) if target is not None else None
            kind = export.write_checkpoint(pruned, tokenizer, folder, plan=plan_t, recipe=recipe, report=report,
                                           name=f"{args.out.name}/{folder.name}" if several else args.out.name)
            if several:
                print(f"== {target}")
            print(_table(before, after or {}, result.stats) if before else
                  f"  params {result.stats['params_before']:,} -> {result.stats['params_after']:,}")
            del pruned
        output.commit()
    where = f"{args.out}/{{{','.join(folder_name(t) for t, *_ in plans)}}}" if several else str(args.out)
    print(f"saved to {where} ({kind} checkpoint, {str(dtype).removeprefix('torch.')}, with a README.md model card)")
    return 0
