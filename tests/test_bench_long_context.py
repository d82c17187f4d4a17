"""bench/long_context.py and train_throughput's --recompute / --seq-length / --max-memory-gib: rows
carry the settings they ran under and train on CPU (tiny scale); the sweep skips the lengths it
holds, stops a kind at its first out-of-memory and keeps to its time budget."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from bench import long_context as lc
from bench import train_throughput as bench
from tests.training_helpers import REPO


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env
    )


def test_recompute_and_seq_length_reach_every_row(tmp_path):
    """tiny's recipe allows 256 positions: 320 raises the limit instead of failing."""
    out = tmp_path / "rows.json"
    done = _python(
        *("-m", "bench.train_throughput", "run", "--scales", "tiny", "--kinds", "inter"),
        *("--ffn", "dense", "--precisions", "bf16", "--warmup", "1", "--steps", "2", "--mbs", "1"),
        *("--recompute", "full", "--seq-length", "320", "--out", str(out)),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert (record["options"]["recompute"], record["options"]["seq_length"]) == ("full", 320)
    [row] = record["rows"]
    assert "error" not in row, row.get("traceback")
    assert (row["recompute"], row["seq_length"]) == ("full", 320)
    assert row["tokens_per_s"] * row["step_s"] == pytest.approx(320)
    assert len(row["losses"]) == 3 and all(math.isfinite(x) for x in row["losses"])


@pytest.mark.slow
def test_recompute_changes_no_loss(tmp_path):
    """The same tiny row under none, selective and full recompute: the same losses (recompute
    replays the forward, it changes no number)."""
    losses = {}
    for mode in ("none", "selective", "full"):
        out = tmp_path / f"{mode}.json"
        options = bench.RunOptions(micro_batch=1, recompute=mode, seq_length=96)
        done = _python(
            *("-m", "bench.train_throughput", "run", "--scales", "tiny", "--kinds", "intra"),
            *("--ffn", "dense", "--precisions", "bf16", "--warmup", "1", "--steps", "2"),
            *("--out", str(out), *options.as_args()),
        )
        assert done.returncode == 0, done.stderr[-2000:]
        [row] = json.loads(out.read_text())["rows"]
        assert "error" not in row, row.get("traceback")
        assert (row["recompute"], row["seq_length"]) == (mode, 96)
        losses[mode] = row["losses"]
    assert losses["selective"] == pytest.approx(losses["none"], rel=1e-5)
    assert losses["full"] == pytest.approx(losses["none"], rel=1e-5)
    assert losses["none"][-1] < losses["none"][0]  # it trains


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seq-length", "0"], "data.seq_length: input should be greater than 0"),
        (["--cuda-graphs", "--recompute", "full"], "train.cuda_graphs: not combined with train.recompute"),
    ],
)
def test_a_setting_the_recipe_rejects_stops_the_run(tmp_path, flags, message):
    done = _python(
        *("-m", "bench.train_throughput", "run", "--scales", "1b", "--kinds", "transformer"),
        *("--ffn", "dense", "--precisions", "bf16", "--out", str(tmp_path / "x.json"), *flags),
    )
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_row_recipe_raises_the_position_limit_only_when_needed():
    assert bench.row_recipe("1b", "transformer").model.max_position_embeddings == 8192
    long = bench.row_recipe("1b", "transformer", bench.RunOptions(seq_length=131072, recompute="full"))
    assert (long.data.seq_length, long.model.max_position_embeddings) == (131072, 131072)
    assert long.train.recompute == "full"
    short = bench.row_recipe("1b", "swa", bench.RunOptions(seq_length=4096))
    assert (short.data.seq_length, short.model.max_position_embeddings) == (4096, 8192)


def test_out_of_memory_is_read_from_the_error_text():
    assert bench.is_out_of_memory("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert bench.is_out_of_memory("RuntimeError: CUDA error: out of memory")
    assert bench.is_out_of_memory(
        "RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
        "allocate memory: you tried to allocate 17179869184 bytes."
    )
    assert not bench.is_out_of_memory("ValueError: No dot product attention backend is available")


# ----------------------------------------------------------------------------- the sweep's rules
class FakeRows:
    """A measure() that trains nothing: each kind fits up to ``fits[kind]`` tokens; records the
    calls and advances a fake clock by ``wall_s`` per call."""

    def __init__(self, fits: dict, clock: list, wall_s: float = 10.0, errors: tuple = ()):
        self.fits, self.clock, self.wall_s, self.errors, self.calls = fits, clock, wall_s, errors, []

    def __call__(self, kind: str, length: int, timeout: float) -> dict:
        self.calls.append((kind, length))
        self.clock[0] += self.wall_s
        if (kind, length) in self.errors:
            return {"kind": kind, "seq_length": length, "error": "RuntimeError: cuDNN failed"}
        if length > self.fits[kind]:
            return {"kind": kind, "seq_length": length, "error": "OutOfMemoryError: ...", "oom": True}
        return {"kind": kind, "seq_length": length, "tokens_per_s": 1e6 / length, "step_s": length / 1e6}


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(lc.time, "monotonic", lambda: now[0])
    return now


def test_sweep_runs_shortest_first_and_stops_a_kind_at_its_first_oom(clock):
    sweep, saved = lc.Sweep({}), []
    measure = FakeRows({"transformer": 16384, "mamba": 65536}, clock)
    lengths = lc.doubling_lengths(8192, 131072)
    assert lengths == [8192, 16384, 32768, 65536, 131072]
    lc.run_sweep(sweep, ["transformer", "mamba"], lengths, 1e9, measure, lambda s: saved.append(len(s.rows)))
    assert measure.calls == [
        ("transformer", 8192),
        ("mamba", 8192),
        ("transformer", 16384),
        ("mamba", 16384),
        ("transformer", 32768),  # out of memory: no 65536 for it
        ("mamba", 32768),
        ("mamba", 65536),
        ("mamba", 131072),
    ]
    assert saved == [1, 2, 3, 4, 5, 6, 7, 8]  # written after every length
    assert sweep.row("transformer", 32768)["oom"] and sweep.row("transformer", 65536) is None
    assert sweep.row("mamba", 65536)["tokens_per_s"] == pytest.approx(1e6 / 65536)


def test_sweep_skips_what_it_holds_and_retries_errors(clock):
    sweep = lc.Sweep({})
    first = FakeRows({"transformer": 16384, "mamba": 8192}, clock, errors=(("mamba", 8192),))
    lc.run_sweep(sweep, ["transformer", "mamba"], [8192, 16384, 32768], 1e9, first, lambda s: None)
    assert first.calls == [
        ("transformer", 8192),
        ("mamba", 8192),
        ("transformer", 16384),
        ("transformer", 32768),
    ]
    again = FakeRows({"transformer": 16384, "mamba": 8192}, clock)
    lc.run_sweep(sweep, ["transformer", "mamba"], [8192, 16384, 32768], 1e9, again, lambda s: None)
    # the error is tried again (and now fits); the OOM and the measured lengths are not
    assert again.calls == [("mamba", 8192), ("mamba", 16384)]
    assert "error" not in sweep.row("mamba", 8192) and sweep.row("mamba", 16384)["oom"]
    assert len(sweep.rows) == 5


def test_sweep_leaves_what_does_not_fit_its_budget_for_the_next_call(clock):
    sweep = lc.Sweep({})
    measure = FakeRows({"transformer": 1 << 20}, clock, wall_s=30.0)
    # 8K takes 30 s, so 16K is predicted at 60 s: 35 s left after 8K is not enough
    lc.run_sweep(sweep, ["transformer"], [8192, 16384], 65.0, measure, lambda s: None)
    assert measure.calls == [("transformer", 8192)] and sweep.row("transformer", 16384) is None
    assert sweep.row("transformer", 8192)["wall_s"] == 30.0


def test_a_killed_length_is_not_recorded(clock):
    sweep = lc.Sweep({})

    def killed(kind, length, timeout):
        clock[0] += timeout
        return {"kind": kind, "seq_length": length, "error": "killed after 100 s", "timed_out": True}

    lc.run_sweep(sweep, ["mamba"], [8192, 16384], 100.0, killed, lambda s: None)
    assert sweep.rows == []


def test_a_sweep_with_other_settings_is_refused(tmp_path):
    settings = {k: 1 for k in lc.SETTINGS}
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**settings, "rows": [{"kind": "mamba", "seq_length": 8}]}))
    assert lc.load_sweep(path, settings).rows == [{"kind": "mamba", "seq_length": 8}]
    with pytest.raises(ValueError, match="recompute 1 there, 'full' here"):
        lc.load_sweep(path, {**settings, "recompute": "full"})


def test_report_table_has_a_cell_per_kind_and_length():
    record = {
        "scale": "1b",
        "recompute": "full",
        "rows": [
            {"kind": "transformer", "seq_length": 8192, "tokens_per_s": 40000.0, "peak_memory_gib": 30.0},
            {"kind": "mamba", "seq_length": 8192, "tokens_per_s": 50000.0, "peak_memory_gib": 31.25},
            {"kind": "transformer", "seq_length": 16384, "oom": True, "error": "OutOfMemoryError"},
            {"kind": "mamba", "seq_length": 16384, "tokens_per_s": 48000.0, "peak_memory_gib": 50.0},
        ],
    }
    lines = lc.markdown(record).splitlines()
    assert lines[2] == "| kind | 8K | 16K |"
    assert lines[4] == "| transformer | 40,000, 30.0 GiB | OOM |"
    assert lines[5] == "| mamba | 50,000 (1.25x), 31.2 GiB | 48,000, 50.0 GiB |"


@pytest.mark.long
def test_tiny_sweep_continues_and_stops_at_out_of_memory(tmp_path):
    """Two short lengths, then a re-run that adds two long ones: the short ones are not run
    again, the transformer runs out of memory at 32K (its attention scores alone are 16 GiB on
    CPU, over the 12 GiB cap) and is not tried at 64K."""
    out = tmp_path / "sweep.json"
    common = ["-m", "bench.long_context", "run", "--scale", "tiny", "--kinds", "transformer"]
    common += ["--max-memory-gib", "12", "--out", str(out)]
    done = _python(*common, "--lengths", "64", "128")
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert (record["scale"], record["recompute"], record["micro_batch"]) == ("tiny", "full", 1)
    assert [(r["kind"], r["seq_length"]) for r in record["rows"]] == [
        ("transformer", 64),
        ("transformer", 128),
    ]
    for r in record["rows"]:
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(r["seq_length"])
        assert all(math.isfinite(x) for x in r["losses"]) and r["device"] == "cpu"

    done = _python(*common, "--lengths", "64", "128", "32768", "65536")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["transformer 32768: out of memory"]
    again = json.loads(out.read_text())
    assert again["rows"][:2] == record["rows"]
    assert again["rows"][2]["oom"] is True and len(again["rows"]) == 3

    report = _python("-m", "bench.long_context", "report", str(out))
    assert report.returncode == 0 and "| kind | 64 | 128 | 32K |" in report.stdout
    assert report.stdout.splitlines()[-1].startswith("| transformer | ")
    assert report.stdout.splitlines()[-1].endswith(" | OOM |")


def test_recompute_reaches_the_model():
    """--recompute sets megatron-core's recompute fields of the row's model (full: every layer,
    one at a time)."""
    script = (
        "from hybrid_megatron import runtime; runtime.setup()\n"
        "from bench import train_throughput as t\n"
        "t._init_process_group()\n"
        "for mode in ('none', 'selective', 'full'):\n"
        "    o = t.RunOptions(recompute=mode, micro_batch=1)\n"
        "    c = t.Trainee.for_options('inter', t.model_config('tiny', 'inter', False, 'bf16', o), o)"
        ".trainable.model_chunks[0].config\n"
        "    print(mode, c.recompute_granularity, c.recompute_method, c.recompute_num_layers)\n"
    )
    done = _python("-c", script)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-3:] == [
        "none None None None",
        "selective selective None None",
        "full full uniform 1",
    ]


@pytest.mark.gpu
def test_memory_cap_makes_a_larger_gpu_allocation_run_out():
    script = (
        "import torch\n"
        "from bench import train_throughput as t\n"
        "t.limit_memory(1.0)\n"
        "a = torch.empty(512 << 20, dtype=torch.uint8, device='cuda')\n"
        "print('fits')\n"
        "b = torch.empty(1 << 30, dtype=torch.uint8, device='cuda')\n"
    )
    done = _python("-c", script)
    assert done.stdout.splitlines() == ["fits"]
    assert done.returncode != 0 and bench.is_out_of_memory(done.stderr)


def test_row_processes_keep_triton_autotuning_on_disk(monkeypatch):
    """Each row's process is started with Triton's on-disk autotuning cache on (unless the caller
    set it), and the parent's MASTER_PORT left out."""
    seen = []

    def fake_run(cmd, env, **kwargs):
        seen.append(env)
        return subprocess.CompletedProcess(cmd, 1, "", "no row")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    row = bench.measure_in_subprocess("tiny", "mamba", False, "bf16", 1, 1, bench.RunOptions())
    assert "subprocess exit 1" in row["error"]
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")
    bench.measure_in_subprocess("tiny", "mamba", False, "bf16", 1, 1, bench.RunOptions())
    assert [env.get("TRITON_CACHE_AUTOTUNING") for env in seen] == ["1", "0"]
    assert all("MASTER_PORT" not in env and env[bench.ROW_PROCESS_ENV] == "1" for env in seen)
