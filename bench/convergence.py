#!/usr/bin/env python3
"""Convergence checks of two training runs (or one), from their run folders or their records;
a JSON verdict and one PNG of the curves together.

    python bench/convergence.py final-val RUN_A RUN_B --out DIR [--name N] [--tolerance 0.01]
    python bench/convergence.py every-step RUN_A RUN_B --out DIR [--tolerance 0.001]
    python bench/convergence.py resume RUN_UNINTERRUPTED RUN_RESUMED --out DIR [--tolerance 0.001]
    python bench/convergence.py spikes RUN --out DIR [--spike-factor 1.25] [--spike-window 50]
    python bench/convergence.py record RUN_FOLDER --out DIR [--name N]   # DIR/N.record.json

``final-val``: the last validation losses (MLflow ``val/loss``) differ by at most the relative
tolerance (default 1%, e.g. FP8 against bf16). ``every-step``: every training step logged by
both runs differs by at most the tolerance (default 0.1%, e.g. CUDA graphs against eager).
``resume``: every step after the resumed run's restart (``--resumed-after``, or a step its log
repeats, else from step 1) equals the uninterrupted run's loss (verdict "bitwise" when all are
identical, "within tolerance" else). ``spikes``: no step's loss
exceeds ``spike-factor`` times the median of the previous ``spike-window`` steps (e.g. the MoE
run), with the expert-load figures (``moe/max_over_mean``) summarised when logged.

A run folder is the recipe's run directory: ``train_log.jsonl`` (every step's exact loss; a
resumed run appends) and ``checkpoints/`` (the saved recipe names the MLflow store, and
``mlflow_run_id`` the run). A run record (``NAME.record.json``, written by ``record``) stands in
for a finished run folder once the folder is gone (a GPU machine that starts bare), and gives
the same verdicts: one JSON file holding the loss log's lines as logged (a resumed run's
repeats too) with the step it resumed after, the run's MLflow metrics (``system/*`` left out),
the resolved recipe saved with its latest checkpoint and its identity (the corpus files digest
and tokenizer sha256 of the recipe's training data, the git commit, the CUDA device).
Each check also exports the runs' MLflow metrics to ``DIR/<name>_<run>_metrics.json``.
Exit status: 0 the check passed (or the record was written), 1 it failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hybrid_megatron.errors import InputError
from hybrid_megatron.training.loss_log import LOSS_LOG

REPO = Path(__file__).resolve().parents[1]
RECORD_SUFFIX = ".record.json"
RECORD_KEYS = ("name", "identity", "metrics", "train_log")

DEFAULT_TOLERANCE = {"final-val": 0.01, "every-step": 0.001, "resume": 0.001, "spikes": 0.0}


class ConvergenceInputError(InputError):
    """A run folder without what a check needs; the message names the folder."""


def is_record(run: str | Path) -> bool:
    """Whether ``run`` names a run record (``*.record.json``) rather than a run folder."""
    return str(run).endswith(RECORD_SUFFIX)


def read_record(path: str | Path) -> dict:
    """A run record (see `write_record`) as written; raises ConvergenceInputError naming the
    file when it cannot be read or lacks one of the parts the checks use."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConvergenceInputError(f"{path}: not a readable run record ({err})") from None
    missing = [key for key in RECORD_KEYS if not isinstance(record, dict) or key not in record]
    if missing:
        raise ConvergenceInputError(f"{path}: a run record needs {', '.join(missing)}")
    return record


def _log_entries(run: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, decoded line) for each step a run logged, in order: the lines of a run folder's
    ``train_log.jsonl`` or a record's ``train_log``."""
    if is_record(run):
        for index, entry in enumerate(read_record(run)["train_log"]):
            yield f"{run}: train_log[{index}]", entry
        return
    path = Path(run) / LOSS_LOG
    if not path.is_file():
        raise ConvergenceInputError(f"{run}: no {LOSS_LOG} (not a run folder?)")
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise ConvergenceInputError(f"{path}:{number}: not a loss record ({err})") from None
        yield f"{path}:{number}", entry


def read_loss_log(run: str | Path) -> tuple[dict[int, float], dict[int, str], int | None, dict]:
    """A run's training losses, from its folder or its record: (step -> loss, step -> exact hex
    text, the step the run resumed after (None if it never restarted), step -> ``moe/*``
    figures). A step logged twice (a restart repeated it) keeps its last record."""
    losses: dict[int, float] = {}
    exact: dict[int, str] = {}
    moe: dict[int, dict] = {}
    resumed_after, previous = None, 0
    for where, record in _log_entries(run):
        try:
            step, loss = int(record["step"]), record["loss"]
            value = float.fromhex(loss) if isinstance(loss, str) else float(loss)
        except (ValueError, KeyError, TypeError) as err:
            raise ConvergenceInputError(f"{where}: not a loss record ({err!r})") from None
        if step <= previous or (resumed_after is None and previous and step != previous + 1):
            resumed_after = step - 1 if resumed_after is None else resumed_after
        previous = step
        losses[step], exact[step] = value, loss if isinstance(loss, str) else value.hex()
        figures = {k: v for k, v in record.items() if k.startswith("moe/")}
        if figures:
            moe[step] = figures
    if not losses:
        raise ConvergenceInputError(f"{run}: no step logged")
    return losses, exact, resumed_after, moe


def mlflow_metrics(run: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric's history of a run: a record's exported metrics, or from a run folder's
    MLflow store (found through the recipe saved with the run's latest checkpoint and its
    ``mlflow_run_id``); {} when the run was not tracked."""
    if is_record(run):
        exported = read_record(run)["metrics"].items()
        return {key: [(int(s), float(v)) for s, v in history] for key, history in exported}
    from hybrid_megatron.checkpoint_layout import latest_checkpoint, read_saved_recipe

    ckpt = Path(run) / "checkpoints"
    id_file = ckpt / "mlflow_run_id"
    latest = latest_checkpoint(ckpt) if ckpt.is_dir() else None
    if latest is None or not id_file.is_file():
        return {}
    from mlflow.tracking import MlflowClient

    recipe = read_saved_recipe(latest)
    client = MlflowClient(tracking_uri=recipe.tracking_uri())
    run_id = id_file.read_text().strip()
    keys = client.get_run(run_id).data.metrics.keys()
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in sorted(keys)
        if not key.startswith("system/")
    }


def corpus_identity(path: str | Path) -> dict:
    """Which corpus and tokenizer a run trained on, from the corpus manifest
    (``PREFIX.manifest.json``) or a dataset's ``PREFIX.stats.json`` (both hold them):
    ``{"files_digest", "tokenizer_sha256", "source"}``; the two are None when the file is
    missing or does not say (a dataset not built from trees)."""
    try:
        facts = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        facts = {}
    tokenizer = facts.get("tokenizer") if isinstance(facts, dict) else None
    return {
        "files_digest": facts.get("files_digest") if isinstance(facts, dict) else None,
        "tokenizer_sha256": tokenizer.get("sha256") if isinstance(tokenizer, dict) else None,
        "source": str(path),
    }


def git_commit() -> str | None:
    """The repository's checked-out commit, or None outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def device_name() -> str | None:
    """The name of this machine's first CUDA device, or None without one."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def write_record(run_dir: str | Path, path: str | Path) -> dict:
    """Writes the record of the run in ``run_dir`` to ``path`` (``NAME.record.json``, one JSON
    file, atomically) and returns it: everything the checks read, so they run on it in place of
    the folder once the folder is gone (see the module docstring); under a few MB for 2,000
    steps."""
    from hybrid_megatron.atomic_output import write_json_atomically
    from hybrid_megatron.checkpoint_layout import latest_checkpoint, read_latest, read_saved_recipe

    if not is_record(path):
        raise ConvergenceInputError(f"{path}: a run record's name ends in {RECORD_SUFFIX}")
    losses, _, resumed_after, _ = read_loss_log(run_dir)
    ckpt = Path(run_dir) / "checkpoints"
    latest = latest_checkpoint(ckpt) if ckpt.is_dir() else None
    recipe = read_saved_recipe(latest) if latest is not None else None
    corpus = (
        corpus_identity(recipe.data.blend[0].prefix + ".stats.json")
        if recipe is not None
        else {"files_digest": None, "tokenizer_sha256": None, "source": None}
    )
    record = {
        "name": Path(path).name.removesuffix(RECORD_SUFFIX),
        "run_dir": str(run_dir),
        "last_step": max(losses),
        "checkpoint": read_latest(ckpt) if ckpt.is_dir() else None,
        "resumed_after": resumed_after,
        "identity": {
            "corpus_files_digest": corpus["files_digest"],
            "tokenizer_sha256": corpus["tokenizer_sha256"],
            "corpus_source": corpus["source"],
            "git_commit": git_commit(),
            "device": device_name(),
        },
        "recipe": recipe.to_dict() if recipe is not None else None,
        "metrics": mlflow_metrics(run_dir),
        "train_log": [entry for _, entry in _log_entries(run_dir)],
    }
    write_json_atomically(path, record)
    return record


def relative(a: float, b: float) -> float:
    """|a - b| / |b| (inf when b is 0 and a is not)."""
    if a == b:
        return 0.0
    return abs(a - b) / abs(b) if b else math.inf


def check_final_val(metrics_a: dict, metrics_b: dict, tolerance: float) -> dict:
    """The last ``val/loss`` of A against B's, relative to B's."""
    vals = []
    for label, metrics in (("a", metrics_a), ("b", metrics_b)):
        history = metrics.get("val/loss")
        if not history:
            raise ConvergenceInputError(f"run {label} has no val/loss in its MLflow store")
        vals.append(history[-1])
    (step_a, val_a), (step_b, val_b) = vals
    diff = relative(val_a, val_b)
    return {
        "passed": step_a == step_b and diff <= tolerance,
        "final_val_loss": {"a": val_a, "b": val_b, "step_a": step_a, "step_b": step_b},
        "relative_difference": diff,
    }


def check_every_step(losses_a: dict, losses_b: dict, tolerance: float, after: int = 0) -> dict:
    """Every step after ``after`` logged by both runs, A relative to B; both must log the same steps."""
    steps = sorted(s for s in set(losses_a) | set(losses_b) if s > after)
    missing = [s for s in steps if s not in losses_a or s not in losses_b]
    diffs = {s: relative(losses_a[s], losses_b[s]) for s in steps if s not in missing}
    worst = max(diffs, key=lambda s: diffs[s]) if diffs else None
    return {
        "passed": bool(diffs) and not missing and diffs[worst] <= tolerance,
        "steps_compared": len(diffs),
        "steps_missing": missing[:20],
        "max_relative_difference": diffs[worst] if worst is not None else None,
        "max_at_step": worst,
        "steps_over_tolerance": sum(d > tolerance for d in diffs.values()),
    }


def check_resume(run_a: tuple, run_b: tuple, tolerance: float, resumed_after: int | None = None) -> dict:
    """B (resumed) against A (uninterrupted) at every step after B's restart: the given step,
    else the one its loss log shows (a repeated step), else every step."""
    losses_a, exact_a, _, _ = run_a
    losses_b, exact_b, detected, _ = run_b
    resumed_after = resumed_after if resumed_after is not None else (detected or 0)
    result = check_every_step(losses_a, losses_b, tolerance, after=resumed_after)
    later = [s for s in sorted(losses_b) if s > resumed_after]
    bitwise = bool(later) and all(exact_a.get(s) == exact_b[s] for s in later)
    result.update(
        resumed_after_step=resumed_after,
        bitwise=bitwise,
        verdict="bitwise" if bitwise else ("within tolerance" if result["passed"] else "differs"),
        passed=bitwise or result["passed"],
    )
    return result


def check_spikes(losses: dict, moe: dict, factor: float, window: int) -> dict:
    """Steps whose loss exceeds ``factor`` x the median of the previous ``window`` steps."""
    steps = sorted(losses)
    spikes = []
    for i in range(window, len(steps)):
        median = statistics.median(losses[s] for s in steps[i - window : i])
        if losses[steps[i]] > factor * median:
            spikes.append(
                {"step": steps[i], "loss": losses[steps[i]], "over_median": losses[steps[i]] / median}
            )
    result: dict = {"passed": not spikes, "spikes": spikes[:50], "spike_count": len(spikes)}
    ratios = [(s, f["moe/max_over_mean"]) for s, f in sorted(moe.items()) if "moe/max_over_mean" in f]
    if ratios:
        result["expert_load"] = {
            "logged_steps": len(ratios),
            "max_over_mean_first": ratios[0][1],
            "max_over_mean_last": ratios[-1][1],
            "max_over_mean_worst": max(r for _, r in ratios),
        }
    return result


def plot(out_png: Path, title: str, runs: dict[str, tuple], val: dict[str, list]) -> None:
    """Training losses of every run (and validation points) over steps; with two runs a second
    panel shows their relative difference per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    two = len(runs) == 2
    fig, axes = plt.subplots(2 if two else 1, 1, figsize=(8, 7 if two else 4.5), squeeze=False)
    ax = axes[0][0]
    for label, (losses, *_rest) in runs.items():
        steps = sorted(losses)
        ax.plot(steps, [losses[s] for s in steps], label=f"{label} train", linewidth=0.8)
        if val.get(label):
            ax.plot(*zip(*val[label]), marker="o", linestyle="--", label=f"{label} val")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    if two:
        (la, *_), (lb, *_) = runs.values()
        common = sorted(set(la) & set(lb))
        axes[1][0].plot(common, [relative(la[s], lb[s]) for s in common], linewidth=0.8)
        axes[1][0].set_yscale("symlog", linthresh=1e-6)
        axes[1][0].set_ylabel("relative difference")
        axes[1][0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def run_check(args: argparse.Namespace) -> dict:
    """Runs the check the arguments name; writes the verdict JSON, the PNG and the exported
    metrics; returns the verdict."""
    check = args.check
    tolerance = DEFAULT_TOLERANCE[check] if args.tolerance is None else args.tolerance
    dirs = {"a": args.run_a} if check == "spikes" else {"a": args.run_a, "b": args.run_b}
    if check != "spikes" and not args.run_b:
        raise ConvergenceInputError(f"{check} compares two runs: give RUN_A and RUN_B")
    logs = {label: read_loss_log(d) for label, d in dirs.items()}
    metrics = {label: mlflow_metrics(d) for label, d in dirs.items()}
    out, name = Path(args.out), args.name or check
    out.mkdir(parents=True, exist_ok=True)
    for label, exported in metrics.items():
        (out / f"{name}_{label}_metrics.json").write_text(json.dumps(exported, indent=1) + "\n")
    if check == "final-val":
        result = check_final_val(metrics["a"], metrics["b"], tolerance)
    elif check == "every-step":
        result = check_every_step(logs["a"][0], logs["b"][0], tolerance)
    elif check == "resume":
        result = check_resume(logs["a"], logs["b"], tolerance, args.resumed_after)
    else:
        result = check_spikes(logs["a"][0], logs["a"][3], args.spike_factor, args.spike_window)
    verdict = {
        "check": check,
        "tolerance": tolerance,
        "runs": {label: str(d) for label, d in dirs.items()},
        "steps": {label: max(log[0]) for label, log in logs.items()},
        **result,
    }
    if check == "spikes":
        verdict.update(spike_factor=args.spike_factor, spike_window=args.spike_window)
    png = out / f"{name}.png"
    val = {label: m.get("val/loss", []) for label, m in metrics.items()}
    plot(png, f"{name}: {check} ({'pass' if verdict['passed'] else 'FAIL'})", logs, val)
    verdict["plot"] = str(png)
    (out / f"{name}.json").write_text(json.dumps(verdict, indent=2) + "\n")
    return verdict


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="convergence.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=[*sorted(DEFAULT_TOLERANCE), "record"])
    parser.add_argument(
        "run_a",
        help="run folder or NAME.record.json (resume: the uninterrupted run; record: a run folder)",
    )
    parser.add_argument("run_b", nargs="?", help="second run folder or record (resume: the resumed run)")
    parser.add_argument(
        "--out",
        required=True,
        help="folder for NAME.json, NAME.png and the exported metrics (record: NAME.record.json)",
    )
    parser.add_argument("--name", help="file name stem (default: the check; record: the run folder's name)")
    parser.add_argument(
        "--tolerance", type=float, help="relative tolerance (defaults: final-val 1%%, else 0.1%%)"
    )
    parser.add_argument(
        "--resumed-after",
        type=int,
        help="resume: the step the second run restarted from (default: a repeated step in its "
        "loss log, else every step is compared)",
    )
    parser.add_argument("--spike-factor", type=float, default=1.25)
    parser.add_argument("--spike-window", type=int, default=50)
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0 (passed), 1 (failed) or 2 (bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.check == "record":
            path = Path(args.out) / f"{args.name or Path(args.run_a).resolve().name}{RECORD_SUFFIX}"
            record = write_record(args.run_a, path)
            print(f"{path}: {record['last_step']} steps, {len(record['metrics'])} metrics")
            return 0
        verdict = run_check(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in verdict.items() if k not in ("spikes", "steps_missing", "runs")}
    print(json.dumps(summary, indent=1))
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
