#!/usr/bin/env python
"""Scale-out check: one recipe at several parallel layouts, plus resharded resumes.

    python bench/scale_out.py RECIPE [key.path=value ...] \
        --layout-a parallel.tp=2 parallel.pp=2 parallel.sequence_parallel=true \
        [--layout-a ANOTHER LAYOUT ...] \
        --layout-b parallel.tp=1 parallel.pp=1 parallel.sequence_parallel=false \
        [--nproc-a N] [--nproc-b N] [--steps 100] [--tolerance 2e-2] [--no-resume] \
        [--keep-finished] [--output runs/scale_out/<recipe>] [--out bench/results/scale_out_<recipe>.json]

e.g. TP 2 x PP 2 against one GPU, on 4 GPUs (on 8 GPUs add parallel.ep=2 to layout A):

    python bench/scale_out.py recipes/intra_1b_moe.yaml train.global_batch_size=32 \
        --layout-a parallel.tp=2 parallel.pp=2 --layout-b parallel.tp=1 parallel.pp=1 \
        parallel.sequence_parallel=false parallel.pipeline_stage_layers=null \
        --out bench/results/scale_out_intra_1b_moe_h100.json

and on 2 GPUs TP 2, EP 2 and TP 2 x EP 2 of the 350M intra MoE model against one
GPU: recipes/intra_350m_moe.yaml's header.

Overrides after RECIPE apply to every run; ``--layout-a``/``--layout-b`` are overrides too.
Every run goes through the user-facing launcher, ``launch/slurm.py --local`` (``--nproc``
defaults to what the launcher picks: the layout's smallest world size on CPU, one rank per
GPU of ``slurm.gpus_per_node`` on GPUs). Runs, each in ``<output>/<run>/``, in this order:

  init    layout B, 1 step at lr ~0: the shared initial weights. Initialisation is not
          layout-independent (TP shards are drawn from per-rank seeds on GPUs, pipeline stages
          draw only their own layers), so every run starts from this checkpoint
          (``checkpoint.init_from``) and any loss difference is the parallelism's, not the init's.
  b       STEPS steps at layout B from the init weights (saves no checkpoint).
  a       STEPS steps at layout A, same data order, checkpoint at STEPS/2 (the later ones are
          deleted after the run: at 1B+ each checkpoint is tens of GB). With several
          ``--layout-a`` the runs are a1, a2, ..., each followed by its resume.
  resume  A's step-STEPS/2 checkpoint (moved), resumed at layout B up to STEPS (resharding);
          resume_a1, ... for several A layouts; none with ``--no-resume``.

Checks (relative loss difference per step, max over steps, against ``--tolerance``):
each A vs B on steps 1..STEPS, and each resume vs its A on steps STEPS/2+1..STEPS.
Throughput: the median tokens/s per rank and MFU (GPUs only) of each layout from the trainer's
per-step records, without the first steps (allocation, compilation), and each A's whole-job
tokens/s over B's. The JSON record is written to ``--out`` (atomically) after every run, with
``complete`` false until the last one, so a time limit leaves what was measured; a later call
with ``--keep-finished`` keeps the finished runs and continues the others. Prints a markdown
summary. Exit codes: 0 all checks pass, 1 a check or a run failed, 2 bad input (one line on
stderr).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hybrid_megatron import runtime
from hybrid_megatron.atomic_output import write_json_atomically as write_json
from hybrid_megatron.errors import InputError
from hybrid_megatron.launch.plan import local_world
from hybrid_megatron.training.loss_log import LOSS_LOG

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "slurm.py"
THROUGHPUT_SKIP = 2  # first steps left out of throughput: allocation, compilation, warm caches


class BadInput(InputError):
    """A problem with the command line or the recipe: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- planning


def plan_layout(recipe: str, overrides: Sequence[str], nproc: int | None) -> tuple:
    """Validate one layout before anything runs.

    Takes the recipe path, every override of the run and the requested process count (None:
    the launcher's default). Returns ``(Recipe, nproc)``. Raises BadInput with one line when the
    recipe or an override is invalid or the layout does not fit ``nproc`` ranks.
    """
    from hybrid_megatron.config import derived, load_recipe

    try:
        loaded = load_recipe(recipe, overrides)
        nproc, _ = local_world(loaded, nproc)  # the launcher's own rule, as the runs will use
        derived(loaded, nproc, param_counter=lambda model: None)
    except InputError as err:  # the recipe's, or the launcher's UsageError
        raise BadInput(str(err)) from None
    return loaded, nproc


def run_overrides(
    run_dir: Path, steps: int, warmup: int, save_interval: int | None, init_from: Path | None
) -> list[str]:
    """The overrides that make a run self-contained: its own directory, STEPS steps, no MLflow.

    Takes the run directory, steps, warmup steps, the checkpoint interval (None: the run saves
    no checkpoint; at 1B+ each one holds tens of GB of optimizer state) and the initial
    weights (None: the recipe's own init). Returns override strings for launch/slurm.py.
    """
    return [
        f"checkpoint.dir={run_dir / 'checkpoints'}",  # run dir = its parent: logs, train_log.jsonl
        "checkpoint.resume=auto",
        f"checkpoint.interval={save_interval or steps + 1}",
        "checkpoint.keep_last=2",  # keep step STEPS/2 for the resharded resume
        "checkpoint.save_on_exit=false",
        f"checkpoint.init_from={init_from if init_from else 'null'}",
        "train.tokens=null",  # recipes with a token budget: steps instead
        f"train.steps={steps}",
        f"train.warmup_steps={warmup}",
        "train.log_interval=1",  # a throughput line every step
        "train.eval_iters=0",  # validation is not what is measured here
        "tracking.enabled=false",  # no MLflow server needed
    ]


def a_names(count: int) -> list[str]:
    """Run names of the A layouts: ``a`` for one, ``a1``, ``a2``, ... for several."""
    return ["a"] if count == 1 else [f"a{i}" for i in range(1, count + 1)]


def resume_name(a_name: str) -> str:
    """The run that resumes A layout ``a_name``'s middle checkpoint at layout B."""
    return "resume" if a_name == "a" else f"resume_{a_name}"


def logged_steps(name: str, steps: int) -> list[int]:
    """The steps run ``name`` logs when complete: init 1, a*/b 1..steps, resume* steps/2+1..steps."""
    if name == "init":
        return [1]
    if name.startswith("resume"):
        return list(range(steps // 2 + 1, steps + 1))
    return list(range(1, steps + 1))


def is_finished(run_dir: Path, name: str, steps: int) -> bool:
    """Whether ``run_dir`` holds a complete run ``name`` (every step logged, see logged_steps)."""
    return sorted(read_losses(run_dir)) == logged_steps(name, steps)


# ----------------------------------------------------------------------------- running


def launch(recipe: str, overrides: Sequence[str], nproc: int, run_dir: Path, label: str) -> int:
    """Run ``launch/slurm.py RECIPE OVERRIDES --local --nproc NPROC`` and wait.

    Streams its output prefixed with ``[label]`` and keeps it in ``<run_dir>/launcher.log``
    (the throughput lines are read back from there). Returns the launcher's exit code.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(LAUNCHER), recipe, *overrides, "--local", "--nproc", str(nproc)]
    print(f"[{label}] {' '.join(command)}", flush=True)
    with open(run_dir / "launcher.log", "w") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        for line in proc.stdout:
            log.write(line)
            print(f"[{label}] {line}", end="", flush=True)
        return proc.wait()


def keep_only_checkpoint(root: Path, step: int, steps: int) -> None:
    """Delete the checkpoints of steps 1..``steps`` under ``root`` except ``step`` (the one a
    resume starts from), which becomes ``latest``; frees disk between runs."""
    from hybrid_megatron.checkpoint_layout import step_dir_name, write_latest

    for other in range(1, steps + 1):
        if other != step and (root / step_dir_name(other)).is_dir():
            shutil.rmtree(root / step_dir_name(other))
    if (root / step_dir_name(step)).is_dir():
        write_latest(root, step_dir_name(step))


def move_checkpoint(src_root: Path, step: int, dst_root: Path) -> None:
    """Move checkpoint ``step`` of ``src_root`` into ``dst_root`` as its latest (the layout it was
    saved at does not matter to the loader). Nothing to do if ``dst_root`` already has it (a
    resume run that is being continued). Raises BadInput if that checkpoint is missing."""
    from hybrid_megatron.checkpoint_layout import LATEST, step_dir_name, write_latest

    name = step_dir_name(step)
    if (dst_root / name).is_dir():
        return
    if not (src_root / name).is_dir():
        raise BadInput(f"{src_root / name}: no checkpoint at step {step} (was it pruned?)")
    dst_root.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src_root / name), str(dst_root / name))
    write_latest(dst_root, name)
    (src_root / LATEST).unlink(missing_ok=True)  # it named the moved checkpoint


# ----------------------------------------------------------------------------- reading results


def read_train_log(run_dir: Path) -> dict[int, dict]:
    """Step -> the trainer's per-step record (loss as a float; tokens_per_s of the whole job;
    mfu per GPU, None on CPU) from a run's train_log.jsonl; {} if absent."""
    path = run_dir / LOSS_LOG
    records: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                loss = rec["loss"]
                rec["loss"] = float.fromhex(loss) if isinstance(loss, str) else float(loss)
                records[rec["step"]] = rec
    return records


def read_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss of a run (see read_train_log)."""
    return {step: rec["loss"] for step, rec in read_train_log(run_dir).items()}


def compare_losses(
    reference: dict[int, float], other: dict[int, float], steps: Sequence[int], tolerance: float
) -> dict:
    """Compare two runs' losses on exactly ``steps``.

    Takes step -> loss of the reference (its other steps are ignored) and of the other run (it
    must have logged exactly ``steps``), the expected steps and the relative tolerance. Returns
    ``{"steps", "max_rel_diff", "worst_step", "passed", "problem"}``: the largest
    ``|other - ref| / |ref|`` and its step; passed only if both runs logged exactly
    those steps, every loss is finite and the largest difference is within the tolerance.
    """
    steps = list(steps)
    wanted = set(steps)
    reference = {s: v for s, v in reference.items() if s in wanted}  # A's steps before a resume
    result = {
        "steps": [steps[0], steps[-1]] if steps else [],
        "max_rel_diff": None,
        "worst_step": None,
        "passed": False,
        "problem": None,
    }
    for name, losses in (("reference", reference), ("other", other)):
        if sorted(losses) != steps:  # e.g. a resume that did not resume logs steps 1..N
            result["problem"] = (
                f"{name} run logged steps {sorted(losses)[:3]}..., expected {steps[0]}..{steps[-1]}"
            )
            return result
        if not all(math.isfinite(losses[s]) for s in steps):
            result["problem"] = f"{name} run has non-finite losses"
            return result
    diffs = {s: abs(other[s] - reference[s]) / max(abs(reference[s]), 1e-12) for s in steps}
    worst = max(diffs, key=diffs.get)
    result.update(max_rel_diff=diffs[worst], worst_step=worst, passed=diffs[worst] <= tolerance)
    if not result["passed"]:
        result["problem"] = f"step {worst}: relative difference {diffs[worst]:.3g} > {tolerance:g}"
    return result


def read_throughput(records: dict[int, dict], nproc: int, skip: int = THROUGHPUT_SKIP) -> dict:
    """Median tokens/s per rank and MFU of a run.

    Takes the run's step -> record (read_train_log), its rank count and how many first steps to
    leave out. The trainer records tokens/s of the whole job and MFU per GPU (None on CPU).
    Returns ``{"tokens_per_s_per_rank", "mfu", "steps_measured"}`` (None values without records).
    """
    measured = [r for s, r in sorted(records.items()) if s > skip] or list(records.values())
    measured = [r for r in measured if r.get("tokens_per_s") is not None]
    if not measured:
        return {"tokens_per_s_per_rank": None, "mfu": None, "steps_measured": 0}
    mfus = [r["mfu"] for r in measured if r.get("mfu") is not None]
    return {
        "tokens_per_s_per_rank": statistics.median(r["tokens_per_s"] for r in measured) / nproc,
        "mfu": statistics.median(mfus) if mfus else None,
        "steps_measured": len(measured),
    }


def device_name() -> str:
    """The accelerator's name (``NVIDIA H100 80GB HBM3``), else the CPU's."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def speedup(layout: dict, reference: dict) -> float | None:
    """Whole-job tokens/s of ``layout`` over that of ``reference`` (read_throughput dicts plus
    ``nproc``); None when either has no throughput."""
    if not layout.get("tokens_per_s_per_rank") or not reference.get("tokens_per_s_per_rank"):
        return None
    return (layout["tokens_per_s_per_rank"] * layout["nproc"]) / (
        reference["tokens_per_s_per_rank"] * reference["nproc"]
    )


def markdown(record: dict) -> str:
    """A short markdown summary of a record: one throughput row per layout, one row per check."""

    def num(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    lines = [
        f"## scale-out: {record['recipe_name']} on {record['device']} ({record['date']})",
        "",
        "| layout | overrides | ranks | tokens/s per rank | MFU | job tokens/s vs B |",
        "|---|---|---|---|---|---|",
    ]
    for key, lay in record["layouts"].items():
        lines.append(
            f"| {key.upper()} | `{' '.join(lay['overrides'])}` | {lay['nproc']} | "
            f"{num(lay['tokens_per_s_per_rank'], ',.0f')} | {num(lay['mfu'], '.1%')} | "
            f"{num(lay.get('speedup_vs_b'), '.2f')}x |"
        )
    lines += [
        "",
        f"| check (tolerance {record['tolerance']:g}) | steps | max rel diff | result |",
        "|---|---|---|---|",
    ]
    for name, check in record["checks"].items():
        span = "..".join(map(str, check["steps"]))
        verdict = "pass" if check["passed"] else f"FAIL: {check['problem']}"
        lines.append(f"| {name} | {span} | {num(check['max_rel_diff'], '.3g')} | {verdict} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the module docstring)."""
    p = argparse.ArgumentParser(prog="bench/scale_out.py", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides for every run")
    p.add_argument(
        "--layout-a",
        nargs="+",
        required=True,
        action="append",
        metavar="key.path=value",
        help="overrides of an A layout (the larger one; its checkpoint is resumed at B); "
        "give it again for more layouts, each compared with the same B run",
    )
    p.add_argument(
        "--layout-b",
        nargs="+",
        required=True,
        metavar="key.path=value",
        help="overrides of layout B (the reference)",
    )
    p.add_argument(
        "--nproc-a", type=int, default=None, help="ranks of every A layout (default: the launcher's)"
    )
    p.add_argument("--nproc-b", type=int, default=None, help="ranks of layout B (default: the launcher's)")
    p.add_argument("--steps", type=int, default=100, help="training steps per layout (default 100)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=2e-2,
        help="max relative loss difference per step (default 2e-2, bf16; fp32 CPU: ~1e-4)",
    )
    p.add_argument("--no-resume", action="store_true", help="skip the resharded resumes")
    p.add_argument(
        "--keep-finished",
        action="store_true",
        help="keep the runs of an earlier call with the same --output that logged every "
        "step, and continue unfinished ones from their checkpoints, instead of starting over",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="folder of the run directories (default runs/scale_out/<recipe name>)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON record (default bench/results/scale_out_<recipe name>.json)",
    )
    return p


def build_record(
    args, recipe_name: str, common: list, layouts_run: dict, dirs: dict, failed: str | None, complete: bool
) -> dict:
    """The JSON record of the runs so far: per-layout throughput, losses and checks.

    Takes the parsed arguments, the recipe's name, the common overrides, layout name ->
    (overrides, nproc) for B and every A, run name -> directory, the first failure (None) and
    whether every planned run has been attempted. A check whose runs are missing or
    incomplete fails with the steps they did log.
    """
    steps, half = args.steps, args.steps // 2
    losses = {name: read_losses(path) for name, path in dirs.items() if name != "init"}
    checks = {}
    layouts = {}
    for key, (overrides, nproc) in layouts_run.items():
        layouts[key] = {
            "overrides": overrides,
            "nproc": nproc,
            **read_throughput(read_train_log(dirs[key]), nproc),
        }
    for key in layouts:
        if key == "b":
            continue
        layouts[key]["speedup_vs_b"] = speedup(layouts[key], layouts["b"])
        label = key.upper()
        checks[f"{label} vs B"] = compare_losses(
            losses["b"], losses[key], range(1, steps + 1), args.tolerance
        )
        if resume_name(key) in losses:
            checks[f"resume at B vs {label}"] = compare_losses(
                losses[key], losses[resume_name(key)], range(half + 1, steps + 1), args.tolerance
            )
    return {
        "benchmark": "scale_out",
        "device": device_name(),
        "host": socket.gethostname(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "recipe": args.recipe,
        "recipe_name": recipe_name,
        "common_overrides": common,
        "steps": steps,
        "resume_from_step": None if args.no_resume else half,
        "tolerance": args.tolerance,
        "layouts": layouts,
        "losses": {k: [v[s] for s in sorted(v)] for k, v in losses.items()},
        "checks": checks,
        "error": failed,
        "complete": complete,
        "passed": complete and failed is None and all(c["passed"] for c in checks.values()),
        "run_dirs": {k: str(v) for k, v in dirs.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run init/B/each A (+ its resume), check, write the record after every
    run. Returns the exit code."""
    args = build_parser().parse_intermixed_args(argv)
    runtime.setup()
    try:
        if args.steps < 2:
            raise BadInput(f"--steps {args.steps}: need at least 2 (the resume starts at steps/2)")
        if args.tolerance <= 0:
            raise BadInput(f"--tolerance {args.tolerance}: must be positive")
        if not Path(args.recipe).is_file():
            raise BadInput(f"{args.recipe}: recipe file not found")
        args.recipe = str(Path(args.recipe).resolve())  # the launcher runs with cwd = the repo
        common = list(args.overrides)
        over_b = common + args.layout_b
        recipe_b, nproc_b = plan_layout(args.recipe, over_b, args.nproc_b)
        layouts_a = {}  # name -> (layout overrides, all overrides, nproc)
        for name, layout in zip(a_names(len(args.layout_a)), args.layout_a):
            _, nproc = plan_layout(args.recipe, common + layout, args.nproc_a)
            layouts_a[name] = (layout, common + layout, nproc)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    steps, half = args.steps, args.steps // 2
    # Recipes with long warmups (2000 steps at 1B) would refuse a short run; the LR schedule
    # does not change what is compared, as long as every layout uses the same one.
    warmup = recipe_b.train.warmup_steps if recipe_b.train.warmup_steps < steps else steps // 10
    output = (args.output or ROOT / "runs" / "scale_out" / recipe_b.name).resolve()
    out_json = args.out or ROOT / "bench" / "results" / f"scale_out_{recipe_b.name}.json"
    init_ckpt = output / "init" / "checkpoints"
    # (name, overrides, nproc, the A run a resume starts from or None); B first: every A is
    # compared with it.
    runs = [
        # lr ~0: the checkpoint holds the seed's initial weights (one step must run to save).
        (
            "init",
            over_b + run_overrides(output / "init", 1, 0, 1, None) + ["train.lr=1e-30", "train.min_lr=0"],
            nproc_b,
            None,
        ),
        ("b", over_b + run_overrides(output / "b", steps, warmup, None, init_ckpt), nproc_b, None),
    ]
    for name, (_, over_a, nproc_a) in layouts_a.items():
        runs.append(
            (name, over_a + run_overrides(output / name, steps, warmup, half, init_ckpt), nproc_a, None)
        )
        if not args.no_resume:  # auto finds the moved step-`half` checkpoint; init_from is then unused
            runs.append(
                (
                    resume_name(name),
                    over_b + run_overrides(output / resume_name(name), steps, warmup, None, None),
                    nproc_b,
                    name,
                )
            )
    dirs = {name: output / name for name, _, _, _ in runs}
    layouts_run = {
        "b": (args.layout_b, nproc_b),
        **{name: (layout, nproc) for name, (layout, _, nproc) in layouts_a.items()},
    }
    for run_dir in dirs.values():  # train_log.jsonl is appended to: stale runs would mix in
        if run_dir.exists() and not args.keep_finished:
            shutil.rmtree(run_dir)

    failed = None
    for name, overrides, nproc, resumes in runs:
        if args.keep_finished and is_finished(dirs[name], name, steps):
            print(f"[{name}] kept: finished by an earlier call", flush=True)
            continue
        try:
            if resumes:  # starts from A's middle checkpoint, moved (disk)
                move_checkpoint(dirs[resumes] / "checkpoints", half, dirs[name] / "checkpoints")
        except BadInput as err:
            failed = str(err)
            break
        code = launch(args.recipe, overrides, nproc, dirs[name], name)
        if code != 0:
            failed = f"run {name} failed (launcher exit {code}; logs in {dirs[name]})"
            break
        if name in layouts_a:
            keep_only_checkpoint(dirs[name] / "checkpoints", half, steps)
        elif resumes:
            shutil.rmtree(dirs[name] / "checkpoints", ignore_errors=True)
        write_json(out_json, build_record(args, recipe_b.name, common, layouts_run, dirs, None, False))

    record = build_record(args, recipe_b.name, common, layouts_run, dirs, failed, True)
    write_json(out_json, record)
    print(markdown(record))
    print(f"\nrecord: {out_json}" + (f"\nerror: {failed}" if failed else ""))
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
