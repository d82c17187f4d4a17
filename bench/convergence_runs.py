#!/usr/bin/env python3
"""The convergence runs on one GPU, in calls of limited length: builds the code corpus, then
runs (or continues) each run through ``launch/slurm.py --local`` until the call's budget is
spent, then runs the checks of the finished pairs (bench/convergence.py).

    python3 -m bench.convergence_runs [--budget-s 540] [--records DIR] [--out DIR] [--only NAME ...]
        [--parallel N]
    python3 bench/convergence_runs.py ...          # the same, with the repository on PYTHONPATH

Run it again in the next call: finished runs (latest checkpoint at step 2,000) are skipped,
an unfinished one continues from its latest checkpoint. At the budget, the running ranks get
SIGTERM, which makes the trainer save at the step boundary and stop. The run ``inter_resume``
is ``inter_bf16`` stopped by SIGTERM once it has logged step 1,000 and resumed: the resume
check compares it with ``inter_bf16`` at every later step. Runs live under
``runs/convergence/<name>/`` (ignored by git, so kept between calls on a warm machine), with
one MLflow store ``runs/convergence/mlruns.db``. Every launch command is printed before it runs.
``--parallel N`` runs up to N at a time on the one GPU, in the table's order, each rank with
its share of the cores. A 100M run alone reaches 28.5% MFU on an H100 (344K tokens/s), so
runs side by side may finish more of them per call; the runs' records give each run's
tokens/s.

Across machines that start bare, the runs' records carry them (bench/convergence.py
``write_record``: one ``NAME.record.json`` per run, under a few MB, with everything the checks
read, the resumed run's restart included): a run whose record is in ``--records DIR`` (records
of earlier calls, committed) counts as finished and is not run again, provided the record's
corpus files digest and tokenizer sha256 equal this machine's corpus manifest ($CORPUS_DIR,
default /tmp/hm_corpus, ``code.manifest.json``; else an error naming both, since losses on
different corpora do not compare). The checks run on every pair whose runs are finished, here or
as records.

``--out`` (default $OUT) receives at most 8 files a call, few enough for machines that hand back
only a few: ``NAME.record.json`` for each run finished on this machine that ``--records`` does
not hold (at most 6: no run starts while 6 wait for their record to be committed; at the default
budget a call finishes one or two runs, 4-6 minutes each), ``convergence_checks.json`` (the
state of every run and every check's verdict, or the runs it waits for) and
``convergence_checks.png`` (the checks' plots one below the other). The per-check files
bench/convergence.py writes stay in ``runs/convergence/checks/``. An unfinished run is lost with
its machine and starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

from bench import convergence
from bench.convergence import RECORD_SUFFIX, ConvergenceInputError
from hybrid_megatron.atomic_output import write_json_atomically
from hybrid_megatron.errors import InputError

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "convergence"
STEPS = 2000
RESUME_STOP_STEP = 1000
INTER = "recipes/convergence/inter_100m_code.yaml"
INTRA = "recipes/convergence/intra_100m_code.yaml"
INTRA_MOE = "recipes/convergence/intra_100m_moe_code.yaml"
MAX_NEW_RECORDS = 6  # with the two check files: at most 8 files a call
CHECKS_JSON = "convergence_checks.json"
CHECKS_PNG = "convergence_checks.png"
POLL_S = 2.0  # between looks at the running runs
MIN_START_S = 90.0  # no run starts with less of the budget left

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


@dataclasses.dataclass
class Running:
    """A run's launcher process, the step at which it is to be stopped (None: run to the end)
    and whether its ranks were sent SIGTERM."""

    name: str
    process: subprocess.Popen
    stop_at_step: int | None = None
    signalled: bool = False


def start(name: str, stop_at_step: int | None = None, threads: int | None = None) -> Running:
    """Starts (or continues) one run's launcher; ``threads`` sets the ranks' OMP_NUM_THREADS
    (runs sharing the machine share its cores) unless the environment sets it."""
    cmd = command(name)
    print("[convergence] $ " + shlex.join(cmd), flush=True)
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return Running(name, subprocess.Popen(cmd, cwd=REPO, env=env), stop_at_step)


def outcome(run: Running, deadline: float) -> str | None:
    """None while the run goes on (its ranks get SIGTERM once at the deadline or past its stop
    step); else how it ended: finished, stopped or failed."""
    if run.process.poll() is None:
        past_step = run.stop_at_step is not None and logged_step(run.name) >= run.stop_at_step
        if not run.signalled and (time.time() >= deadline or past_step):
            why = f"step {logged_step(run.name)}" if past_step else "the call's budget"
            print(f"[convergence] {run.name}: SIGTERM to the ranks at {why}", flush=True)
            stop_ranks(run.process)
            run.signalled = True
        return None
    if latest_step(run.name) >= STEPS:
        return "finished"
    return "stopped" if run.signalled else "failed"


def pending_records(recorded: Collection[str]) -> list[str]:
    """The runs finished on this machine whose record is not among ``recorded``."""
    return [name for name in RUN_TABLE if name not in recorded and latest_step(name) >= STEPS]


def run_all(names: list[str], deadline: float, recorded: Collection[str] = (), parallel: int = 1) -> None:
    """Runs the named runs, up to ``parallel`` at a time in the given order, until the deadline,
    skipping those finished here or ``recorded`` (see the module docstring). No run starts with
    less than MIN_START_S left, nor while finished and running runs would leave more than
    MAX_NEW_RECORDS records to return. ``inter_resume`` is started to stop at
    RESUME_STOP_STEP, then started again for its resume (when MIN_START_S are left)."""
    queue = []
    for name in names:
        if name in recorded:
            print(f"[convergence] {name}: recorded earlier, skipped", flush=True)
        elif latest_step(name) >= STEPS:
            print(f"[convergence] {name}: finished earlier, skipped", flush=True)
        else:
            queue.append(name)
    slots = max(1, parallel)
    threads = max(1, (os.cpu_count() or 1) // slots) if slots > 1 else None
    running: list[Running] = []
    while queue or running:
        while queue and len(running) < slots:
            waiting = pending_records(recorded) + [r.name for r in running]
            if len(waiting) >= MAX_NEW_RECORDS:
                print(f"[convergence] {', '.join(waiting)} wait for their records to be committed first")
                queue.clear()
                break
            left = deadline - time.time()
            if left < MIN_START_S:
                print(f"[convergence] {left:.0f}s left: {', '.join(queue)} wait for the next call")
                queue.clear()
                break
            name = queue.pop(0)
            stop_at = (
                RESUME_STOP_STEP if name == "inter_resume" and latest_step(name) < RESUME_STOP_STEP else None
            )
            running.append(start(name, stop_at, threads))
        if running:
            time.sleep(POLL_S)
        for run in list(running):
            ended = outcome(run, deadline)
            if ended is None:
                continue
            running.remove(run)
            print(f"[convergence] {run.name}: {ended} at checkpoint step {latest_step(run.name)}", flush=True)
            if ended == "stopped" and run.stop_at_step is not None and time.time() < deadline - MIN_START_S:
                queue.insert(0, run.name)  # the resume itself
            elif ended == "failed":
                print(f"[convergence] {run.name} failed: see runs/convergence/{run.name}/local/", flush=True)


def read_records(records: Path, manifest: Path) -> dict[str, Path]:
    """The runs with a record in ``records`` (name -> record file), each checked to have
    trained on the corpus of ``manifest``; raises ConvergenceInputError naming both digests when
    one did not, or naming the manifest when this machine has no corpus."""
    found = {name: records / f"{name}{RECORD_SUFFIX}" for name in RUN_TABLE}
    found = {name: path for name, path in found.items() if path.is_file()}
    print(f"[convergence] records in {records}: {', '.join(found) or 'none'}", flush=True)
    if not found:
        return found
    here = convergence.corpus_identity(manifest)
    if here["files_digest"] is None:
        raise ConvergenceInputError(
            f"{manifest}: no corpus manifest to compare the records in {records} with "
            "(build the corpus: bash bench/build_code_corpus.sh)"
        )
    for path in found.values():
        identity = convergence.read_record(path)["identity"]
        recorded = (identity.get("corpus_files_digest"), identity.get("tokenizer_sha256"))
        if recorded != (here["files_digest"], here["tokenizer_sha256"]):
            raise ConvergenceInputError(
                f"{path}: trained on corpus files digest {recorded[0]} (tokenizer sha256 "
                f"{recorded[1]}), but this machine's corpus {manifest} has files digest "
                f"{here['files_digest']} (tokenizer sha256 {here['tokenizer_sha256']}); losses on "
                "different corpora do not compare: rebuild the recorded corpus, or leave out --records"
            )
    return found


def write_records(out: Path, recorded: Collection[str]) -> list[Path]:
    """Writes OUT/NAME.record.json for every run finished here and not ``recorded``; returns
    the files."""
    written = []
    for name in pending_records(recorded):
        path = out / f"{name}{RECORD_SUFFIX}"
        convergence.write_record(RUNS / name, path)
        print(f"[convergence] {name}: record {path}", flush=True)
        written.append(path)
    return written


def stack_pngs(pngs: list[Path], out_png: Path) -> None:
    """One PNG of ``pngs`` one below the other, pixel for pixel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt

    images = [matplotlib.image.imread(png) for png in pngs]
    width, height = max(i.shape[1] for i in images), sum(i.shape[0] for i in images)
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    top = height
    for image in images:
        top -= image.shape[0]
        fig.figimage(image, xo=0, yo=top, origin="upper")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)


def collect(out: Path, records: dict[str, Path]) -> dict:
    """Runs every check whose runs are finished here or ``records`` (a record stands in for its
    run); writes OUT/convergence_checks.json and OUT/convergence_checks.png; returns the
    summary written."""
    sources = {name: RUNS / name for name in pending_records(())} | records
    scratch = RUNS / "checks"
    checks: dict[str, dict] = {}
    pngs: list[Path] = []
    for check, label, *names in CHECKS:
        waiting = [n for n in names if n not in sources]
        if waiting:
            print(f"[convergence] {label}: waits for {', '.join(waiting)}")
            checks[label] = {"check": check, "waits_for": waiting}
            continue
        argv = [check, *(str(sources[n]) for n in names), "--out", str(scratch), "--name", label]
        print("[convergence] $ bench/convergence.py " + shlex.join(argv), flush=True)
        try:
            verdict = convergence.run_check(convergence.build_parser().parse_args(argv))
        except InputError as err:
            print(f"[convergence] {label}: error: {err}", flush=True)
            checks[label] = {"check": check, "error": str(err)}
            continue
        print(f"[convergence] {label}: {'pass' if verdict['passed'] else 'FAIL'}", flush=True)
        pngs.append(Path(verdict["plot"]))
        verdict["plot"] = f"{CHECKS_PNG}, panel {len(pngs)}"
        checks[label] = verdict
    runs = {
        name: "record" if name in records else f"checkpoint step {latest_step(name)} of {STEPS}"
        for name in RUN_TABLE
    }
    summary = {"runs": runs, "checks": checks}
    write_json_atomically(out / CHECKS_JSON, summary)
    if pngs:
        stack_pngs(pngs, out / CHECKS_PNG)
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0, or 2 for bad input (a record of another corpus)."""
    parser = argparse.ArgumentParser(prog="convergence_runs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop the runs after this long")
    parser.add_argument("--out", default=os.environ.get("OUT", str(RUNS / "results")), help="results folder")
    parser.add_argument(
        "--records", type=Path, help="folder of NAME.record.json from earlier calls: those runs are finished"
    )
    parser.add_argument("--only", nargs="+", choices=sorted(RUN_TABLE), help="run only these")
    parser.add_argument("--skip-corpus", action="store_true", help="the corpus is built already")
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runs at a time on the one GPU (a 100M run leaves most of an H100 idle)",
    )
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: at least one run at a time")
    deadline = time.time() + args.budget_s
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    os.environ.update(env)
    if not args.skip_corpus:
        subprocess.run(["bash", "bench/build_code_corpus.sh"], cwd=REPO, check=True, env=env)
    manifest = Path(os.environ.get("CORPUS_DIR", "/tmp/hm_corpus")) / "code.manifest.json"
    out = Path(args.out)
    try:
        records = read_records(args.records, manifest) if args.records else {}
        run_all(args.only or list(RUN_TABLE), deadline, records, args.parallel)
        write_records(out, records)
        collect(out, records)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
