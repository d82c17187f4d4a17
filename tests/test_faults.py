"""Faults a cluster run meets, injected on purpose: a rank killed mid-save, a full disk, a stop
signal during a save, truncated and corrupt checkpoint and dataset files, token ids beyond the
vocabulary. Each case's docstring says what it injects, what must survive and how that is
checked. The whole file runs in `make test-long` (a few minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.training_helpers import REPO

pytestmark = pytest.mark.long

RECIPE = str(REPO / "recipes" / "intra_tiny.yaml")
KILL_TRIALS = 20


def _saver(*args: str, **popen) -> subprocess.CompletedProcess:
    """Run tests/fault_saver.py (one gloo rank) with this tree's package; returns the result."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tests.fault_saver", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        **popen,
    )


def _step(name: str | None) -> int:
    return int(name.split("_")[1]) if name else 0


def test_kill9_during_saves_always_resumes_from_the_last_complete_checkpoint(tmp_path):
    """Injects: SIGKILL to a saving rank and its helper processes (as SLURM ends a job step), 20
    times, each a seeded random delay (0-3 s) after its first save returned; saves follow each
    other with keep_last 2, so kills land in megatron-core's writes, the publishing renames and
    the pruning. Must survive: after every kill ``latest`` names a complete checkpoint, of the
    last save that returned or of the one whose publishing had begun, never a partial one; no
    ``step_N`` directory is incomplete. Checked: the next process resumes from what ``latest``
    names and finds every weight equal to that step (each save sets them to its step number)."""
    root = tmp_path / "ckpt"
    result = _saver(str(root), "--kill-trials", str(KILL_TRIALS), "--seed", "24", "--max-delay", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == KILL_TRIALS + 1
    previous_latest, mid_save = None, 0
    for record in records:
        lines = [line.split(" @")[0] for line in record["lines"]]
        if _step(previous_latest):
            assert lines[0] == f"resumed {_step(previous_latest)} ok", record
        else:
            assert not any(line.startswith("resumed") for line in lines), record
        assert not any(line.startswith(("error", "resumed") + ("WRONG",)) for line in lines[1:]), record
        assert all(record["step_dirs"].values()), record  # every step_N directory is complete
        latest = record["latest"]
        if record["trial"] == KILL_TRIALS:  # the last process only resumes
            assert record["status"] == 0 and latest == previous_latest
            break
        assert record["killed"] and os.WIFSIGNALED(record["status"]), record
        saved = [int(line.split()[1]) for line in lines if line.startswith("saved")]
        begun = [int(line.split()[1]) for line in lines if line.startswith("saving")]
        last_saved = saved[-1] if saved else _step(previous_latest)
        assert last_saved <= _step(latest) <= (begun[-1] if begun else last_saved), record
        if latest is not None:
            assert latest in record["step_dirs"] and record["step_dirs"][latest], record
        mid_save += bool(lines) and lines[-1].startswith("saving")
        previous_latest = latest
    assert mid_save >= KILL_TRIALS // 2, "too few kills landed during a save"
    assert _step(previous_latest) >= KILL_TRIALS, "a trial saved nothing"


def test_full_disk_during_a_save_gives_one_error_and_keeps_the_previous_checkpoint(tmp_path):
    """Injects: a file size limit of 1 MiB (RLIMIT_FSIZE, with SIGXFSZ ignored so that writes fail
    with EFBIG, as on a full disk) on a process whose checkpoint shards are ~6 MB, after two
    saves without it. Must survive: ``latest`` and the checkpoint it names, loadable; the
    unfinished directory is removed. Checked: the process prints one CheckpointError naming the
    step, the checkpoint directory, the cause and the kept checkpoint; a later process resumes
    from step 2 with step 2's weights."""
    root = tmp_path / "ckpt"
    first = _saver(str(root), "2")
    assert first.returncode == 0 and first.stdout.split() == "saving 1 saved 1 saving 2 saved 2".split()

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    starved = _saver(str(root), "1", preexec_fn=full_disk)
    assert starved.returncode == 2, starved.stderr[-3000:]
    lines = starved.stdout.splitlines()
    assert lines[:2] == ["resumed 2 ok", "saving 3"] and len(lines) == 3
    assert lines[2].startswith(f"error cannot save checkpoint step_00000003 in checkpoint.dir {root}: ")
    assert "a write failed (" in lines[2] and "GiB free there" in lines[2]
    assert lines[2].endswith("latest still names step_00000002")
    assert (root / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    after = _saver(str(root), "0")
    assert after.returncode == 0 and after.stdout.splitlines() == ["resumed 2 ok"]


# ---- in-process: the trainer on one gloo rank ------------------------------------------------

_RUN = (
    "train.warmup_steps=1",
    "train.log_interval=1",
    "train.eval_interval=0",
    "tracking.enabled=false",
    "model.num_layers=2",
    "data.seq_length=64",
    "train.global_batch_size=4",
)


def _recipe(tmp_path, *extra):
    from hybrid_megatron.config import load_recipe

    return load_recipe(RECIPE, [f"checkpoint.dir={tmp_path}/checkpoints", *_RUN, *extra])


@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_sigterm_during_a_save_saves_once_and_stops(single_rank, tmp_path, monkeypatch, twice):
    """Injects: SIGTERM to the training process while megatron-core writes the step-2 save
    (interval 2, 6 steps), and with ``twice`` a second SIGTERM once that save is published.
    Must survive: the run, which finishes the save, stops after step 2 without another save (the
    exit save finds step 2 saved) and without dying of the second signal. Checked: the saves
    made, the summary's steps and signal, ``latest`` and the complete checkpoint it names."""
    from megatron.core import dist_checkpointing

    from hybrid_megatron import checkpoint_layout as layout
    from hybrid_megatron.training.entry import train

    real_save, real_finish = dist_checkpointing.save, layout.finish_save
    saves = []

    def save_hit_by_sigterm(state, directory, *args, **kwargs):
        saves.append(Path(directory).name.split(".partial-")[0])
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(state, directory, *args, **kwargs)

    def finish_then_sigterm(partial):
        final = real_finish(partial)
        if twice:
            os.kill(os.getpid(), signal.SIGTERM)
        return final

    monkeypatch.setattr(dist_checkpointing, "save", save_hit_by_sigterm)
    monkeypatch.setattr(layout, "finish_save", finish_then_sigterm)
    summary = train(_recipe(tmp_path, "train.steps=6", "checkpoint.interval=2"))
    root = tmp_path / "checkpoints"
    assert saves == ["step_00000002"]
    assert summary["steps"] == 2 and summary["stopped_by_signal"] == signal.SIGTERM
    assert summary["last_checkpoint"] == str(root / "step_00000002")
    assert (root / "latest").read_text() == "step_00000002" and layout.is_complete(root / "step_00000002")


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A 2-step run's checkpoint directory (step 2), to copy and damage."""
    return tmp_path_factory.mktemp("saved")


def _damaged_resume(tmp_path, saved, damage):
    """Train 2 steps (once per module), copy the checkpoint, ``damage(step_dir)`` it, resume."""
    from hybrid_megatron.checkpoint_layout import CheckpointError
    from hybrid_megatron.training.entry import train

    if not (saved / "checkpoints" / "latest").exists():
        train(_recipe(saved, "train.steps=2", "checkpoint.interval=2"))
    shutil.copytree(saved / "checkpoints", tmp_path / "checkpoints")
    step_dir = tmp_path / "checkpoints" / "step_00000002"
    damaged = damage(step_dir)
    with pytest.raises(CheckpointError) as caught:
        train(_recipe(tmp_path, "train.steps=3", "checkpoint.interval=2"))
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"
    return str(caught.value), damaged


def _shard_records(step_dir: Path) -> list[tuple[str, int, int]]:
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(step_dir)).read_metadata().storage_data
    return sorted((i.relative_path, i.offset, i.length) for i in storage.values())


def _truncate_shard(step_dir: Path) -> Path:
    shard = sorted(step_dir.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard


def _corrupt_shard(step_dir: Path) -> Path:
    # a record in the middle of a shard: its zip header zeroed, the file's size unchanged
    name, offset, _ = _shard_records(step_dir)[len(_shard_records(step_dir)) // 2]
    data = bytearray((step_dir / name).read_bytes())
    data[offset : offset + 64] = bytes(64)
    (step_dir / name).write_bytes(bytes(data))
    return step_dir / name


def _remove(name: str):
    def damage(step_dir: Path) -> Path:
        (step_dir / name).unlink()
        return step_dir / name

    return damage


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_truncate_shard, r"shard {file} is truncated \(\d+ bytes; its records end at byte \d+\)"),
        (_corrupt_shard, r"shard {file} is corrupt \(its record at byte \d+: "),
        (_remove("common.pt"), r"{file} is missing \(megatron-core's common state\)"),
        (_remove(".metadata"), r"{file} is missing \(the index of its shards\)"),
    ],
    ids=["truncated-shard", "corrupt-shard", "no-common.pt", "no-.metadata"],
)
def test_a_damaged_checkpoint_is_one_error_naming_the_file(
    single_rank, tmp_path, saved_checkpoint, damage, expected
):
    """Injects: a .distcp shard cut to half its size, 64 bytes zeroed at the start of a record
    inside a shard (size unchanged), a deleted common.pt or .metadata, in a copy of a 2-step
    run's checkpoint. Must survive: ``latest``; nothing is trained from a damaged checkpoint.
    Checked: the resume raises one CheckpointError whose message names the damaged file (and
    no traceback text)."""
    message, damaged = _damaged_resume(tmp_path, saved_checkpoint, damage)
    import re

    assert re.search(expected.format(file=re.escape(str(damaged))), message), message
    assert "Traceback" not in message and "\n" not in message


# ---- datasets ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """A 3-document dataset of the demo tokenizer, made by the preprocessing (with stats)."""
    from hybrid_megatron.data.preprocess import PreprocessOptions, preprocess
    from tests.data_helpers import TOKENIZER_DIR, corpus_records, write_jsonl

    folder = tmp_path_factory.mktemp("data")
    corpus = write_jsonl(folder / "c.jsonl", corpus_records(3))
    preprocess(
        PreprocessOptions(
            inputs=[str(corpus)],
            output_prefix=str(folder / "ds"),
            tokenizer=str(TOKENIZER_DIR),
            progress=False,
        )
    )
    return folder / "ds"


def _copy(prefix: Path, tmp_path: Path, stats: bool = True) -> Path:
    for suffix in (".bin", ".idx") + ((".stats.json",) if stats else ()):
        shutil.copy(str(prefix) + suffix, tmp_path / f"ds{suffix}")
    return tmp_path / "ds"


def _build(prefix: Path, tmp_path: Path, vocab: int = 4096):
    from hybrid_megatron.config.data import load_data_config
    from hybrid_megatron.data.datasets import build_gpt_datasets

    config = load_data_config(
        {
            "blend": [{"prefix": str(prefix)}],
            "tokenizer": "tokenizer",
            "seq_length": 32,
            "split": "100,0,0",
            "cache_dir": str(tmp_path / "cache"),
        },
        base_dir=REPO / "data",
    )
    return build_gpt_datasets(config, [4, 0, 0], model_vocab_size=vocab)


def _header(prefix: Path) -> tuple[int, int, int]:
    """(header bytes, sequences, documents) of an .idx."""
    data = Path(str(prefix) + ".idx").read_bytes()
    _, _, sequences, documents = struct.unpack_from("<QBQQ", data, 9)
    return 34, sequences, documents


def _shift_a_pointer(prefix: Path) -> None:
    head, sequences, _ = _header(prefix)
    idx = Path(str(prefix) + ".idx")
    data = bytearray(idx.read_bytes())
    at = head + 4 * sequences + 8 * (sequences - 1)  # the last sequence's pointer
    struct.pack_into("<q", data, at, struct.unpack_from("<q", data, at)[0] + 2)
    idx.write_bytes(bytes(data))


def _reorder_documents(prefix: Path) -> None:
    head, sequences, _ = _header(prefix)
    idx = Path(str(prefix) + ".idx")
    data = bytearray(idx.read_bytes())
    struct.pack_into("<q", data, head + 12 * sequences, 1)  # the leading 0 of the document indices
    idx.write_bytes(bytes(data))


def _truncate(suffix: str, keep: int):
    def damage(prefix: Path) -> None:
        path = Path(str(prefix) + suffix)
        path.write_bytes(path.read_bytes()[:keep])

    return damage


@pytest.mark.parametrize(
    "damage, file, expected",
    [
        (
            _shift_a_pointer,
            ".idx",
            r"unreadable index {file}: sequence 2 points at byte \d+ but the lengths ",
        ),
        (_reorder_documents, ".idx", r"unreadable index {file}: document indices must rise from 0"),
        (_truncate(".idx", 40), ".idx", r"unreadable index {file}: size 40 bytes"),
        (_truncate(".bin", 1000), ".bin", r"{file} has 1000 bytes but the index describes \d+ uint16 tokens"),
    ],
    ids=["pointers-disagree", "document-indices", "truncated-idx", "truncated-bin"],
)
def test_a_damaged_dataset_is_one_error_naming_the_file(tmp_path, small_dataset, damage, file, expected):
    """Injects: an .idx whose last pointer disagrees with the lengths before it (megatron-core
    would read the wrong tokens), document indices that do not start at 0, an .idx cut inside
    its arrays, a .bin cut short. Must survive: nothing is built from the damaged files.
    Checked: building the datasets raises one DataToolsError naming the file."""
    import re

    from hybrid_megatron.data import DataToolsError

    prefix = _copy(small_dataset, tmp_path)
    damage(prefix)
    with pytest.raises(DataToolsError) as caught:
        _build(prefix, tmp_path)
    assert re.search(expected.format(file=re.escape(str(prefix) + file)), str(caught.value)), caught.value


def test_token_ids_beyond_the_vocabulary_are_one_error_naming_the_dataset(
    tmp_path, small_dataset, monkeypatch
):
    """Injects: token ids that reach the model's vocab_size: bytes of a .bin overwritten with
    ids 4000 and 6000 in a dataset without a stats file; a stats file recording a largest id
    of 5000. Must survive: nothing is built. Checked: one DataToolsError naming the dataset and
    its largest id (6000 from the .bin, 5000 from the stats); the .bin is scanned exactly once
    without a stats file and not at all with one (the preprocessing records ``max_token_id``,
    checked against the tokens it wrote)."""
    from hybrid_megatron.data import DataToolsError, datasets

    scans = []
    real_scan = datasets.max_token_id
    monkeypatch.setattr(
        datasets, "max_token_id", lambda summary: scans.append(summary.prefix) or real_scan(summary)
    )

    recorded = json.loads(Path(str(small_dataset) + ".stats.json").read_text())["max_token_id"]
    tokens = np.fromfile(str(small_dataset) + ".bin", np.uint16)
    assert recorded == int(tokens.max()) and 0 < recorded < 4096

    prefix = _copy(small_dataset, tmp_path, stats=False)
    tokens[[5, len(tokens) // 2]] = [4000, 6000]
    tokens.tofile(str(prefix) + ".bin")
    with pytest.raises(DataToolsError) as caught:
        _build(prefix, tmp_path)
    assert str(caught.value).startswith(
        f"dataset prefix {prefix}: its largest token id is 6000 (per {prefix}.bin)"
    )
    assert "model.vocab_size is 4096" in str(caught.value) and scans == [str(prefix)]

    scans.clear()
    assert _build(small_dataset, tmp_path)[0] is not None and scans == []
    (tmp_path / "recorded").mkdir()
    stats_only = _copy(small_dataset, tmp_path / "recorded")
    stats = json.loads(Path(str(stats_only) + ".stats.json").read_text())
    Path(str(stats_only) + ".stats.json").write_text(json.dumps({**stats, "max_token_id": 5000}))
    with pytest.raises(
        DataToolsError, match=rf"its largest token id is 5000 \(per {stats_only}.stats.json\)"
    ):
        _build(stats_only, tmp_path)
    assert scans == []
