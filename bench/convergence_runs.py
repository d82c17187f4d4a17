#!/usr/bin/env python3
"""The convergence runs on one GPU, in calls of limited length: builds the code corpus, then
runs (or continues) each run through ``launch/slurm.py --local`` until the call's budget is
spent, then runs the checks of the finished pairs (bench/convergence.py).

    python3 bench/convergence_runs.py [--budget-s 540] [--out DIR] [--only NAME ...]

Run it again in the next call: finished runs (latest checkpoint at step 2,000) are skipped,
an unfinished one continues from its latest checkpoint. At the budget, the running ranks get
SIGTERM, which makes the trainer save at the step boundary and stop. The run ``inter_resume``
is ``inter_bf16`` stopped by SIGTERM once it has logged step 1,000 and resumed: the resume
check compares it with ``inter_bf16`` at every later step. Runs live under
``runs/convergence/<name>/`` (ignored by git, so kept between calls on a warm machine), with
one MLflow store ``runs/convergence/mlruns.db``; ``--out`` receives the loss logs, the verdicts,
the PNGs and the exported MLflow metrics. Every launch command is printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "convergence"
STEPS = 2000
RESUME_STOP_STEP = 1000
INTER = "recipes/convergence/inter_100m_code.yaml"
INTRA = "recipes/convergence/intra_100m_code.yaml"
INTRA_MOE = "recipes/convergence/intra_100m_moe_code.yaml"

# name: (recipe, overrides); in priority order.
RUN_TABLE: dict[str, tuple[str, list[str]]] = {
    "inter_bf16": (INTER, []),
    "inter_resume": (INTER, []),
    "inter_fp8": (INTER, ["model.fp8=hybrid"]),
    "inter_graphs": (INTER, ["train.cuda_graphs=true"]),
    "intra_bf16": (INTRA, []),
    "intra_fp8": (INTRA, ["model.fp8=hybrid"]),
    "intra_moe": (INTRA_MOE, []),
}
# (check, name, runs...) for bench/convergence.py
CHECKS = [
    ("final-val", "inter_fp8_vs_bf16", "inter_fp8", "inter_bf16"),
    ("final-val", "intra_fp8_vs_bf16", "intra_fp8", "intra_bf16"),
    ("every-step", "inter_graphs_vs_eager", "inter_graphs", "inter_bf16"),
    ("resume", "inter_resume_vs_uninterrupted", "inter_bf16", "inter_resume"),
    ("spikes", "intra_moe_spikes", "intra_moe"),
]


def command(name: str) -> list[str]:
    """The launch command of a run."""
    recipe, overrides = RUN_TABLE[name]
    return [
        sys.executable,
        "launch/slurm.py",
        recipe,
        "--local",
        f"checkpoint.dir={RUNS / name / 'checkpoints'}",
        f"tracking.tracking_uri=sqlite:///{RUNS / 'mlruns.db'}",
        f"tracking.run_name=convergence-{name}",
        *overrides,
    ]


def latest_step(name: str) -> int:
    """The step of the run's latest checkpoint (0 without one)."""
    latest = RUNS / name / "checkpoints" / "latest"
    if not latest.is_file():
        return 0
    digits = latest.read_text().strip().removeprefix("step_")
    return int(digits) if digits.isdigit() else 0


def logged_step(name: str) -> int:
    """The last step in the run's loss log (0 without one)."""
    path = RUNS / name / "train_log.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def stop_ranks(launcher: subprocess.Popen) -> None:
    """SIGTERM to the ranks through submitit's local controller (the launcher's child), which
    forwards it to every rank process; data-loader workers below the ranks are left alone."""
    for controller in _children(launcher.pid):
        try:
            os.kill(controller, signal.SIGTERM)
        except ProcessLookupError:
            pass


def launch(name: str, deadline: float, stop_at_step: int | None = None) -> str:
    """Runs (or continues) one run until it finishes, the deadline, or ``stop_at_step``;
    returns how it ended: finished, stopped or failed."""
    cmd = command(name)
    print("[convergence] $ " + shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO)
    signalled = False
    while proc.poll() is None:
        time.sleep(2.0)
        past_step = stop_at_step is not None and logged_step(name) >= stop_at_step
        if not signalled and (time.time() >= deadline or past_step):
            why = f"step {logged_step(name)}" if past_step else "the call's budget"
            print(f"[convergence] {name}: SIGTERM to the ranks at {why}", flush=True)
            stop_ranks(proc)
            signalled = True
    if latest_step(name) >= STEPS:
        return "finished"
    return "stopped" if signalled else "failed"


def run_all(names: list[str], deadline: float) -> None:
    """Runs the named runs in order until the deadline (see the module docstring)."""
    for name in names:
        if latest_step(name) >= STEPS:
            print(f"[convergence] {name}: finished earlier, skipped", flush=True)
            continue
        left = deadline - time.time()
        if left < 90:
            print(f"[convergence] {left:.0f}s left: {name} and later runs wait for the next call")
            return
        stop_at = None
        if name == "inter_resume" and latest_step(name) < RESUME_STOP_STEP:
            stop_at = RESUME_STOP_STEP
        outcome = launch(name, deadline, stop_at)
        print(f"[convergence] {name}: {outcome} at checkpoint step {latest_step(name)}", flush=True)
        if outcome == "stopped" and stop_at is not None and time.time() < deadline - 90:
            outcome = launch(name, deadline)  # the resume itself
            print(f"[convergence] {name}: {outcome} at checkpoint step {latest_step(name)}", flush=True)
        if outcome == "failed":
            print(f"[convergence] {name} failed: see runs/convergence/{name}/local/", flush=True)


def collect(out: Path) -> None:
    """Copies the loss logs to OUT and runs every check whose runs have finished."""
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_TABLE:
        log = RUNS / name / "train_log.jsonl"
        if log.is_file():
            shutil.copy(log, out / f"{name}_train_log.jsonl")
    for check, label, *names in CHECKS:
        if all(latest_step(n) >= STEPS for n in names):
            cmd = [
                sys.executable,
                "bench/convergence.py",
                check,
                *(str(RUNS / n) for n in names),
                "--out",
                str(out),
                "--name",
                label,
            ]
            print("[convergence] $ " + shlex.join(cmd), flush=True)
            subprocess.run(cmd, cwd=REPO, check=False)
        else:
            print(f"[convergence] {label}: waits for {', '.join(n for n in names if latest_step(n) < STEPS)}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0."""
    parser = argparse.ArgumentParser(prog="convergence_runs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop the runs after this long")
    parser.add_argument("--out", default=os.environ.get("OUT", str(RUNS / "results")), help="results folder")
    parser.add_argument("--only", nargs="+", choices=sorted(RUN_TABLE), help="run only these")
    parser.add_argument("--skip-corpus", action="store_true", help="the corpus is built already")
    args = parser.parse_args(argv)
    deadline = time.time() + args.budget_s
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    os.environ.update(env)
    if not args.skip_corpus:
        subprocess.run(["bash", "bench/build_code_corpus.sh"], cwd=REPO, check=True, env=env)
    run_all(args.only or list(RUN_TABLE), deadline)
    collect(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
