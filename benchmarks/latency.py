"""Latency targets, measured: the latency model's error, ziplm's speedup targets checked end to end,
and every method at speedup targets against Torch-Pruning (quality vs measured speedup).

    .venv/bin/python benchmarks/latency.py --suite validate --models smollm2-135m,gemma3-270m
    .venv/bin/python benchmarks/latency.py --suite targets          # the acceptance run (SmolLM2, CPU)
    .venv/bin/python benchmarks/latency.py --suite methods --models smollm2-135m --speedups 1.25,1.5

* ``validate``: per model and regime (prefill 1x128, decode with a 128-token KV cache), the
  latency table (this machine's cached one, measured when missing) and the dense model plus six
  pruned plans on random weights timed end to end beside the dense model: predicted vs measured
  latency and speedup (structlm.latency.validate).
* ``targets``: ``structlm prune smollm2-135m --method ziplm --target speedup=1.25,1.5`` in the
  prefill regime and with ``--latency-regime decode``, then every checkpoint reloaded and timed
  against the dense model in its regime, paired, ``--rounds`` rounds (structlm.latency.measure_models).
* ``methods``: every method at each ``--speedups`` target (prefill table), held-out perplexity,
  zero-shot average (``--limit`` items per task) and measured speedup; Torch-Pruning at its params
  targets; a Pareto plot (perplexity vs measured speedup, one line per method).

Results: benchmarks/results/latency_<suite>.{json,md} (+ latency_pareto.png).  Timings need a
quiet machine: nothing else may run meanwhile (the numbers say so through their spread).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(HERE))

from structlm import evaluate, models, zeroshot   # noqa: E402
from structlm.graph import build_graph            # noqa: E402
from structlm.latency import Regime, measure_models, table_for   # noqa: E402
from structlm.latency.validate import validate_table               # noqa: E402

RESULTS_DIR = [HERE / "results"]   # --results replaces it
REGIMES = {"prefill": dict(phase="prefill", batch=1, seq=128), "decode": dict(phase="decode", batch=1, seq=128)}
METHODS = ["ziplm", "tp:l2", "tp:taylor-hidden-kept", "flap", "wanda_sp", "shortgpt", "modegpt", "llm_pruner", "magnitude", "sleb", "finercut"]
TASKS = ["arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq"]
PARETO_PPL_CAP = 3000.0         # the plot's perplexity axis ends here
GREEDY = ("finercut", "sleb")   # one search serves every target (prefixes of its removal order)


def environment(threads: int) -> dict:
    from structlm.latency.regime import device_name, software

    return {"device": device_name("cpu"), "threads": threads, **software(), "python": platform.python_version()}


def write(name: str, result: dict, markdown: str) -> None:
    RESULTS_DIR[0].mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR[0] / f"latency_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS_DIR[0] / f"latency_{name}.md").write_text(markdown)
    print(markdown)


def regime_for(name: str, threads: int) -> Regime:
    return Regime.here(**REGIMES[name], threads=threads)


def table_of(model_name: str, regime: Regime):
    config = models.load_config(model_name)
    graph = build_graph(config)
    table, _ = table_for(graph, config, regime)
    return config, graph, table


# ---- suite: validate -------------------------------------------------------------------------------

def suite_validate(args) -> None:
    path = RESULTS_DIR[0] / "latency_validation.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() and not args.fresh else []
    for model_name in args.models:
        for regime_name in args.regimes:
            regime = regime_for(regime_name, args.threads)
            config, graph, table = table_of(model_name, regime)
            result = validate_table(table, config, rounds=args.rounds)
            rows = [r for r in rows if (r["model"], r["regime"]) != (model_name, regime_name)]
            rows.append({"model": model_name, "regime": regime_name, "command": args.command,
                         "environment": environment(args.threads), "table": table.data, "validation": result})
            write("validation", {"rows": rows}, validation_markdown(rows))


def validation_markdown(rows: list) -> str:
    md = ["# Latency model: predicted vs measured", "",
          "Every plan is shrunk on random weights and timed end to end beside the dense model (paired; the "
          "speedup is the median ratio over the rounds, spread the inter-quartile range of the ratios). The table "
          "is this machine's cached table for the regime (probes of 8 identical layers, FFN grid every 64 "
          "channels, 12 rounds paired with the dense probe).", ""]
    for row in rows:
        table, result = row["table"], row["validation"]
        inter = table.get("interpolation", {})
        regime = Regime(**table["regime"])
        md += [f"## {row['model']}, {regime.describe()}", "", f"`{row['command']}`", "",
               f"Environment: {json.dumps(row['environment'])}", "",
               f"Table built in {table['built_seconds']:.0f} s; FFN interpolation error at off-grid widths: "
               f"max {100 * inter.get('max_rel_error', 0):.1f}%, mean {100 * inter.get('mean_rel_error', 0):.1f}%; "
               f"calibration factor {(table.get('calibration') or {}).get('factor', 1.0):.4f}; "
               f"{result['rounds']} rounds.", "",
               "| plan | predicted ms | measured ms | latency error | predicted speedup | measured speedup | "
               "speedup error | spread (IQR) |", "|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            md.append(f"| {r['plan']} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | "
                      f"{100 * r['latency_error']:+.1f}% | {r['predicted_speedup']:.3f} | "
                      f"{r['measured_speedup']:.3f} | {100 * r['speedup_error']:+.1f}% | {100 * r['spread']:.0f}% |")
        md += ["", f"Largest speedup error {100 * result['max_abs_speedup_error']:.1f}%, largest latency error "
                   f"{100 * result['max_abs_latency_error']:.1f}%.", ""]
    return "\n".join(md) + "\n"


# ---- suite: targets --------------------------------------------------------------------------------

def run_cli(argv: list[str]) -> None:
    print("$ structlm " + shlex.join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "structlm.cli", *argv], check=True)


def suite_targets(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_name = args.models[0]
    speedups = args.speedups
    target = "speedup=" + ",".join(f"{s:g}" for s in speedups)
    commands = {}
    levels = work / "levels"
    for regime_name in args.regimes:
        out = work / f"ziplm_{regime_name}"
        argv = ["prune", model_name, "--method", "ziplm", "--target", target, "--out", str(out),
                "--eval-tokens", str(args.eval_tokens), "--threads", str(args.threads)]
        if regime_name != "prefill":
            argv += ["--latency-regime", regime_name]
        argv += ["--levels", str(levels)] if (levels / "levels.json").is_file() else ["--save-levels", str(levels)]
        commands[regime_name] = "structlm " + shlex.join(argv)
        if not (out / "recipe.json").exists() and not any(out.glob("*/recipe.json")):
            run_cli(argv)
    dense, _ = models.load_model(model_name)
    rows = []
    for regime_name in args.regimes:
        regime = regime_for(regime_name, args.threads)
        out = work / f"ziplm_{regime_name}"
        variants = {"dense": dense}
        reports = {}
        for s in speedups:
            folder = out / f"speedup={s:g}"
            variants[f"speedup={s:g}"], _ = models.load_model(str(folder))
            reports[f"speedup={s:g}"] = json.loads((folder / "report.json").read_text())
        measured = measure_models(variants, regime, rounds=args.rounds)
        for name, report in reports.items():
            lat = report["method_info"]["latency"]
            asked = float(name.split("=")[1])
            m = measured[name]
            rows.append({"regime": regime_name, "target": name, "asked": asked,
                         "predicted_speedup": lat["predicted_speedup"], "measured_speedup": m["speedup"],
                         "measured_over_asked": m["speedup"] / asked, "spread": m["spread"],
                         "measured_ms": m["ms"], "dense_ms": measured["dense"]["ms"],
                         "ppl": ((report.get("after") or {}).get("perplexity") or {}).get("ppl"),
                         "dense_ppl": ((report.get("before") or {}).get("perplexity") or {}).get("ppl"),
                         "params_kept": report["stats"]["params_kept"],
                         "layers": [f"{e['attention'] or '-'}/{e['ffn'] or '-'}" for e in lat["layers"]],
                         "command": commands[regime_name]})
    md = ["# Latency targets: ziplm checkpoints measured against dense", "",
          f"`{args.command}`", "", f"Environment: {json.dumps(environment(args.threads))}", "",
          f"Each checkpoint was reloaded from disk and timed beside the dense model in its regime (paired, "
          f"{args.rounds} rounds, median ratio; spread = inter-quartile range of the ratios). Perplexity: held-out "
          f"Wikipedia, window 2048, first {args.eval_tokens} tokens (the prune command's own before/after).", "",
          "| regime | target | predicted | measured | measured / asked | spread | ppl (dense) | params kept | command |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['regime']} | {r['target']} | x{r['predicted_speedup']:.3f} | x{r['measured_speedup']:.3f} | "
                  f"{r['measured_over_asked']:.3f} | {100 * r['spread']:.0f}% | {r['ppl']:.2f} ({r['dense_ppl']:.2f}) | "
                  f"{100 * r['params_kept']:.1f}% | `{r['command']}` |")
    md += ["", "Per-layer configuration (attention KV groups x heads per group / FFN width; - = removed):", ""]
    for r in rows:
        md.append(f"- {r['regime']} {r['target']}: " + " ".join(r["layers"]))
    write("targets", {"command": args.command, "environment": environment(args.threads), "rows": rows},
          "\n".join(md) + "\n")


# ---- suite: methods --------------------------------------------------------------------------------

def suite_methods(args) -> None:
    """Two phases, so that the timing is one quiet round-robin run: ``prune`` makes every (method,
    target) checkpoint with its quality figures (no timing; any thread count, other work may run),
    ``time`` loads a model's checkpoints and times them beside the dense model, paired."""
    RESULTS_DIR[0].mkdir(parents=True, exist_ok=True)
    results_path = RESULTS_DIR[0] / "latency_methods.json"
    old = json.loads(results_path.read_text()) if results_path.exists() and not args.fresh else {"rows": []}
    # rows accumulate over runs, so does the record of where they ran: the first run's environment stays
    # "environment", a later run on another machine adds "environment_<date>" (methods_markdown lists them all)
    here = environment(args.threads)
    result = {**old, "command": old.get("command", args.command), "environment": old.get("environment", here),
              "rows": old["rows"], "timing": old.get("timing", {})}
    if here not in [v for k, v in result.items() if k.startswith("environment")]:
        result[f"environment_{time.strftime('%Y_%m_%d')}"] = here
    if args.phase in ("prune", "all"):
        result["command"] = args.command
        for model_name in args.models:
            prune_methods(args, model_name, result, results_path)
    if args.phase in ("time", "all"):
        result["timing_command"] = args.command
        for model_name in args.models:
            time_methods(args, model_name, result, results_path)
    results_path.write_text(json.dumps(result, indent=1) + "\n")
    write("methods", result, methods_markdown(result, args))
    pareto_plot(result["rows"], RESULTS_DIR[0] / "latency_pareto.png")


def checkpoint_path(args, model_name: str, method: str, key: str) -> Path:
    slug = "".join(c if c.isalnum() or c in "._=-" else "_" for c in f"{method}_{key}")
    return Path(args.work) / "methods" / model_name / f"{slug}.pt"


def prune_methods(args, model_name: str, result: dict, results_path: Path) -> None:
    """Prune ``model_name`` by every method at every target; the shrunk model is pickled whole
    (Torch-Pruning's models have per-layer shapes no config describes) for the timing phase."""
    from run import method_spec   # benchmarks/run.py: "m[k=v,...]" specs as the width suite names rows

    from structlm import data, methods
    from structlm.anchors import tp_prune_to_params
    from structlm.pipeline import latency_summary, make_plan
    from structlm.surgery import shrink

    rows = result["rows"]
    done = {(r["model"], r["method"], r["target"]) for r in rows}
    todo = [(m, t) for m in args.methods for t in (args.tp_params if m.startswith("tp:") else args.speedups)
            if (model_name, m, f"params={t:g}" if m.startswith("tp:") else f"speedup={t:g}") not in done]
    if not todo:
        return
    models.set_threads(args.work_threads)
    regime = regime_for("prefill", args.threads)       # the table of the timing regime, whatever threads prune
    dense, tok = models.load_model(model_name)
    graph = build_graph(dense)
    _, _, table = table_of(model_name, regime)
    calib = data.calibration_samples(tok, 32, 256)
    dense_ppl = evaluate.perplexity(dense, tok, seq_len=2048, max_tokens=args.eval_tokens, progress=False)["ppl"]
    levels = Path(args.work) / "methods" / model_name / "ziplm_levels"
    for spec in dict.fromkeys(m for m, _ in todo):
        name, options = ("tp", {}) if spec.startswith("tp:") else method_spec(spec)
        targets = [t for m, t in todo if m == spec]
        start = time.perf_counter()
        base = copy.deepcopy(dense)
        try:
            if name == "ziplm":
                options = {"progress": False, **options,
                           **({"levels": str(levels)} if (levels / "levels.json").is_file() else {"save_levels": str(levels)})}
            prepare = getattr(methods.get(name), "prepare", None) if name != "tp" else None
            if prepare:      # one scoring pass for every target (ziplm's level database)
                options = prepare(base, graph, calib, options)
        except ValueError as e:
            for t in targets:
                rows.append({"model": model_name, "method": spec, "target": f"speedup={t:g}", "refused": str(e)})
            continue
        shared = time.perf_counter() - start
        search = None
        if name in GREEDY and len(targets) > 1:
            # one greedy search to the harshest target: each milder target's plan is a prefix of its
            # removal order (the search stops at the first step that meets the target), timed to there
            try:
                _, search, search_stats = make_plan(base, method=name, target=f"speedup={max(targets):g}",
                                                    calib=calib, graph=graph, options=dict(options),
                                                    latency_table=table)
                search["search_seconds"] = search_stats["score_seconds"]
            except ValueError:
                search = None          # the harshest target is out of reach: each target searches alone
        for t in targets:
            key = f"params={t:g}" if name == "tp" else f"speedup={t:g}"
            start, search_info = time.perf_counter(), None
            try:
                if search is not None:
                    plan, seconds_to_here = greedy_prefix(graph, name, search, key, table)
                    model = copy.deepcopy(base)
                    shrink(model, plan, graph)
                    summary = latency_summary(table, graph, plan)
                    predicted = summary["predicted_speedup"]
                    layers = [f"{e['attention'] or '-'}/{e['ffn'] or '-'}" for e in summary["layers"]]
                    start = time.perf_counter() - seconds_to_here
                elif name == "tp":
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        model, _, _ = tp_prune_to_params(lambda: copy.deepcopy(dense), t,
                                                         importance="taylor" if "taylor" in spec else "l2",
                                                         calib=calib[:10], prune_hidden="hidden-kept" not in spec)
                    predicted, layers = None, None
                else:
                    plan, info, _ = make_plan(base, method=name, target=key, calib=calib, graph=graph,
                                              options=options, latency_table=table)
                    model = copy.deepcopy(base)
                    shrink(model, plan, graph)
                    predicted = info["latency"]["predicted_speedup"]
                    layers = [f"{e['attention'] or '-'}/{e['ffn'] or '-'}" for e in info["latency"]["layers"]]
                    if info.get("search", {}).get("method") == "evo":   # what the refinement found, in the row
                        search_info = {k: info["search"][k] for k in ("generations", "evaluations", "seconds",
                                                                     "fitness_dp", "fitness_best", "stopped")}
            except ValueError as e:          # a target the method cannot reach: recorded as such
                rows.append({"model": model_name, "method": spec, "target": key, "refused": str(e).splitlines()[0]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            seconds = time.perf_counter() - start + shared
            ppl = evaluate.perplexity(model, tok, seq_len=2048, max_tokens=args.eval_tokens, progress=False)["ppl"]
            row = {"model": model_name, "method": spec, "target": key, "predicted_speedup": predicted,
                   "ppl": ppl, "dense_ppl": dense_ppl, "params_kept": models.count_parameters(model) /
                   models.count_parameters(dense), "prune_seconds": round(seconds, 1), "layers": layers,
                   **({"search": search_info} if search_info else {})}
            if args.limit and ppl < 1000:
                zs = zeroshot.evaluate_zero_shot(model, tok, TASKS, limit=args.limit, progress=False)
                row["zero_shot_avg"] = zs["average"]["average_acc"]
            path = checkpoint_path(args, model_name, spec, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
            row["checkpoint"] = str(path)
            rows.append(row)
            print(json.dumps(row), flush=True)
            results_path.write_text(json.dumps(result, indent=1) + "\n")
            del model
        del base


def greedy_prefix(graph, method: str, info: dict, key: str, table):
    """The plan a greedy search (finercut, sleb) gives at target ``key``, from the removal order of
    a search to a harsher target, and the seconds that search took to get there."""
    from run import prefix_plan   # benchmarks/run.py: the same prefix rule for its params targets

    from structlm.targets import parse_target

    plan, k = prefix_plan(graph, method, info["removal_order"], parse_target(key).with_latency(table))
    steps = info.get("steps", [])
    seconds = info.get("search_seconds", 0.0) - sum(st["seconds"] for st in steps) + sum(st["seconds"] for st in steps[:k])
    return plan, seconds


def time_methods(args, model_name: str, result: dict, results_path: Path) -> None:
    """Time every checkpoint of ``model_name`` beside the dense model, paired and round-robin, in
    groups of ``--group`` (memory); each group has the dense model as its reference."""
    models.set_threads(args.threads)
    regime = regime_for("prefill", args.threads)
    rows = [r for r in result["rows"] if r["model"] == model_name and "refused" not in r
            and (args.retime or "measured_speedup" not in r)]
    rows = [r for r in rows if Path(r.get("checkpoint", "")).is_file()]
    if not rows:
        return
    dense, _ = models.load_model(model_name)
    for g in range(0, len(rows), args.group):
        group = rows[g:g + args.group]
        variants = {"dense": dense}
        for r in group:
            variants[f"{r['method']} {r['target']}"] = torch.load(r["checkpoint"], weights_only=False).eval()
        measured = measure_models(variants, regime, rounds=args.rounds)
        for r in group:
            m = measured[f"{r['method']} {r['target']}"]
            r.update(measured_speedup=m["speedup"], spread=m["spread"], measured_ms=m["ms"],
                     dense_ms=measured["dense"]["ms"], timing_group=g // args.group)
        result["timing"][model_name] = {"regime": regime.describe(), "rounds": args.rounds, "group": args.group}
        results_path.write_text(json.dumps(result, indent=1) + "\n")
        del variants


def methods_markdown(result: dict, args) -> str:
    timing = result.get("timing", {})
    md = ["# Methods at latency targets (CPU prefill 1x128)", "",
          f"Pruning and quality: `{result['command']}`", "",
          f"Timing: `{result.get('timing_command', '(not run yet)')}`", "",
          "Environment: " + "; ".join(f"{k.removeprefix('environment').strip('_') or 'first run'}: {json.dumps(v)}"
                                      for k, v in result.items() if k.startswith("environment")), "",
          "Every method prunes to each speedup target priced by this machine's latency table (prefill 1x128, fp32, "
          "eager); Torch-Pruning runs at params targets (it has no latency target) and its measured speedup places "
          "it on the same axis. Measured speedup: each checkpoint timed beside the dense model in one paired "
          "round-robin run per group of checkpoints, median ratio over the rounds; spread = inter-quartile range "
          "of the ratios. " + "; ".join(f"{m}: {t['regime']}, {t['rounds']} rounds, groups of {t['group']}"
                                        for m, t in timing.items()) + ". "
          f"Perplexity: held-out Wikipedia, window 2048, first {args.eval_tokens} tokens; zero-shot: average "
          "accuracy over arc_easy, arc_challenge, piqa, hellaswag, winogrande, boolq (the first `--limit` items of "
          "each; skipped when ppl > 1000). Calibration 32 x 256 tokens.", "",
          "| model | method | target | predicted x | measured x | spread | ppl (dense) | zero-shot | params kept | prune s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "refused" in r:
            md.append(f"| {r['model']} | {r['method']} | {r['target']} | refused: {r['refused'][:160]} | | | | | | |")
            continue
        pred = f"x{r['predicted_speedup']:.3f}" if r.get("predicted_speedup") else "-"
        meas = f"x{r['measured_speedup']:.3f}" if r.get("measured_speedup") else "(not timed)"
        spread = f"{100 * r['spread']:.0f}%" if r.get("spread") is not None else "-"
        zs = f"{100 * r['zero_shot_avg']:.1f}" if r.get("zero_shot_avg") is not None else "-"
        md.append(f"| {r['model']} | {r['method']} | {r['target']} | {pred} | {meas} | {spread} | "
                  f"{r['ppl']:.2f} ({r['dense_ppl']:.2f}) | {zs} | {100 * r['params_kept']:.1f}% | "
                  f"{r.get('prune_seconds', '-')} |")
    md += ["", "Per-layer configuration of the latency-targeted plans (attention KV groups x heads per group / "
               "FFN width; - = removed):", ""]
    md += [f"- {r['model']} {r['method']} {r['target']}: " + " ".join(r["layers"])
           for r in result["rows"] if r.get("layers")]
    return "\n".join(md) + "\n"


def pareto_plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models_ = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models_), figsize=(6 * len(models_), 4.2), squeeze=False)
    for ax, model_name in zip(axes[0], models_):
        colours = plt.get_cmap("tab20").colors
        for k, method in enumerate(sorted({r["method"] for r in rows if r["model"] == model_name})):
            got = sorted((r["measured_speedup"], r["ppl"]) for r in rows
                         if r["model"] == model_name and r["method"] == method and r.get("measured_speedup"))
            if got:
                ax.plot([g[0] for g in got], [g[1] for g in got], marker="os^Dv<>ph*"[k % 10], label=method,
                        color=colours[(2 * k) % 20 + (k // 10) % 2])
        dense = [r["dense_ppl"] for r in rows if r["model"] == model_name and "dense_ppl" in r]
        if dense:
            ax.scatter([1.0], [dense[0]], marker="*", s=120, color="black", label="dense", zorder=5)
            ax.set_ylim(dense[0] * 0.8, PARETO_PPL_CAP)   # collapsed models (ppl in the millions) would hide the rest
        ax.set_yscale("log")
        ax.set_xlabel("measured speedup over dense (CPU prefill 1x128)")
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_title(f"{model_name} (ppl above {PARETO_PPL_CAP:g}: off the chart)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("validate", "targets", "methods"), required=True)
    ap.add_argument("--models", default="smollm2-135m", type=lambda s: s.split(","))
    ap.add_argument("--regimes", default="prefill,decode", type=lambda s: s.split(","))
    ap.add_argument("--speedups", default="1.25,1.5", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--tp-params", default="0.8,0.7", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--methods", default=",".join(METHODS),
                    help='methods with options as the width suite names them: "ziplm,ziplm[search=evo],flap"')
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--limit", type=int, default=0, help="zero-shot items per task (0: skip)")
    ap.add_argument("--work", default="/tmp/structlm-latency-bench", help="where the targets suite writes checkpoints")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--results", default=str(HERE / "results"), help="folder for the JSON, Markdown and plot")
    ap.add_argument("--phase", choices=("prune", "time", "all"), default="all",
                    help="methods suite: prune (checkpoints + quality, no timing), time (one quiet paired run), or both")
    ap.add_argument("--work-threads", type=int, default=None,
                    help="threads for pruning and evaluation in the methods suite (default: --threads); the latency "
                         "table and the timing always use --threads")
    ap.add_argument("--group", type=int, default=10, help="checkpoints timed together beside the dense model")
    ap.add_argument("--retime", action="store_true", help="time rows that already have a measured speedup again")
    args = ap.parse_args(argv)
    from run import split_methods

    args.methods = split_methods(args.methods)
    RESULTS_DIR[0] = Path(args.results)
    args.work_threads = args.work_threads or args.threads
    args.command = "python benchmarks/latency.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    models.set_threads(args.threads)
    {"validate": suite_validate, "targets": suite_targets, "methods": suite_methods}[args.suite](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
