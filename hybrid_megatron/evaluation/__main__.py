"""``python -m hybrid_megatron.evaluation <task> --checkpoint DIR [--checkpoint DIR2 ...]``.

Tasks: nll, generate, inference, extrapolation, niah. Every task writes ``<out>/<task>.json``
(one entry per checkpoint) and its plots, prints a summary, and with ``--mlflow`` logs the
numbers to each checkpoint's MLflow run (``eval/<task>/...``).

``python -m hybrid_megatron.evaluation lm-eval --model_args checkpoint=DIR --tasks T ...`` runs
lm-evaluation-harness (the ``eval`` extra) with the ``hybrid_megatron`` model registered; every
argument after ``lm-eval`` goes to lm_eval's own CLI (``--model`` defaults to hybrid_megatron).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (one subcommand per task)."""
    p = argparse.ArgumentParser(
        prog="python -m hybrid_megatron.evaluation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="task", required=True)

    def add(name, help_):
        s = sub.add_parser(name, help=help_)
        s.add_argument(
            "--checkpoint", action="append", required=True, help="checkpoint root or step dir (repeatable)"
        )
        s.add_argument("--out", default="eval_out", help="output directory (default eval_out)")
        s.add_argument("--mlflow", action="store_true", help="log results to each checkpoint's MLflow run")
        return s

    s = add("nll", "validation NLL and perplexity")
    s.add_argument("--tp", type=int, default=1)
    s.add_argument("--pp", type=int, default=1)
    s.add_argument("--eval-iters", type=int, default=None, help="global batches (default: the recipe's)")
    s.add_argument(
        "--data", default=None, help="held-out indexed dataset prefix (default: the trainer's validation set)"
    )
    s.add_argument("--num-samples", type=int, default=64, help="windows of seq_length from --data")
    s = add("generate", "generate text from a prompt")
    s.add_argument("--prompt", default="It is a truth universally acknowledged")
    s.add_argument("--max-new-tokens", type=int, default=48)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--no-cache", action="store_true")
    s = add("inference", "throughput with KV + SSM caching; measured vs accounted cache bytes")
    s.add_argument("--batch-sizes", type=_ints, default=[1, 4])
    s.add_argument("--contexts", type=_ints, default=[128, 512])
    s.add_argument("--new-tokens", type=int, default=16)
    s.add_argument("--repeats", type=int, default=1)
    s = add("extrapolation", "loss by position at 1x..8x the training length")
    s.add_argument("--multiples", type=_ints, default=[1, 2, 4, 8])
    s.add_argument("--num-sequences", type=int, default=2)
    s = add("niah", "needle-in-a-haystack pass-key retrieval")
    s.add_argument("--contexts", type=_ints, default=None, help="default: 0.5x,1x,2x,4x training length")
    s.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    s.add_argument("--trials", type=int, default=2)
    # Only listed here for --help: main() hands everything after "lm-eval" to lm_eval's CLI.
    s = sub.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-evaluation-harness tasks (arguments go to lm_eval's CLI, e.g. "
        "--model_args checkpoint=DIR --tasks T --include_path DIR)",
    )
    s.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    return p


def _flat(prefix: str, d: dict) -> dict[str, float]:
    return {
        f"{prefix}/{k}": v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def run(args) -> dict:
    """Run the parsed command; returns ``{label: result}`` (also written to ``<out>/<task>.json``).

    ``lm-eval`` returns ``{"exit_code": N}`` (lm_eval writes its own results).
    """
    if args.task == "lm-eval":
        from hybrid_megatron.evaluation.lm_eval_adapter import lm_eval_cli

        return {"exit_code": lm_eval_cli(args.lm_eval_args)}
    from hybrid_megatron.evaluation.common import checkpoint_label, load_for_eval, write_json

    out = Path(args.out)
    results: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    artifacts: dict[str, Any] = {}
    recipes: dict[str, Any] = {}
    for ckpt in args.checkpoint:
        label = checkpoint_label(ckpt)
        if label in results:
            label = f"{label}#{len(results)}"
        if args.task == "nll":
            from hybrid_megatron.evaluation.nll import run_nll

            res = run_nll(ckpt, args.tp, args.pp, args.eval_iters, args.data, args.num_samples)
            metrics[label] = _flat("eval/nll", {"nll": res["nll"], "perplexity": res["perplexity"]})
        elif args.task == "generate":
            from hybrid_megatron.evaluation.generation import run_generate

            res = run_generate(
                ckpt, args.prompt, args.max_new_tokens, not args.no_cache, args.temperature, args.top_k
            )
            metrics[label] = {}
        elif args.task == "inference":
            from hybrid_megatron.evaluation.inference import run_inference

            res = run_inference(ckpt, args.batch_sizes, args.contexts, args.new_tokens, args.repeats)
            metrics[label] = {
                f"eval/inference/decode_tok_s_b{r['batch']}_c{r['context']}": r["decode_tokens_per_s"]
                for r in res["throughput"]
            }
            metrics[label].update(
                {f"eval/inference/cache_bytes_c{c}": v["measured"]["total"] for c, v in res["cache"].items()}
            )
        elif args.task == "extrapolation":
            from hybrid_megatron.evaluation.extrapolation import extrapolation_curves

            recipe, model = load_for_eval(ckpt)
            res = extrapolation_curves(model, recipe, args.multiples, args.num_sequences)
            metrics[label] = {
                f"eval/extrapolation/loss_ctx{L}": v["mean_loss"] for L, v in res["contexts"].items()
            }
        elif args.task == "niah":
            from hybrid_megatron.data.tokenizer import load_tokenizer
            from hybrid_megatron.evaluation.niah import filler_tokens, niah_grid, plot_heatmap

            recipe, model = load_for_eval(ckpt)
            tok = load_tokenizer(recipe.data.tokenizer)
            seq = recipe.data.seq_length
            contexts = args.contexts or [seq // 2, seq, 2 * seq, 4 * seq]
            res = niah_grid(
                model, tok, filler_tokens(recipe, tok, max(contexts) * 2), contexts, args.depths, args.trials
            )
            png = plot_heatmap(res, out / f"niah_{label}.png", f"NIAH: {label}")
            artifacts.setdefault(label, []).append(png)
            acc = [a for row in res["accuracy"] for a in row]
            metrics[label] = {"eval/niah/mean_accuracy": sum(acc) / len(acc)}
        res["checkpoint"] = str(ckpt)
        results[label] = res
        recipes[label] = ckpt
    if args.task == "extrapolation":
        from hybrid_megatron.evaluation.extrapolation import plot_extrapolation

        png = plot_extrapolation(results, out / "extrapolation.png")
        for label in results:
            artifacts.setdefault(label, []).append(png)
    js = write_json(out / f"{args.task}.json", results)
    for label, res in results.items():
        print(f"{label}: " + json.dumps(_summary(args.task, res)))
    print(f"wrote {js}")
    if args.mlflow:
        from hybrid_megatron.checkpoint_layout import read_saved_recipe, resolve_checkpoint
        from hybrid_megatron.evaluation.mlflow_log import log_results

        for label, ckpt in recipes.items():
            recipe = read_saved_recipe(resolve_checkpoint(ckpt))
            run_id = log_results(ckpt, recipe, metrics[label], [js, *artifacts.get(label, [])])
            print(
                f"{label}: "
                + (f"logged to MLflow run {run_id}" if run_id else "no mlflow_run_id: not logged")
            )
    return results


def _summary(task: str, res: dict) -> dict:
    if task == "nll":
        return {k: res[k] for k in ("nll", "perplexity", "tokens")}
    if task == "generate":
        return {"completion": res["completion"]}
    if task == "inference":
        return {
            "cache_matches_accounting": res["cache_matches_accounting"],
            "decode_tokens_per_s": {
                f"b{r['batch']}xc{r['context']}": round(r["decode_tokens_per_s"], 1)
                for r in res["throughput"]
            },
        }
    if task == "extrapolation":
        return {L: round(v["mean_loss"], 4) for L, v in res["contexts"].items()}
    if task == "niah":
        return {"accuracy": res["accuracy"]}
    return {}


def main(argv=None) -> int:
    """CLI entry point; returns the exit code (1 with a one-line message on bad input)."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|apex).*")
    argv = sys.argv[1:] if argv is None else list(argv)
    from hybrid_megatron import runtime
    from hybrid_megatron.errors import InputError

    if argv[:1] == ["lm-eval"]:
        try:
            from hybrid_megatron.evaluation.lm_eval_adapter import lm_eval_cli
        except ImportError as exc:
            print(f"error: lm-eval needs lm_eval (pip install -e '.[eval]'): {exc}", file=sys.stderr)
            return 1
        runtime.setup()
        return lm_eval_cli(argv[1:])
    args = build_parser().parse_args(argv)
    runtime.setup()
    try:
        run(args)
    # Bad input: an unreadable checkpoint, tokenizer or data, a path that cannot be read.
    except (InputError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
