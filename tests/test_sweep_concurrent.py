"""``--sweep --local --concurrent N``: up to N runs of a sweep at a time on this machine, each on
its own rendezvous port, started in the sweep's order as slots free up; a failed run does not
stop the others; ``--stop-after`` stops every running one.

The launcher runs stand-in trainer entries (``HM_TRAIN_ENTRY``) except in the ``long`` test,
which runs two runs of the real trainer at once and compares their losses with the same runs
made one after another.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from hybrid_megatron.launch import cli
from tests.test_launcher import _ckpt, _mini_sweep, _use_standin

REPO = Path(__file__).resolve().parents[1]
NAMES = ("mini-transformer_tiny-10K", "mini-mamba_tiny-10K", "mini-swa_tiny-10K")

# ---------------------------------------------------------------------------- stand-in entries


def overlapping_entry(recipe):
    """Joins its process group (rank 0 listens on MASTER_PORT: two runs on one port would fail
    here), marks itself started beside the sweep's other runs, waits (at most 30 s) until two
    runs of the sweep have started, then writes standin/record.json: its start and end times,
    port and CPU threads."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    started = time.time()
    marks = Path(recipe.run_dir).parent / "started"
    marks.mkdir(exist_ok=True)
    (marks / recipe.name).write_text("")
    deadline = time.time() + 30
    while len(list(marks.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    record = {
        "start": started,
        "end": time.time(),
        "port": int(os.environ["MASTER_PORT"]),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    dist.destroy_process_group()
    out = Path(recipe.run_dir) / "standin"
    out.mkdir(parents=True, exist_ok=True)
    (out / "record.json").write_text(json.dumps(record))
    return {"final_loss": 1.5}


def mamba_fails_entry(recipe):
    """The mamba run raises at once; the transformer run waits (at most 30 s) for that, then 5 s
    more, so that the launcher sees the failure while it runs; every run that does not fail
    records its start and end times."""
    failed = Path(recipe.run_dir).parent / "mamba_failed"
    if "mamba" in recipe.name:
        failed.write_text("")
        raise RuntimeError(f"{recipe.name} exploded on purpose")
    started = time.time()
    if "transformer" in recipe.name:
        deadline = time.time() + 30
        while not failed.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(5)
    out = Path(recipe.run_dir) / "standin"
    out.mkdir(parents=True, exist_ok=True)
    (out / "record.json").write_text(json.dumps({"start": started, "end": time.time()}))
    return {"final_loss": 1.5}


# ---------------------------------------------------------------------------- helpers


def _three_run_sweep(tmp_path) -> Path:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "sweep: {name: mini, match: F, reference: transformer_tiny, tokens: [10K], "
        "overrides: [train.warmup_steps=1], recipes: ["
        + ", ".join(f"{REPO}/recipes/{kind}_tiny.yaml" for kind in ("transformer", "mamba", "swa"))
        + "]}\n"
    )
    return sweep


def _records(tmp_path) -> dict:
    folder = tmp_path / "runs" / "mini"
    return {
        name: json.loads((folder / name / "standin" / "record.json").read_text())
        for name in NAMES
        if (folder / name / "standin" / "record.json").exists()
    }


def _event_lines(out: str) -> list[str]:
    """The sweep's start and end lines, in order, without the elapsed seconds."""
    return [
        re.sub(r" after \d+ s$", "", line)
        for line in out.splitlines()
        if line.startswith(("[sweep] start ", "[sweep] end "))
    ]


# ---------------------------------------------------------------------------- tests


def test_free_port_skips_the_ports_taken(monkeypatch):
    """A port just handed to a run that is not yet listening is not handed out again."""
    from hybrid_megatron.launch import local

    offered = iter([5001, 5002, 5001, 5003])

    class FakeSocket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(local.socket, "socket", FakeSocket)
    assert local.free_port({5001, 5002}) == 5003
    offered = iter([5001] * 100)
    with pytest.raises(OSError, match="no free TCP port outside the 1 taken ones"):
        local.free_port({5001})


@pytest.mark.slow  # three stand-in runs, two at a time: each rank imports torch
def test_three_runs_two_at_a_time_overlap_on_their_own_ports(tmp_path, monkeypatch, capsys):
    sweep = _three_run_sweep(tmp_path)
    _use_standin(monkeypatch, "standin_entry")  # the ranks' PYTHONPATH
    monkeypatch.setenv("HM_TRAIN_ENTRY", f"{__name__}:overlapping_entry")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    code = cli.main([str(sweep), "--sweep", "--local", "--nproc", "1", "--concurrent", "2", _ckpt(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[sweep] 3/3 runs succeeded (compare group mini)" in out
    assert "[sweep] up to 2 runs at a time, sharing this machine's GPUs and CPUs" in out
    events = _event_lines(out)
    assert events[:2] == [
        f"[sweep] start {NAMES[0]} (run 1 of 3, 1 running)",
        f"[sweep] start {NAMES[1]} (run 2 of 3, 2 running)",
    ], events
    # the third starts once one of the first two has ended: never more than two at once, and
    # each start line counts the runs going
    going, most = set(), 0
    for line in events:
        name = line.split()[2].rstrip(":")
        if line.startswith("[sweep] start "):
            going.add(name)
            assert line.endswith(f", {len(going)} running)"), (line, going)
        else:
            going.remove(name)
        most = max(most, len(going))
    assert most == 2 and not going, events
    assert events[2].startswith("[sweep] end mini-"), events
    assert sorted(line for line in events if line.startswith("[sweep] end ")) == sorted(
        f"[sweep] end {name}: succeeded" for name in NAMES
    )
    records = _records(tmp_path)
    assert sorted(records) == sorted(NAMES)
    first, second, third = (records[name] for name in NAMES)
    assert second["start"] < first["end"] and first["start"] < second["end"]  # they overlapped
    assert third["start"] > min(first["end"], second["end"])  # never three at once
    assert first["port"] != second["port"]
    assert third["port"] != (second if first["end"] < second["end"] else first)["port"]
    threads = str(max(1, (os.cpu_count() or 1) // 2))  # the CPUs shared by the two slots
    assert {(r["omp_threads"], str(r["torch_threads"])) for r in records.values()} == {(threads, threads)}
    assert {r["cuda_visible"] for r in records.values()} == {""}  # CPU here: no GPU for any of them
    assert f"[{NAMES[0]}] " in out  # rank 0's lines name their run


@pytest.mark.long  # three stand-in runs, two at a time (make test keeps the overlap test)
def test_a_failed_run_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    sweep = _three_run_sweep(tmp_path)
    _use_standin(monkeypatch, "standin_entry")
    monkeypatch.setenv("HM_TRAIN_ENTRY", f"{__name__}:mamba_fails_entry")
    code = cli.main([str(sweep), "--sweep", "--local", "--nproc", "1", "--concurrent", "2", _ckpt(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1, captured.out
    assert "[sweep] 2/3 runs succeeded (compare group mini)" in captured.out
    events = _event_lines(captured.out)
    assert f"[sweep] end {NAMES[1]}: FAILED (exit 1)" in events
    assert f"[sweep] end {NAMES[0]}: succeeded" in events and f"[sweep] end {NAMES[2]}: succeeded" in events
    assert events.index(f"[sweep] start {NAMES[2]} (run 3 of 3, 2 running)") > events.index(
        f"[sweep] end {NAMES[1]}: FAILED (exit 1)"
    )
    assert f"RuntimeError: {NAMES[1]} exploded on purpose" in captured.err
    assert sorted(_records(tmp_path)) == sorted([NAMES[0], NAMES[2]])


@pytest.mark.long  # two stand-in runs at once until the budget
def test_stop_after_stops_every_running_run(tmp_path, monkeypatch, capsys):
    """At the budget both running runs get SIGTERM and save at the step they reached; the third
    never starts; all three are listed, the stopped ones with their steps, exit 3."""
    from hybrid_megatron.accounting import count_parameters
    from hybrid_megatron.checkpoint_layout import checkpoint_step, latest_checkpoint
    from hybrid_megatron.config import derived, load_recipe
    from hybrid_megatron.scaling.sweep import load_sweep

    sweep = _three_run_sweep(tmp_path)
    _, runs = load_sweep(sweep, (_ckpt(tmp_path),))
    recipes = [load_recipe(run.recipe_path, run.overrides) for run in runs]
    assert [run.name for run in runs] == list(NAMES)
    _use_standin(monkeypatch, "standin_entry")
    monkeypatch.setenv("HM_TRAIN_ENTRY", "tests.test_sweep_resume:saving_entry")
    started = [Path(recipe.run_dir) / "standin" / "started" for recipe in recipes[:2]]

    class Clock:
        """The launcher's clock reaches the deadline once the first two runs are going (their
        SIGTERM handlers set)."""

        sleep = staticmethod(time.sleep)

        @staticmethod
        def monotonic() -> float:
            return time.monotonic() + (1e9 if all(path.exists() for path in started) else 0.0)

    monkeypatch.setattr("hybrid_megatron.launch.local.time", Clock)
    monkeypatch.setattr("hybrid_megatron.launch.sweep.time", Clock)
    args = [str(sweep), "--sweep", "--local", "--nproc", "1", "--concurrent", "2", _ckpt(tmp_path)]
    code = cli.main([*args, "--stop-after", "100000", "--start-margin", "0"])
    out = capsys.readouterr().out
    assert code == 3, out
    assert out.count("[launch] time budget reached: asking job") == 2
    totals = [derived(recipe, 1, count_parameters)["total_steps"] for recipe in recipes]
    saved = [checkpoint_step(latest_checkpoint(recipe.checkpoint.dir)) for recipe in recipes[:2]]
    assert all(0 < step < total for step, total in zip(saved, totals)), (saved, totals)
    assert not Path(recipes[2].run_dir).exists()  # never started
    assert "[sweep] 0/0 runs succeeded (compare group mini)" in out
    assert (
        f"[sweep] stopped by --stop-after 100000: 3 of 3 runs left to do: {NAMES[0]} (resumes at "
        f"step {saved[0]}), {NAMES[1]} (resumes at step {saved[1]}), {NAMES[2]} (from step 0); "
        "run the same command again to continue"
    ) in out
    for name, step in zip(NAMES, saved):
        assert f"[sweep] end {name}: stopped at the time budget, resumes at step {step}" in _event_lines(out)


def test_concurrent_needs_a_local_sweep(tmp_path, capsys):
    sweep = _mini_sweep(tmp_path)
    tiny = str(REPO / "recipes" / "transformer_tiny.yaml")
    for argv in (
        [str(sweep), "--sweep", "--concurrent", "2"],
        [tiny, "--local", "--concurrent", "2"],
        [tiny, "--local", "--concurrent", "1"],
        [tiny, "--concurrent", "2", "--dry-run"],
    ):
        assert cli.main([*argv, _ckpt(tmp_path)]) == 2, argv
        err = capsys.readouterr().err
        assert err == "error: --concurrent applies to --sweep --local runs only\n", (argv, err)
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as stop:
            cli.main([str(sweep), "--sweep", "--local", "--concurrent", bad])
        assert stop.value.code == 2
        assert f"{bad!r} is not a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def _two_runs_alone_then_at_once(tmp_path, capsys, setting: str, extra: list) -> tuple[dict, str]:
    """A two-run mini sweep of the real trainer made one after another (``one``) and again at
    --concurrent 2 (``two``), each into its own root; checks both runs succeeded each time and
    started together the second time. Returns ({mode: {run: losses}}, the concurrent sweep's
    stdout)."""
    from tests.training_helpers import read_losses

    sweep = _mini_sweep(
        tmp_path,
        "train.warmup_steps=1, model.num_layers=2, data.seq_length=64, train.global_batch_size=4, "
        f"train.log_interval=1, train.eval_interval=0, checkpoint.interval=1000, {setting}",
    )
    losses, out = {}, ""
    for mode, concurrent in (("one", []), ("two", ["--concurrent", "2"])):
        root = tmp_path / mode
        args = [str(sweep), "--sweep", "--local", "--nproc", "1", _ckpt(root), *extra, *concurrent]
        assert cli.main(args) == 0, capsys.readouterr().out[-3000:]
        out = capsys.readouterr().out
        assert "[sweep] 2/2 runs succeeded" in out
        losses[mode] = {name: read_losses(root / "runs" / "mini" / name) for name in NAMES[:2]}
    events = _event_lines(out)
    assert events[:2] == [
        f"[sweep] start {NAMES[0]} (run 1 of 2, 1 running)",
        f"[sweep] start {NAMES[1]} (run 2 of 2, 2 running)",
    ], events  # both at once
    return losses, out


@pytest.mark.long  # four short runs of the real trainer (two of them at once)
def test_real_runs_at_once_lose_exactly_what_they_lose_one_after_another(tmp_path, monkeypatch, capsys):
    """The real trainer, gloo on CPU: a two-run sweep made one after another, and again at
    --concurrent 2 into a fresh store (the two runs log into one SQLite store at once): every
    step's loss is the same bit for bit, and the store holds both runs FINISHED."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("HM_TRAIN_ENTRY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same CPU threads in both: same reductions
    losses, _ = _two_runs_alone_then_at_once(
        tmp_path, capsys, "train.deterministic=true", ["data.num_workers=0"]
    )
    for name in NAMES[:2]:
        steps = len(losses["one"][name])
        assert steps >= 10 and sorted(losses["one"][name]) == list(range(1, steps + 1)), name
        assert losses["two"][name] == losses["one"][name], name
    client = MlflowClient(f"sqlite:///{tmp_path}/two/runs/mini/mlruns.db")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted((run.info.run_name, run.info.status) for run in found) == sorted(
        (name, "FINISHED") for name in NAMES[:2]
    )


@pytest.mark.gpu
def test_two_real_runs_share_one_gpu(tmp_path, monkeypatch, capsys):
    """The real trainer on CUDA: a two-run sweep at --concurrent 2 runs both at once on the same
    GPU (one rank each, nccl), both finish every step, and their losses follow the same runs
    made one after another (to 1e-3: GPU kernels need not be bitwise repeatable)."""

    monkeypatch.delenv("HM_TRAIN_ENTRY", raising=False)
    losses, out = _two_runs_alone_then_at_once(tmp_path, capsys, "tracking.enabled=false", [])
    assert out.count("1 local ranks (1 GPUs)") == 2
    for name in NAMES[:2]:
        one, two = losses["one"][name], losses["two"][name]
        assert len(one) >= 10 and sorted(two) == sorted(one), name
        for step in one:
            a, b = float.fromhex(one[step]), float.fromhex(two[step])
            assert abs(a - b) <= 1e-3 * abs(a), (name, step, a, b)
