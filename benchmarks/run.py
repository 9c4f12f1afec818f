"""Quality, speed and cost of structlm's methods against Torch-Pruning, in one run and one table.

    .venv/bin/python benchmarks/run.py --suite layer --models smollm2-135m --targets 0.8
    .venv/bin/python benchmarks/run.py --suite width --models smollm2-135m,gemma3-270m --targets 0.9,0.8,0.7,0.5
    .venv/bin/python benchmarks/run.py --suite all            # everything the issues ask for (hours on 2 cores)

For every model: the dense model is evaluated once; then, for every target (fraction of
parameters kept) and every method, a fresh copy is pruned (scoring + shrinking timed, peak extra
RAM sampled) and evaluated: held-out perplexity (window 2048 on the first --eval-tokens tokens of
the built-in Wikipedia held-out split), zero-shot average (ARC-e, ARC-c, PIQA, HellaSwag,
WinoGrande, BoolQ on the first --limit items each), parameters, CPU prefill and decode latency.
The anchor, Torch-Pruning 1.6.1's own LLM recipe (structlm.anchors), runs in the same process
on the same model, its ratio searched to the same parameter count.

Rows are appended to benchmarks/results/<suite>.json as they finish (a rerun skips rows that
are already there unless --fresh, which discards the suite's rows, or --replace, which reruns the
rows of the named --methods at the --targets and puts each new row in the old one's place), and
benchmarks/results/<suite>.md is rewritten each time.

    .venv/bin/python benchmarks/run.py --suite width --models smollm2-135m --methods llm_pruner --replace
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from structlm import data, evaluate, models, zeroshot
from structlm.anchors import tp_prune_to_params
from structlm.cli_prune import parse_option
from structlm.graph import build_graph
from structlm.methods._layers import finish_plan, target_reached
from structlm.pipeline import PeakMemory, make_plan
from structlm.surgery import shrink
from structlm.targets import parse_target

RESULTS = Path(__file__).resolve().parent / "results"
SUITES = {
    "layer": ["finercut", "shortgpt", "sleb", "last_blocks", "tp:l2"],
    "width": ["ziplm", "modegpt", "llm_pruner", "flap", "wanda_sp", "magnitude", "tp:l2", "tp:taylor-hidden-kept"],
}
DEFAULT_TARGETS = {"layer": [0.9, 0.8, 0.7], "width": [0.9, 0.8, 0.7, 0.5]}
# Options the benchmark passes (stated in the results); methods not listed run with their defaults.
METHOD_OPTIONS = {"sleb": {"screen_samples": 8, "lazy": True, "dtype": "auto"}}
# Greedy searches are sequential: the plan for a milder target is a prefix of the plan for a
# harsher one, so one search to the harshest target gives every row (time: up to that step).
GREEDY = ("finercut", "sleb")


def method_spec(spec: str) -> tuple[str, dict]:
    """A method with options, as rows name it: "wanda_sp[gqa=query_heads,layers=all]" ->
    ("wanda_sp", {"gqa": "query_heads", "layers": "all"}) on top of METHOD_OPTIONS."""
    name, _, rest = spec.partition("[")
    options = dict(METHOD_OPTIONS.get(name, {}))
    options.update(parse_option(item) for item in filter(None, rest.removesuffix("]").split(",")))
    return name, options


def split_methods(text: str) -> list[str]:
    """--methods "flap,wanda_sp[gqa=query_heads,layers=all]": commas inside brackets belong to the method."""
    return [m for m in re.split(r",(?![^\[]*\])", text) if m]
TASKS = ["arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq"]


COLLAPSED_PPL = 1000.0   # zero-shot is skipped above this perplexity: such a model scores at chance


LATENCY_ROUNDS = 3


def put_row(rows: list, row: dict) -> None:
    """Add ``row``; a row of the same method and target already there (--replace) is replaced in
    its place, so an interrupted rerun leaves the old row and the table keeps its order."""
    same = [j for j, r in enumerate(rows) if r["method"] == row["method"] and r["target"] == row["target"]]
    if not same:
        rows.append(row)
        return
    rows[same[0]] = row
    for j in reversed(same[1:]):
        del rows[j]


def paired_latency(model, dense=None, rounds: int = LATENCY_ROUNDS) -> dict:
    """CPU latency of ``model`` and, alternately in the same rounds, of ``dense``: the fastest of
    ``rounds`` (min is the robust estimate on a machine with other load; pruned and dense see the
    same conditions, so their ratio is the speedup)."""
    runs: dict = {"": [], "dense_": []}
    for _ in range(rounds):
        for prefix, m in (("", model), ("dense_", dense)):
            if m is not None:
                runs[prefix].append(evaluate.latency(m, batch_size=1, seq_len=128, decode_tokens=16, warmup=1,
                                                     repeats=1, progress=False))
    out = {}
    for prefix, got in runs.items():
        if got:
            out[f"{prefix}prefill_ms"] = min(r["prefill_ms"] for r in got)
            out[f"{prefix}decode_ms"] = min(r["decode_ms_per_token"] for r in got)
    return out


def speedups(row: dict, dense: dict) -> tuple[float, float]:
    """Dense time / pruned time, against the dense run measured beside the row when there is one."""
    prefill = row.get("dense_prefill_ms", dense["prefill_ms"]) / row["prefill_ms"]
    decode = row.get("dense_decode_ms", dense["decode_ms"]) / row["decode_ms"]
    return prefill, decode


def evaluate_row(model, tok, args, target: float | None = None, dense=None) -> dict:
    ppl = evaluate.perplexity(model, tok, seq_len=2048, max_tokens=args.eval_tokens, progress=False)
    row = {"ppl": ppl["ppl"], "ppl_tokens": ppl["tokens_scored"], "params": models.count_parameters(model)}
    wanted = target is None or args.zero_shot_targets is None or target in args.zero_shot_targets
    if ppl["ppl"] > COLLAPSED_PPL:
        row["zero_shot_skipped"] = f"collapsed (ppl > {COLLAPSED_PPL:g})"
    elif args.limit and wanted:
        zs = zeroshot.evaluate_zero_shot(model, tok, TASKS, limit=args.limit, progress=False)
        row["zero_shot_avg"] = zs["average"]["average_acc"]
        row["zero_shot"] = {t: zs[t]["acc"] for t in TASKS}
    row.update(paired_latency(model, dense))
    return row


class GreedyRun:
    """One greedy search to the harshest target; plans for milder targets are its prefixes.

    The search (removal order, seconds per step, peak RAM) is kept in the results JSON under
    ``searches``, so a resumed run reuses it instead of searching again."""

    def __init__(self, method: str, dense, calib, target: float, cache: dict | None = None):
        self.graph = build_graph(dense)
        self.method, options = method_spec(method)
        cached = (cache or {}).get(method)
        if cached and cached["target"] <= target and cached["options"] == options:
            self.info, self.seconds, self.peak = cached["info"], cached["seconds"], cached["peak_bytes"]
        else:
            with PeakMemory() as mem:
                _, info, stats = make_plan(dense, method=self.method, target=f"params={target}", calib=calib,
                                           graph=self.graph, options=dict(options))
            self.info = {"removal_order": info["removal_order"],
                         "steps": [{k: v for k, v in st.items() if k != "candidate_scores"} for st in info["steps"]],
                         "cost": info.get("cost")}
            self.seconds, self.peak = stats["score_seconds"], mem.extra_bytes
            if cache is not None:
                cache[method] = {"target": target, "options": options, "info": self.info,
                                 "seconds": self.seconds, "peak_bytes": self.peak}
        self.order = self.info["removal_order"]
        self.setup_seconds = self.seconds - sum(s["seconds"] for s in self.info["steps"])

    def plan(self, target: float):
        """(plan, seconds the search took to get there)."""
        plan, k = prefix_plan(self.graph, self.method, self.order, parse_target(f"params={target}"))
        return plan, self.setup_seconds + sum(s["seconds"] for s in self.info["steps"][:k])


def prefix_plan(graph, method: str, order: list[dict], goal):
    """The plan of the shortest prefix of a greedy search's removal ``order`` that meets ``goal``
    (a Target: what a search to ``goal`` itself gives, since it stops at that step), and its length."""
    removed = [(o["layer"], o["sublayer"]) for o in order]
    k = next(k for k in range(len(removed) + 1) if target_reached(graph, goal, removed[:k], method))
    return finish_plan(graph, removed[:k], order[:k], goal, method), k


def prune_row(method: str, dense, tok, calib, target: float, greedy: GreedyRun | None = None) -> tuple[object, dict]:
    """Prune a fresh copy of ``dense`` to keep ``target`` of its parameters.  Time and peak extra
    RAM cover scoring + shrinking of that copy (not the copy itself); Torch-Pruning's cover its
    whole ratio search, its working copies included."""
    model = None if method.startswith("tp:") else copy.deepcopy(dense)
    name, options = method_spec(method)
    start = time.perf_counter()
    score = {}
    with PeakMemory() as mem:
        if method.startswith("tp:"):
            importance = "taylor" if "taylor" in method else "l2"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, ratio, kept = tp_prune_to_params(
                    lambda: copy.deepcopy(dense), target, importance=importance, calib=calib[:10],
                    prune_hidden="hidden-kept" not in method)
            info = {"tp_ratio": round(ratio, 4), "note": "time and RAM include the ratio search (one TP run "
                                                         "on a fresh copy per try)"}
        elif greedy is not None:
            plan, search_seconds = greedy.plan(target)
            plan, _, _ = make_plan(model, plan=plan)
            shrink(model, plan)
            info = {"removed": _removed_text(plan), "options": options,
                    "plan": plan.to_dict(), "note": "prefix of one greedy search; time = search steps up to this target + shrink, "
                            "peak = the whole search's"}
            start -= search_seconds
            score = {"score_seconds": round(search_seconds, 1), "score_peak_extra_mib": round(greedy.peak / 2**20)}
        else:
            plan, _, stats = make_plan(model, method=name, target=f"params={target}", calib=calib,
                                       options=dict(options))
            shrink(model, plan)
            info = {"removed": _removed_text(plan), "options": options,
                    "plan": plan.to_dict(), "plan_meta": {k: v for k, v in plan.meta.items() if k != "removal_order"}}
            score = {"score_seconds": stats["score_seconds"],
                     "score_peak_extra_mib": round(stats["score_peak_extra_bytes"] / 2**20)}
    peak = max(mem.extra_bytes, greedy.peak if greedy is not None else 0)
    info.update(score, prune_seconds=round(time.perf_counter() - start, 1), prune_peak_extra_mib=round(peak / 2**20))
    return model, info


def _removed_text(plan) -> str:
    """What a layer plan removed, e.g. "blocks 5,13; attention 6,7; ffn 21" ("" for width plans)."""
    parts = [f"blocks {','.join(map(str, plan.removed_blocks))}"] if plan.removed_blocks else []
    for kind in ("attention", "ffn"):
        layers = [str(i) for i, lp in sorted(plan.layers.items()) if getattr(lp, kind) is False]
        if layers:
            parts.append(f"{kind} {','.join(layers)}")
    return "; ".join(parts)


def rebuild(row: dict, dense, calib):
    """The pruned model of a finished row, rebuilt from its plan (or removal text) or TP ratio."""
    from structlm.methods._layers import plan_from_removed
    from structlm.plan import PrunePlan

    model = copy.deepcopy(dense)
    if row["method"].startswith("tp:"):
        from structlm.anchors import tp_prune

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tp_prune(model, row["tp_ratio"], importance="taylor" if "taylor" in row["method"] else "l2",
                            calib=calib[:10], prune_hidden="hidden-kept" not in row["method"])
    if "plan" in row:
        plan = PrunePlan.from_dict(row["plan"])
    else:  # rows written before plans were stored: "blocks 5,13; attention 6,7; ffn 21"
        removed = []
        for part in filter(None, row["removed"].split("; ")):
            kind, _, layers = part.partition(" ")
            removed += [(int(i), {"blocks": "block"}.get(kind, kind)) for i in layers.split(",")]
        plan = plan_from_removed(build_graph(dense), removed)
    plan, _, _ = make_plan(model, plan=plan)
    return shrink(model, plan)


def write_markdown(results_dir: Path, suite: str, result: dict) -> None:
    lines = [f"# Benchmark: {suite} methods vs Torch-Pruning", "",
             "Commands (a rerun resumes: it adds the rows that are missing): "
             + "; ".join(f"`{c}`" for c in result.get("commands", [result["command"]])) + "  ", f"Machine: {result['machine']}; torch {result['torch']}, "
             f"{result['threads']} threads. Perplexity: held-out Wikipedia, window 2048, first {result['eval_tokens']} "
             f"tokens. Zero-shot: mean acc over {', '.join(TASKS)}, first {result['limit']} items each "
             f"(lm-eval-harness scoring, see docs/zero-shot.md; '-': not run at this target "
             f"{result.get('zero_shot_targets') or ''}, 'collapsed': skipped because ppl > {COLLAPSED_PPL:g}). Latency: CPU, batch 1 x 128 prefill, "
             f"per-token decode with KV cache (16 tokens), fastest of {LATENCY_ROUNDS} rounds in which the pruned and the "
             f"dense model run alternately; speedups are against that dense run. Ratios are pruned / dense (speedup = dense time / pruned time). "
             f"Prune time and peak extra RAM: scoring + shrinking (Torch-Pruning: its ratio search included); "
             f"RAM is growth of the process's peak RSS, so memory freed by earlier rows and reused can make a "
             f"later row read low (each method's first row in a run is the one to trust). "
             f"Method options: {json.dumps(METHOD_OPTIONS)} (others: defaults); greedy searches "
             f"({', '.join(GREEDY)}) run once to the harshest target and milder targets use the prefix "
             f"of its removal order (time up to that step).", ""]
    for model_name, block in result["models"].items():
        dense = block["dense"]
        lines += [f"## {model_name}", "",
                  f"Dense: {dense['params'] / 1e6:.1f} M params, ppl {dense['ppl']:.2f}"
                  + (f", zero-shot avg {dense['zero_shot_avg']:.3f}" if "zero_shot_avg" in dense else "")
                  + f", prefill {dense['prefill_ms']:.0f} ms, decode {dense['decode_ms']:.1f} ms/token.", "",
                  "| target kept | method | params kept | ppl | ppl / dense | zero-shot avg | prefill speedup | decode speedup | prune s | prune peak extra MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        order = {m: k for k, m in enumerate(SUITES.get(suite, []))}
        rows = sorted(block["rows"], key=lambda r: (-r["target"], order.get(r["method"], len(order)), r["method"]))
        for row in rows:
            if "error" in row:   # its message is listed below the table
                kind = "out of reach" if "out of reach" in row["error"] else row["error"].partition(":")[0]
                lines.append(f"| {row['target']:.0%} | {row['method']} | {kind} (below) |" + " - |" * 7)
                continue
            zs = f"{row['zero_shot_avg']:.3f}" if "zero_shot_avg" in row else (
                "collapsed" if "zero_shot_skipped" in row else "-")
            prefill_x, decode_x = speedups(row, dense)
            lines.append(
                f"| {row['target']:.0%} | {row['method']} | {row['params'] / dense['params']:.1%} | {row['ppl']:.4g} | "
                f"x{row['ppl'] / dense['ppl']:.3g} | {zs} | x{prefill_x:.2f} | "
                f"x{decode_x:.2f} | {row['prune_seconds']} | {row['prune_peak_extra_mib']} |")
        lines.append("")
        details = [f"- {row['target']:.0%} {row['method']}: " + (row.get("removed") or row.get("error") or "")
                   for row in rows if row.get("removed") or row.get("error")]
        if details:
            lines += ["Removed (layer methods) and errors:", "", *details, ""]
    (results_dir / f"{suite}.md").write_text("\n".join(lines) + "\n")


def write_summary(results_dir: Path) -> None:
    """summary.md: at every target both suites ran, the best layer method, the best width method
    and the best Torch-Pruning run side by side (best = lowest held-out perplexity)."""
    suites = {name: json.loads((results_dir / f"{name}.json").read_text())
              for name in SUITES if (results_dir / f"{name}.json").exists()}
    if len(suites) < len(SUITES):
        return
    lines = ["# Best layer method vs best width method vs Torch-Pruning", "",
             "Best = lowest held-out perplexity at the target, from `layer.md` and `width.md` (same protocol, "
             "same dense model), among the rows that reach it (at most 1 point more parameters kept) where any does; "
             "Torch-Pruning: the best of its runs in either suite.", ""]
    for model_name in suites["layer"]["models"]:
        blocks = {name: r["models"].get(model_name) for name, r in suites.items()}
        if not all(blocks.values()):
            continue
        dense = blocks["layer"]["dense"]
        lines += [f"## {model_name}", "", "| target kept | family | method | params kept | ppl | zero-shot avg | "
                  "prefill speedup | decode speedup |", "|---|---|---|---|---|---|---|---|"]
        targets = sorted({r["target"] for b in blocks.values() for r in b["rows"]}, reverse=True)
        for target in targets:
            picks = []
            for family, rows in (("layer", blocks["layer"]["rows"]), ("width", blocks["width"]["rows"]),
                                 ("Torch-Pruning", blocks["layer"]["rows"] + blocks["width"]["rows"])):
                ok = [r for r in rows if r["target"] == target and not math.isnan(r["ppl"])
                      and r["method"].startswith("tp:") == (family == "Torch-Pruning")]
                # a ratio search can stop short of the target: its rows count only if none reaches it
                reached = [r for r in ok if r["params"] / dense["params"] <= target + 0.01]
                if ok:
                    picks.append((family, min(reached or ok, key=lambda r: r["ppl"])))
            if len(picks) < 3:
                continue
            for family, r in picks:
                zs = f"{r['zero_shot_avg']:.3f}" if "zero_shot_avg" in r else "-"
                prefill_x, decode_x = speedups(r, dense)
                lines.append(f"| {target:.0%} | {family} | {r['method']} | {r['params'] / dense['params']:.1%} | "
                             f"{r['ppl']:.4g} | {zs} | x{prefill_x:.2f} | x{decode_x:.2f} |")
        lines.append("")
    (results_dir / "summary.md").write_text("\n".join(lines) + "\n")


def refresh_latency(result: dict, args, command: str) -> None:
    for model_name in args.models.split(","):
        block = result["models"].get(model_name)
        if not block:
            continue
        dense, tok = models.load_model(model_name)
        calib = data.calibration_samples(tok, args.calib_samples, args.calib_len)
        block["dense"].update(paired_latency(dense))
        for row in block["rows"]:
            if "error" in row or "dense_prefill_ms" in row:
                continue   # failed, or already measured beside the dense model
            if "plan" not in row and not row.get("removed") and "tp_ratio" not in row:
                continue
            print(f"latency: {model_name} {row['method']} {row['target']:.0%}", flush=True)
            model = rebuild(row, dense, calib)
            row.update(paired_latency(model, dense))
            del model
    result["latency_command"] = command


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=[*SUITES, "all"], required=True)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--targets", default=None, help="fractions of parameters kept, comma-separated")
    ap.add_argument("--methods", default=None,
                    help="methods, comma-separated: the suite's (default: all of them) or any registered one, "
                         "options in brackets: wanda_sp[gqa=query_heads,layers=all]")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--limit", type=int, default=100, help="zero-shot items per task (0: skip zero-shot)")
    ap.add_argument("--zero-shot-targets", default=None,
                    help="run zero-shot only at these targets, comma-separated (default: every target)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="discard earlier rows of this suite")
    ap.add_argument("--replace", action="store_true",
                    help="rerun the rows of the --methods at the --targets even where they are already there, each "
                         "new row taking the old one's place (other rows are kept; a greedy method searches again)")
    ap.add_argument("--refresh-latency", action="store_true",
                    help="only measure, beside the dense model, the latency of finished rows that were not measured "
                         "so (rows of older runs); the models are rebuilt from their plans")
    ap.add_argument("--results", type=Path, default=RESULTS, help="output folder")
    args = ap.parse_args(argv)
    if args.replace and not args.methods:
        ap.error("--replace reruns the rows of the methods you name: add --methods, e.g. --methods llm_pruner")
    if args.zero_shot_targets:
        args.zero_shot_targets = [float(t) for t in args.zero_shot_targets.split(",")]
    results_dir = args.results
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    torch.set_num_threads(args.threads)
    results_dir.mkdir(parents=True, exist_ok=True)
    for suite in suites:
        path = results_dir / f"{suite}.json"
        result = json.loads(path.read_text()) if path.exists() and not args.fresh else {"models": {}}
        command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
        if args.refresh_latency:
            refresh_latency(result, args, command)
            path.write_text(json.dumps(result, indent=1, default=str) + "\n")
            write_markdown(results_dir, suite, result)
            continue
        result["commands"] = [c for c in result.get("commands", [result["command"]] if "command" in result else [])
                              if c != command] + [command]
        result.update(command=command, machine=f"{platform.machine()} CPU", torch=torch.__version__, threads=args.threads,
                      eval_tokens=args.eval_tokens, limit=args.limit, zero_shot_targets=args.zero_shot_targets)
        methods_wanted = split_methods(args.methods) if args.methods else SUITES[suite]
        targets = [float(t) for t in args.targets.split(",")] if args.targets else DEFAULT_TARGETS[suite]
        for model_name in args.models.split(","):
            dense, tok = models.load_model(model_name)
            block = result["models"].setdefault(model_name, {"rows": []})
            if "dense" not in block:
                print(f"[{suite}] {model_name}: evaluating dense", flush=True)
                block["dense"] = evaluate_row(dense, tok, args)
            calib = data.calibration_samples(tok, args.calib_samples, args.calib_len)
            greedy_runs: dict = {}
            for target in targets:
                for method in methods_wanted:
                    if not args.replace and any(r["method"] == method and r["target"] == target
                                                for r in block["rows"]):
                        continue
                    print(f"[{suite}] {model_name}: {method} keeping {target:.0%}", flush=True)
                    try:
                        if method_spec(method)[0] in GREEDY and method not in greedy_runs:
                            if args.replace:   # its rows are recomputed, so is the search they are prefixes of
                                block.get("searches", {}).pop(method, None)
                            greedy_runs[method] = GreedyRun(method, dense, calib, min(targets),
                                                            block.setdefault("searches", {}))
                        model, info = prune_row(method, dense, tok, calib, target, greedy_runs.get(method))
                        row = {"method": method, "target": target, **info, **evaluate_row(model, tok, args, target, dense)}
                        del model
                    except Exception as e:  # a failing method is a result too; the run goes on
                        row = {"method": method, "target": target, "error": f"{type(e).__name__}: {e}",
                               "ppl": math.nan, "params": math.nan, "prefill_ms": math.nan, "decode_ms": math.nan,
                               "prune_seconds": "-", "prune_peak_extra_mib": "-"}
                    put_row(block["rows"], row)
                    print(f"    {json.dumps({k: v for k, v in row.items() if k != 'zero_shot'}, default=str)}", flush=True)
                    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
                    write_markdown(results_dir, suite, result)
            path.write_text(json.dumps(result, indent=1, default=str) + "\n")
            write_markdown(results_dir, suite, result)
    write_summary(results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
