"""The launcher (hybrid_megatron.launch, run as launch/slurm.py): dry-run output, the no-SLURM
error, --local with real ranks (success and failure), and a real job on a single-node SLURM
cluster brought up by tests/slurm_cluster.py.

Most ranks run stand-in trainer entries defined below (through the ``HM_TRAIN_ENTRY`` hook), not
the trainer: those tests are about launching, rendezvous and failure propagation. The last two
SLURM tests run the real trainer: to a checkpoint, and through a preemption signal, requeue and
resume compared step by step with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybrid_megatron.launch import cli
from hybrid_megatron.launch.job import (
    INPUT_ERROR_MARK,
    RankInputError,
    TrainJob,
    input_error_line,
    rendezvous_env,
    resolve_entry,
)
from hybrid_megatron.launch.plan import min_world_size
from hybrid_megatron.launch.slurm import render_sbatch, slurm_job_active

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "intra_tiny_moe.yaml"


# ---------------------------------------------------------------------------- stand-in entries
# Called in each rank's process as `entry(recipe)` (HM_TRAIN_ENTRY=tests.test_launcher:<function>).


def standin_entry(recipe):
    """Joins the process group from the env the launcher set, all-reduces, writes rank<N>.json."""
    import torch
    import torch.distributed as dist

    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    dist.init_process_group("gloo")  # env:// from MASTER_ADDR/PORT, RANK, WORLD_SIZE
    total = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(total)
    record = {
        **env,
        "dist_rank": dist.get_rank(),
        "dist_world": dist.get_world_size(),
        "rank_sum": int(total.item()),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "recipe": recipe.name,
    }
    out = Path(recipe.run_dir) / "standin"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{env['RANK']}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    print(f"stand-in rank {env['RANK']} done", flush=True)
    return {"checkpoint_dir": recipe.checkpoint.dir, "final_loss": 1.25, "mlflow_run_id": "standin"}


def failing_entry(recipe):
    """Rank 1 raises; rank 0 waits in a barrier it can never pass (the launcher must not hang)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 exploded on purpose")
    dist.barrier()
    time.sleep(600)


def bad_data_entry(recipe):
    """Fails the way the trainer does on a missing dataset."""
    from hybrid_megatron.data.errors import DataToolsError

    raise DataToolsError("dataset prefix /nope/x: /nope/x.idx does not exist")


def input_error_entry(recipe):
    """Raises an InputError subclass the launcher knows nothing of, with a two-line message."""
    from hybrid_megatron.errors import InputError

    class TokenizerMismatch(InputError):
        pass

    raise TokenizerMismatch("data.tokenizer: /tok/a has vocab 100\nthe dataset was made with vocab 200")


def graceful_entry(recipe):
    """Like the trainer: SIGUSR1 = save and stop. Sends itself SLURM's SIGUSR2 mid-"training"."""
    import signal

    stop = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: stop.append(signum))
    os.kill(os.getpid(), signal.SIGUSR2)
    deadline = time.time() + 10
    while not stop and time.time() < deadline:
        time.sleep(0.01)
    os.environ["HM_TEST_SAVED"] = "yes"  # "the checkpoint is written"
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    return {"stopped_by_signal": bool(stop), "signals": stop}


def deaf_entry(recipe):
    """An entry with no SIGUSR1 handler: SIGUSR2 goes straight to submitit's handler."""
    import signal

    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.2)
    return {"stopped_by_signal": False}


def preempted_entry(recipe):
    """First run: wait for the trainer's stop signal (SIGUSR1), then return as the trainer does
    after saving. Second run (after the requeue): record the recipe it was given."""
    import signal

    out = Path(recipe.run_dir) / "standin"
    out.mkdir(parents=True, exist_ok=True)
    rank = os.environ["RANK"]
    first = out / f"run1_rank{rank}.json"
    if first.exists():
        (out / f"run2_rank{rank}.json").write_text(json.dumps({"resume": recipe.checkpoint.resume}))
        return {"stopped_by_signal": None, "run": 2}
    stop = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: stop.append(signum))
    (out / f"waiting_rank{rank}").write_text("")
    deadline = time.time() + 300  # only a safety net: the test signals as soon as both wait
    while not stop and time.time() < deadline:
        time.sleep(0.05)
    first.write_text(json.dumps({"stopped": bool(stop), "resume": recipe.checkpoint.resume}))
    return {"stopped_by_signal": stop[0] if stop else None, "run": 1}


# ---------------------------------------------------------------------------- helpers


def _use_standin(monkeypatch, name: str) -> None:
    """Make the ranks call ``name`` of this module; they import it by name, from the repository."""
    monkeypatch.setenv("HM_TRAIN_ENTRY", f"{__name__}:{name}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


# The demo's data and tokenizer, for recipes whose own paths are a cluster's (the bases' EDITs).
DEMO_DATA = (f"data.tokenizer={REPO}/data/tokenizer", f"data.blend={REPO}/data/austen_4k_text_document")


def _ckpt(tmp_path) -> str:
    return f"checkpoint.dir={tmp_path}/runs/demo/checkpoints"


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _rank_records(tmp_path) -> dict:
    folder = tmp_path / "runs" / "demo" / "standin"
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))}


# ---------------------------------------------------------------------------- dry run


def test_dry_run_checks_that_data_tokenizer_and_checkpoints_exist(tmp_path, capsys):
    """A dry run (and a launch) stops with one line, exit 2, at the first input a run would fail
    on: a data prefix, the tokenizer, a resume or init_from path, a ``latest`` naming nothing."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest").write_text("step_00000009")
    cases = [
        (
            f"data.blend={tmp_path}/nope",
            rf"dataset prefix {tmp_path}/nope: {tmp_path}/nope.idx does not exist",
        ),
        (f"data.tokenizer={tmp_path}/tok", rf"data.tokenizer: {tmp_path}/tok does not exist"),
        (f"checkpoint.resume={tmp_path}/gone", rf"checkpoint.resume: {tmp_path}/gone does not exist"),
        (f"checkpoint.resume={tmp_path}", rf"checkpoint.resume: {tmp_path}: neither a checkpoint directory"),
        (f"checkpoint.init_from={tmp_path}/gone", rf"checkpoint.init_from: {tmp_path}/gone does not exist"),
        (f"checkpoint.dir={tmp_path}/ckpt", rf"{tmp_path}/ckpt/latest names .*step_00000009, which is not a"),
    ]
    for override, expected in cases:
        args = [str(DEMO), "--dry-run", _ckpt(tmp_path), override]
        assert cli.main(args) == 2, override
        captured = capsys.readouterr()
        assert re.fullmatch(f"error: {expected}.*\n", captured.err), captured.err
        # the plan is printed, then the input check fails instead of the all-clear line
        assert "# ---- resolved recipe ----" in captured.out, override
        assert "# dry run: nothing submitted" not in captured.out
    assert cli.main([str(DEMO), "--dry-run", _ckpt(tmp_path)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("# dry run: nothing submitted")


def test_dry_run_prints_recipe_derived_and_sbatch(tmp_path, capsys):
    code = cli.main(
        [
            str(DEMO),
            "--dry-run",
            _ckpt(tmp_path),
            "slurm.nodes=2",
            "slurm.gpus_per_node=4",
            "slurm.tasks_per_node=null",
            "slurm.partition=gpu-x",
            "slurm.account=proj7",
            "slurm.time=01:30:00",
            "train.global_batch_size=32",
            "slurm.env={NCCL_DEBUG: WARN}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "name: intra_tiny_moe" in out and "partition: gpu-x" in out  # the resolved recipe
    assert "8 = tp 2 x pp 1 x dp 4" in out  # derived on 2 x 4 ranks
    assert "global 32 = micro 4 x dp 4 x grad accumulation 2" in out
    assert "  params    total 2.27M, active 1.88M, non_embedding 1.23M" in out.splitlines()  # accounting
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --partition=gpu-x",
        "#SBATCH --account=proj7",
        "#SBATCH --time=90",
        "#SBATCH --job-name=intra_tiny_moe",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        f"#SBATCH --output={tmp_path}/runs/demo/slurm/%j/%j_0_log.out",
        "export NCCL_DEBUG=WARN",
    ):
        assert line in out.splitlines(), line
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "-m submitit.core._submit" in srun
    assert "#SBATCH --array" not in out
    assert out.rstrip().endswith("# dry run: nothing submitted")
    assert not (tmp_path / "runs").exists()  # nothing written


def test_render_sbatch_array_and_cluster_options():
    from hybrid_megatron.config import load_recipe

    recipe = load_recipe(
        REPO / "recipes" / "intra_1b.yaml",
        [
            "slurm.array_parallelism=2",
            "slurm.container_image=/img/hm.sqsh",
            "slurm.container_mounts=/data:/data,/scratch:/scratch",
            "slurm.qos=high",
            "slurm.constraint=h100",
            "slurm.setup=[module load cuda]",
            "slurm.sbatch_extra={gres: 'gpu:8'}",
        ],
    )
    lines = render_sbatch(recipe, array_size=5).splitlines()
    for line in (
        "#SBATCH --array=0-4%2",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --mem=0",
        "#SBATCH --exclusive",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100",
        "#SBATCH --gres=gpu:8",
        "#SBATCH --time=2880",
        "#SBATCH --signal=USR2@180",
        "export CUDA_DEVICE_MAX_CONNECTIONS=1",
        "module load cuda",
    ):
        assert line in lines, line
    srun = next(line for line in lines if line.startswith("srun "))
    assert (
        "--container-image=/img/hm.sqsh" in srun
        and "--container-mounts=/data:/data,/scratch:/scratch" in srun
    )
    # Array logs are per array task.
    assert any(line.startswith("#SBATCH --output=") and "%A_%a_0_log.out" in line for line in lines)


# ---------------------------------------------------------------------------- usage errors


def test_no_sbatch_says_slurm_not_found_and_suggests_local(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code = cli.main([str(DEMO), _ckpt(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: SLURM was not found on this machine (no 'sbatch' on PATH)")
    assert "--local" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_no_sbatch_exit_code_from_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "slurm.py"), str(DEMO), _ckpt(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(tmp_path)},
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "SLURM was not found" in proc.stderr and "add --local" in proc.stderr


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--sweep"], "not a sweep file: it has no 'sweep:' section"),
        (["--nproc", "2"], "--nproc applies to --local runs only"),
        (["--local", "--nproc", "3"], "--nproc 3: the world size must be a multiple of 2"),
        (["model.intra.fusion=sum"], "model.intra.fusion: 'sum' is not one of add, subtract, concat"),
        (["--local", "--nproc", "6"], "train.global_batch_size: 8 is not divisible by"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    code = cli.main([str(DEMO), _ckpt(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.startswith("error: "), err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- per-rank side


class _FakeEnv:
    def __init__(self, **values):
        self.__dict__.update(values)


def test_rendezvous_env_from_a_slurm_job(monkeypatch):
    monkeypatch.delenv("HM_MASTER_PORT", raising=False)
    job = _FakeEnv(
        cluster="slurm",
        hostnames=["gpu017", "gpu018"],
        raw_job_id="4242",
        global_rank=13,
        local_rank=5,
        num_tasks=16,
        num_nodes=2,
        node=1,
    )
    assert rendezvous_env(job) == {
        "MASTER_ADDR": "gpu017",
        "MASTER_PORT": str(20000 + 4242),
        "RANK": "13",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "5",
        "LOCAL_WORLD_SIZE": "8",
        "NODE_RANK": "1",
    }
    monkeypatch.setenv("HM_MASTER_PORT", "31111")
    assert rendezvous_env(job)["MASTER_PORT"] == "31111"
    local = _FakeEnv(
        cluster="local",
        hostnames=["x"],
        raw_job_id="1",
        global_rank=1,
        local_rank=1,
        num_tasks=2,
        num_nodes=1,
        node=0,
    )
    env = rendezvous_env(local, master_port=12345)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"], env["WORLD_SIZE"]) == (
        "127.0.0.1",
        "12345",
        "1",
        "2",
    )


def test_checkpoint_requeues_itself_resuming_from_latest():
    from hybrid_megatron.config import load_recipe

    recipe = load_recipe(DEMO, ["checkpoint.resume=/some/old/checkpoint"])
    job = TrainJob(recipe, entry="pkg.mod:fn", master_port=None, threads=2)
    delayed = job.checkpoint()
    requeued = delayed.function
    assert isinstance(requeued, TrainJob) and requeued is not job
    assert requeued.recipe.checkpoint.resume == "auto" and recipe.checkpoint.resume == "/some/old/checkpoint"
    assert requeued.recipe.model == recipe.model and (requeued.entry, requeued.threads) == ("pkg.mod:fn", 2)
    assert delayed.args == () and delayed.kwargs == {}


@pytest.fixture
def submitit_task_env(monkeypatch):
    """The environment of task 0 of a one-task submitit local job, restored afterwards."""
    for key, value in {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_JOB_ID": "77",
        "SUBMITIT_LOCAL_NTASKS": "1",
        "SUBMITIT_LOCAL_GLOBALID": "0",
        "SUBMITIT_LOCAL_LOCALID": "0",
        "SUBMITIT_LOCAL_NODEID": "0",
        "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
        "HM_TEST_SAVED": "no",
    }.items():
        monkeypatch.setenv(key, value)
    for key in (
        "MASTER_ADDR",
        "MASTER_PORT",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
    ):
        monkeypatch.setenv(key, "unset")  # TrainJob overwrites them; monkeypatch restores them
    import signal

    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(os.environ["HM_TEST_SAVED"]))
    yield calls
    signal.signal(signal.SIGUSR2, previous)


@pytest.mark.parametrize(
    "entry, expected_calls, stopped",
    [
        ("graceful_entry", ["yes"], True),  # trainer saved first, then submitit requeued
        ("deaf_entry", ["no"], False),  # no trainer handler: submitit's handler at once
    ],
)
def test_preemption_signal_saves_before_requeue(submitit_task_env, entry, expected_calls, stopped):
    from hybrid_megatron.config import load_recipe

    job = TrainJob(load_recipe(DEMO), entry=f"{__name__}:{entry}", master_port=1234)
    result = job()
    assert submitit_task_env == expected_calls
    assert result["stopped_by_signal"] is stopped
    assert os.environ["RANK"] == "0" and os.environ["MASTER_PORT"] == "1234"


def test_resolve_entry_by_module_name_only():
    assert resolve_entry("json:dumps") is json.dumps
    assert resolve_entry(f"{__name__}:standin_entry") is standin_entry
    with pytest.raises(ValueError, match="module:function"):
        resolve_entry("no_function_here")
    with pytest.raises(ValueError, match="not a file path"):  # ranks import entries by name
        resolve_entry(f"{__file__}:standin_entry")


def test_min_world_size():
    from hybrid_megatron.config import load_recipe

    assert min_world_size(load_recipe(DEMO)) == 2
    assert min_world_size(load_recipe(REPO / "recipes" / "mamba_tiny_moe.yaml", ["parallel.ep=2"])) == 2
    # tp 2, ep 4: each expert group is ep 4 x expert tp 2 (= tp) ranks
    assert min_world_size(load_recipe(REPO / "recipes" / "intra_3b_moe.yaml")) == 8
    # tp 2 x ep 2: experts split over tp (megatron-core's default) need 4 ranks, whole ones 2
    tp2_ep2 = ["parallel.ep=2"]  # intra_tiny_moe has tp 2
    assert min_world_size(load_recipe(REPO / "recipes" / "intra_tiny_moe.yaml", tp2_ep2)) == 4
    assert (
        min_world_size(
            load_recipe(REPO / "recipes" / "intra_tiny_moe.yaml", tp2_ep2 + ["parallel.expert_tp=1"])
        )
        == 2
    )


# ---------------------------------------------------------------------------- --local


def test_local_two_ranks_rendezvous_and_report(tmp_path, monkeypatch, capsys):
    _use_standin(monkeypatch, "standin_entry")
    code = cli.main([str(DEMO), "--local", _ckpt(tmp_path)])  # default nproc: tp*pp = 2
    out = capsys.readouterr().out
    assert code == 0, out
    records = _rank_records(tmp_path)
    assert sorted(records) == [0, 1]
    for rank, record in records.items():
        assert (record["RANK"], record["dist_rank"], record["LOCAL_RANK"]) == (str(rank), rank, str(rank))
        assert (record["WORLD_SIZE"], record["dist_world"], record["rank_sum"]) == ("2", 2, 3)
        assert record["MASTER_ADDR"] == "127.0.0.1" and record["recipe"] == "intra_tiny_moe"
    assert records[0]["MASTER_PORT"] == records[1]["MASTER_PORT"]
    assert "[rank0] stand-in rank 0 done" in out  # rank 0's log was streamed
    assert "all 2 ranks finished" in out and "final_loss: 1.25" in out
    assert f"checkpoint_dir: {tmp_path}/runs/demo/checkpoints" in out
    assert list((tmp_path / "runs" / "demo" / "local").iterdir())  # logs under the run dir
    # ... and it ends with what to try next, the run's own paths filled in
    ckpt, run = f"{tmp_path}/runs/demo/checkpoints", f"{tmp_path}/runs/demo"
    assert [
        line.strip() for line in out.split("next steps:")[1].splitlines() if line.strip()[:1] not in "#"
    ] == [
        f"python -m hybrid_megatron.evaluation nll --checkpoint {ckpt} --out {run}/eval",
        f"python -m hybrid_megatron.evaluation generate --checkpoint {ckpt} --out {run}/eval",
        f"python -m hybrid_megatron.convert to-hf --checkpoint {ckpt} --output {run}/hf",
        "python launch/slurm.py recipes/sweeps/tiny_F.yaml --sweep --local",
        f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/runs/mlruns.db",
    ]


def test_local_failure_propagates_with_the_failing_rank(tmp_path, monkeypatch, capsys):
    _use_standin(monkeypatch, "failing_entry")
    started = time.time()
    code = cli.main([str(DEMO), "--local", "--nproc", "2", _ckpt(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert time.time() - started < 120  # rank 0 blocked in a barrier: it was stopped, not waited for
    err = captured.err
    assert "[launch] rank 1 failed:" in err and "RuntimeError: rank 1 exploded on purpose" in err
    assert "FAILED" in err.splitlines()[-1]
    assert "rank 0 failed:" not in err  # the root cause is reported first, not the peer's fallout


def test_bad_input_in_a_rank_is_reported_as_its_one_line(tmp_path, monkeypatch, capsys):
    """A rank that stops on bad input (here a missing dataset) is reported by its message; the
    traceback stays in the rank's log."""
    _use_standin(monkeypatch, "bad_data_entry")
    assert cli.main([str(DEMO), "--local", _ckpt(tmp_path)]) == 1
    report = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[rank")]
    assert any(
        line.endswith(" failed: DataToolsError: dataset prefix /nope/x: /nope/x.idx does not exist")
        for line in report
    ), report  # whichever rank ended first
    assert not any(line.startswith(("Traceback", "  File")) for line in report), report
    assert input_error_line("Traceback ...\nRuntimeError: boom") is None


def test_a_ranks_input_error_is_recognised_by_its_base_class(submitit_task_env):
    """The rank entry turns any InputError into one marked traceback line carrying its class
    name and message (several lines kept); the launcher reads that line back, and nothing else."""
    import traceback

    from hybrid_megatron.config import load_recipe

    job = TrainJob(load_recipe(DEMO), entry=f"{__name__}:input_error_entry", master_port=1234)
    with pytest.raises(RankInputError):
        try:
            job()
        except RankInputError:
            text = traceback.format_exc()
            raise
    assert input_error_line(text) == (
        "TokenizerMismatch: data.tokenizer: /tok/a has vocab 100\nthe dataset was made with vocab 200"
    )
    assert "Traceback" in text and "input_error_entry" in text  # the rank's log keeps the traceback
    # An error named like a user error but not raised through the rank entry is not one.
    assert input_error_line("Traceback ...\nDataToolsError: dataset prefix /x: missing") is None
    assert input_error_line("Traceback ...\nX: " + INPUT_ERROR_MARK + "{not json") is None


def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = cli.main([str(DEMO), "--local", f"checkpoint.dir={blocker}/run/checkpoints"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: cannot create {blocker}/run") and "checkpoint.dir" in err[0], err


# ---------------------------------------------------------------------------- real SLURM


@pytest.mark.slow  # ~20 s on an idle machine: two ranks import torch + megatron-core
def test_slurm_job_through_the_launcher(slurm_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    _use_standin(monkeypatch, "standin_entry")
    code = cli.main(
        [
            str(DEMO),
            "--wait",
            _ckpt(tmp_path),
            f"slurm.partition={slurm_cluster.partition}",
            "slurm.time=5",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    job_id = next(
        line.split()[4] for line in out.splitlines() if line.startswith("[launch] submitted SLURM job")
    )
    records = _rank_records(tmp_path)
    assert sorted(records) == [0, 1]
    for rank, record in records.items():
        assert (record["RANK"], record["WORLD_SIZE"], record["rank_sum"]) == (str(rank), "2", 3)
        assert record["job_id"] == job_id and record["MASTER_ADDR"] == slurm_cluster.node
    assert "all 2 ranks finished" in out and "[rank0] stand-in rank 0 done" in out
    # The ranks have returned; SLURM marks the job done once the batch script has exited.
    _wait_for(lambda: not slurm_job_active(job_id), 90, "SLURM to end the job")
    state = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, env=slurm_cluster.env, timeout=30
    ).stdout
    assert "JobState=COMPLETED" in state and "NumTasks=2" in state
    assert (tmp_path / "runs" / "demo" / "slurm" / job_id / f"{job_id}_1_log.out").exists()


@pytest.mark.slow  # two job starts (each importing torch + megatron-core) around a requeue
def test_slurm_time_limit_signal_saves_then_requeues_and_resumes(
    slurm_cluster, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    _use_standin(monkeypatch, "preempted_entry")
    code = cli.main(
        [
            str(DEMO),
            _ckpt(tmp_path),
            "checkpoint.resume=none",
            f"slurm.partition={slurm_cluster.partition}",
            "slurm.time=10",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    job_id = next(
        line.split()[4] for line in out.splitlines() if line.startswith("[launch] submitted SLURM job")
    )
    marks = tmp_path / "runs" / "demo" / "standin"
    _wait_for(lambda: len(list(marks.glob("waiting_rank*"))) == 2, 300, "both ranks to start")
    # What SLURM does signal_delay_s before the time limit (--signal=USR2@...): USR2 to the tasks.
    subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm_cluster.env, check=True, timeout=30)
    _wait_for(lambda: len(list(marks.glob("run2_rank*"))) == 2, 300, "the requeued job to run")
    _wait_for(lambda: not slurm_job_active(job_id), 60, "the requeued job to end")
    for rank in (0, 1):
        # The first run returned normally (as the trainer does after saving) before the requeue,
        first = json.loads((marks / f"run1_rank{rank}.json").read_text())
        assert first == {"stopped": True, "resume": "none"}
        # ...and the requeued run resumes from the latest checkpoint.
        assert json.loads((marks / f"run2_rank{rank}.json").read_text()) == {"resume": "auto"}
    state = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, env=slurm_cluster.env, timeout=30
    ).stdout
    assert "JobState=COMPLETED" in state and "Restarts=1" in state
    logs = tmp_path / "runs" / "demo" / "slurm" / job_id
    log = "".join(p.read_text(errors="replace") for p in sorted(logs.glob(f"{job_id}_0_log.*")))
    assert f"Requeued job {job_id}" in log and "asking the trainer to checkpoint and stop" in log


# ---------------------------------------------------------------------------- sweeps


def test_sweep_dry_run_prints_the_runs_and_the_array_script(capsys):
    code = cli.main(
        [str(REPO / "recipes" / "sweeps" / "paper_1b_F.yaml"), "--sweep", "--dry-run", *DEMO_DATA]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "sweep paper-1b-F: 5 runs, F-matched" in out
    assert "paper-1b-F-transformer_1b-102B" in out and "102,000,000,000" in out
    assert "#SBATCH --array=0-4%5" in out and "dry run: nothing submitted" in out


def test_sweep_checks_every_runs_inputs_before_anything_runs(tmp_path, monkeypatch, capsys):
    """A sweep stops with one line naming the sweep run and the input, exit 2, before printing
    its table or starting any run; a dry run prints its table first, then fails the same way
    (as a single run's launch and dry run do)."""
    sweep = _mini_sweep(tmp_path)
    _use_standin(monkeypatch, "standin_entry")
    args = [str(sweep), "--sweep", "--local", "--nproc", "1", _ckpt(tmp_path)]
    cases = [
        (
            [f"data.tokenizer={tmp_path}/tok", "--dry-run"],
            rf"sweep run mini-transformer_tiny-10K: data.tokenizer: {tmp_path}/tok does not exist",
        ),
        (
            [f"data.blend={tmp_path}/nope"],
            rf"sweep run mini-transformer_tiny-10K: dataset prefix {tmp_path}/nope: .*\.idx does not exist",
        ),
    ]
    # Only the second run's checkpoint folder names a step that is not there.
    broken = tmp_path / "runs" / "mini" / "mini-mamba_tiny-10K" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "latest").write_text("step_00000009")
    cases.append(
        ([], rf"sweep run mini-mamba_tiny-10K: {broken}/latest names .*step_00000009, which is not a")
    )
    for extra, expected in cases:
        assert cli.main(args + extra) == 2, extra
        captured = capsys.readouterr()
        assert re.fullmatch(f"error: {expected}.*\n", captured.err), captured.err
        if "--dry-run" in extra:  # the plan, then the error instead of the all-clear line
            assert "sweep mini" in captured.out and "nothing submitted" not in captured.out
        else:
            assert "sweep mini" not in captured.out and "dry run" not in captured.out  # no table printed
    assert not list((tmp_path / "runs" / "mini").glob("*/standin"))  # no run started


def test_sweep_local_runs_each_recipe_in_turn(tmp_path, monkeypatch, capsys):
    sweep = _mini_sweep(tmp_path)
    _use_standin(monkeypatch, "standin_entry")
    code = cli.main([str(sweep), "--sweep", "--local", "--nproc", "1", _ckpt(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[sweep] 2/2 runs succeeded (compare group mini)" in out
    for name in ("mini-transformer_tiny-10K", "mini-mamba_tiny-10K"):
        record = json.loads((tmp_path / "runs" / "mini" / name / "standin" / "rank0.json").read_text())
        assert record["recipe"] == name


def _mini_sweep(tmp_path, overrides: str = "train.warmup_steps=1") -> Path:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "sweep: {name: mini, match: F, reference: transformer_tiny, tokens: [10K], "
        f"overrides: [{overrides}], recipes: ["
        f"{REPO}/recipes/transformer_tiny.yaml, {REPO}/recipes/mamba_tiny.yaml]}}\n"
    )
    return sweep


def _fake_checkpoint(root: Path, step: int) -> None:
    """A complete checkpoint directory of ``step`` (as the layout marks one) named by latest."""
    from hybrid_megatron.checkpoint_layout import step_dir_name, write_latest

    (root / step_dir_name(step)).mkdir(parents=True)
    (root / step_dir_name(step) / "metadata.json").write_text("{}")
    write_latest(root, step_dir_name(step))


def test_sweep_rerun_skips_the_runs_that_finished(tmp_path, monkeypatch, capsys):
    """A sweep run again after a stop skips runs whose latest checkpoint is at their last step
    and runs the others (which resume from their own checkpoints)."""
    from hybrid_megatron.accounting import count_parameters
    from hybrid_megatron.config import derived, load_recipe
    from hybrid_megatron.scaling.sweep import load_sweep

    sweep = _mini_sweep(tmp_path)
    _, runs = load_sweep(sweep, (_ckpt(tmp_path),))
    recipes = [load_recipe(run.recipe_path, run.overrides) for run in runs]
    totals = [derived(recipe, 1, count_parameters)["total_steps"] for recipe in recipes]
    _fake_checkpoint(Path(recipes[0].checkpoint.dir), totals[0])  # finished
    _fake_checkpoint(Path(recipes[1].checkpoint.dir), totals[1] - 1)  # stopped one step short
    out = run_sweep_skipping_the_first(sweep, tmp_path, monkeypatch, capsys, recipes, runs[1].name)
    assert f"[sweep] 1 runs finished earlier, skipped: {runs[0].name}" in out


def run_sweep_skipping_the_first(sweep, tmp_path, monkeypatch, capsys, recipes, second: str) -> str:
    """Runs the two-run mini sweep locally with the stand-in trainer and checks that its first
    run was skipped (no stand-in output) and its second ran (named ``second``); returns stdout."""
    _use_standin(monkeypatch, "standin_entry")
    code = cli.main([str(sweep), "--sweep", "--local", "--nproc", "1", _ckpt(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[sweep] 1/1 runs succeeded (compare group mini)" in out
    assert not (Path(recipes[0].run_dir) / "standin").exists()
    record = json.loads((Path(recipes[1].run_dir) / "standin" / "rank0.json").read_text())
    assert record["recipe"] == second
    return out


@pytest.mark.long  # three short runs of the real trainer
def test_interrupted_sweep_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    """The real trainer: a sweep finishes; its second run is then set back to a middle
    checkpoint (as if the call's time limit had stopped it there). Running the sweep again
    skips the first run and resumes the second from that checkpoint: the later steps' losses
    equal the uninterrupted ones bit for bit."""
    import shutil

    from hybrid_megatron.checkpoint_layout import step_dir_name, step_directories, write_latest
    from tests.training_helpers import read_losses

    monkeypatch.delenv("HM_TRAIN_ENTRY", raising=False)
    sweep = _mini_sweep(
        tmp_path,
        "train.warmup_steps=1, model.num_layers=2, data.seq_length=64, train.global_batch_size=4, "
        "train.log_interval=1, train.eval_interval=0, checkpoint.interval=3, checkpoint.keep_last=100, "
        "train.deterministic=true, tracking.enabled=false",
    )
    args = [str(sweep), "--sweep", "--local", "--nproc", "1", _ckpt(tmp_path), "data.num_workers=0"]
    assert cli.main(args) == 0, capsys.readouterr().out
    capsys.readouterr()
    first, second = (
        tmp_path / "runs" / "mini" / name for name in ("mini-transformer_tiny-10K", "mini-mamba_tiny-10K")
    )
    reference = {1: read_losses(first), 2: read_losses(second)}
    first_log = (first / "train_log.jsonl").read_text()
    steps = max(reference[2])
    assert sorted(reference[2]) == list(range(1, steps + 1))
    # stop the second run at a middle checkpoint: later checkpoints and log lines are what the
    # stop lost
    root = second / "checkpoints"
    saved = step_directories(root)
    middle = saved[len(saved) // 2][0]
    assert 0 < middle < steps
    for step, path in saved:
        if step > middle:
            shutil.rmtree(path)
    write_latest(root, step_dir_name(middle))
    lines = (second / "train_log.jsonl").read_text().splitlines()
    (second / "train_log.jsonl").write_text(
        "".join(x + "\n" for x in lines if json.loads(x)["step"] <= middle)
    )

    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "[sweep] 1 runs finished earlier, skipped: mini-transformer_tiny-10K" in out
    assert "[sweep] 1/1 runs succeeded" in out
    assert (first / "train_log.jsonl").read_text() == first_log  # not run again
    resumed = [json.loads(line)["step"] for line in (second / "train_log.jsonl").read_text().splitlines()]
    assert resumed == list(range(1, steps + 1))  # the later steps appended once, by the resumed run
    assert read_losses(second) == reference[2]


@pytest.mark.slow  # the real trainer on two SLURM tasks (TP=2): two ranks import torch + megatron-core
def test_slurm_runs_the_real_trainer_to_a_checkpoint(slurm_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.delenv("HM_TRAIN_ENTRY", raising=False)
    code = cli.main(
        [
            str(DEMO),
            "--wait",
            _ckpt(tmp_path),
            f"slurm.partition={slurm_cluster.partition}",
            "slurm.time=10",
            "train.steps=4",
            "train.warmup_steps=1",
            "checkpoint.interval=4",
            "train.eval_interval=0",
            "tracking.enabled=false",
            "model.num_layers=2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    root = tmp_path / "runs" / "demo" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert (root / "step_00000004" / "metadata.json").exists()
    assert "all 2 ranks finished" in out and "final_loss" in out
    # rank 0's progress lines, followed by the launcher, end in the share done and the time left
    assert re.search(
        r"^\[rank0\] step 1/4 loss .* \| 25% elapsed \d+:\d\d:\d\d left \d+:\d\d:\d\d$", out, re.M
    )
    assert re.search(r"^\[rank0\] step 4/4 loss .* \| 100% elapsed \d+:\d\d:\d\d left 0:00:00$", out, re.M)


@pytest.mark.slow  # a reference run beside the SLURM job, then two job starts around a requeue
def test_slurm_preemption_of_the_real_trainer_saves_requeues_and_resumes_exactly(slurm_cluster, tmp_path):
    """The real trainer on one SLURM task: SIGUSR2 (what SLURM sends ``signal_delay_s`` before
    the time limit) after the first checkpoint; the trainer saves at the next step boundary,
    submitit requeues the job, the requeued job resumes from that save and finishes, and the
    loss of every step equals an uninterrupted run's bitwise. ``--wait`` follows the job
    through the requeue."""
    from tests.training_helpers import read_losses, start_job, wait_job

    recipe = str(REPO / "recipes" / "intra_tiny.yaml")
    common = [
        "model.num_layers=2",
        "data.seq_length=64",
        "train.global_batch_size=4",
        "train.steps=30",
        "train.warmup_steps=2",
        "train.log_interval=1",
        "train.eval_interval=0",
        "checkpoint.interval=4",
        "checkpoint.keep_last=2",
        "train.deterministic=true",
        "tracking.enabled=false",
    ]
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    # The uninterrupted reference, one thread like the SLURM task (cpus_per_task 1).
    reference = start_job(recipe, [*common, f"checkpoint.dir={ref_dir}/checkpoints"], 1, ref_dir / "logs")
    env = {k: v for k, v in slurm_cluster.env.items() if k != "HM_TRAIN_ENTRY"}
    out = open(tmp_path / "out", "w+")
    launcher_proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "launch" / "slurm.py"),
            recipe,
            "--wait",
            *common,
            f"checkpoint.dir={cut_dir}/checkpoints",
            f"slurm.partition={slurm_cluster.partition}",
            "slurm.time=10",
        ],
        cwd=tmp_path,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def launcher_log() -> str:
        return (tmp_path / "out").read_text()

    try:
        _wait_for(lambda: "[launch] submitted SLURM job" in launcher_log(), 120, "the submission")
        job_id = next(
            line.split()[4]
            for line in launcher_log().splitlines()
            if line.startswith("[launch] submitted SLURM job")
        )
        _wait_for(
            lambda: max(read_losses(cut_dir), default=0) >= 5, 300, "step 5 (after the step-4 checkpoint)"
        )
        subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm_cluster.env, check=True, timeout=30)
        code = launcher_proc.wait(timeout=400)
    finally:
        if launcher_proc.poll() is None:
            launcher_proc.kill()
        out.close()
    text = launcher_log()
    assert code == 0, text
    assert wait_job(reference, timeout=300) == [0]
    assert "[launch] job" in text and "all 1 ranks finished" in text

    logs = cut_dir / "slurm" / job_id
    log = "".join(p.read_text(errors="replace") for p in sorted(logs.glob(f"{job_id}_0_log.*")))
    assert "asking the trainer to checkpoint and stop" in log and f"Requeued job {job_id}" in log
    saved = [int(s) for s in re.findall(r"saved checkpoint \S+/step_(\d{8})", log)]
    resumed = re.findall(r"resumed from \S+/step_(\d{8}) at step (\d+)", log)
    assert len(resumed) == 1, log
    stop_step = int(resumed[0][1])
    assert int(resumed[0][0]) == stop_step and 5 <= stop_step < 30
    # First run: every 4 steps, then on the signal; resumed run: every 4 steps, then at the end.
    first = [s for s in range(4, stop_step + 1, 4)] + ([stop_step] if stop_step % 4 else [])
    assert saved == first + [s for s in range(4, 30, 4) if s > stop_step] + [30]
    # Every step ran exactly once, in order, and matches the uninterrupted run bitwise.
    steps = [json.loads(line)["step"] for line in (cut_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    assert read_losses(cut_dir) == read_losses(ref_dir)
    root = cut_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000030"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000028", "step_00000030"]
    state = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, env=slurm_cluster.env, timeout=30
    ).stdout
    assert "JobState=COMPLETED" in state and "Restarts=1" in state
