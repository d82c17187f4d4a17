"""The checkpoint layout on disk: step names, ``latest``, resolving a root or a step directory,
listing, pruning, publishing a save and the recipe saved with a checkpoint. No model is built:
these are directory trees made by hand, as a save leaves them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_megatron import checkpoint_layout as layout
from hybrid_megatron.checkpoint_layout import CheckpointError

REPO = Path(__file__).resolve().parents[1]


def _complete(root: Path, name: str) -> Path:
    """A directory that looks like a finished save (megatron-core's metadata file in it)."""
    path = root / name
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    return path


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_step_directory_names_round_trip():
    assert layout.step_dir_name(40) == "step_00000040"
    assert layout.step_dir_name(123456789) == "step_123456789"
    assert layout.checkpoint_step(Path("/x/step_00000040")) == 40
    assert layout.checkpoint_step("step_123456789") == 123456789
    for other in ("step_00000040.partial-1a2b3c4d", "latest", "step_", "step_4x", "ckpt_00000040"):
        assert layout.checkpoint_step(other) is None, other


def test_latest_is_written_atomically_as_the_bare_name(tmp_path):
    layout.write_latest(tmp_path, "step_00000004")
    assert (tmp_path / "latest").read_bytes() == b"step_00000004"  # the on-disk format
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no temp file left
    layout.write_latest(tmp_path, "step_00000008")
    assert layout.read_latest(tmp_path) == "step_00000008"
    (tmp_path / "latest").write_text("step_00000012\n")  # a pointer written by hand
    assert layout.read_latest(tmp_path) == "step_00000012"
    assert layout.read_latest(tmp_path / "elsewhere") is None


def test_latest_checkpoint_is_what_latest_names_and_must_be_complete(tmp_path):
    assert layout.latest_checkpoint(tmp_path) is None  # nothing saved yet
    _complete(tmp_path, "step_00000004")
    _complete(tmp_path, "step_00000008")
    layout.write_latest(tmp_path, "step_00000004")
    assert layout.latest_checkpoint(tmp_path) == tmp_path / "step_00000004"  # not the highest
    (tmp_path / "step_00000012").mkdir()  # no metadata: never finished
    layout.write_latest(tmp_path, "step_00000012")
    with pytest.raises(
        CheckpointError,
        match=f"^{tmp_path}/latest names {tmp_path}/step_00000012, which is not a complete checkpoint$",
    ):
        layout.latest_checkpoint(tmp_path)
    layout.write_latest(tmp_path, "step_00000016")  # missing altogether
    with pytest.raises(CheckpointError, match="step_00000016, which is not a complete checkpoint"):
        layout.latest_checkpoint(str(tmp_path))


def test_resolve_a_root_a_step_directory_a_missing_and_a_partial_one(tmp_path):
    root = tmp_path / "checkpoints"
    step4 = _complete(root, "step_00000004")
    _complete(root, "step_00000008")
    layout.write_latest(root, "step_00000004")
    assert layout.resolve_checkpoint(root) == step4  # a root: what latest names
    assert layout.resolve_checkpoint(str(root / "step_00000008")) == root / "step_00000008"
    missing = tmp_path / "nope"
    with pytest.raises(
        CheckpointError, match=f"^{missing}: neither a checkpoint directory nor a root with 'latest'$"
    ):
        layout.resolve_checkpoint(missing)
    partial = root / "step_00000012.partial-0123abcd"
    partial.mkdir()  # an interrupted save: no metadata
    with pytest.raises(CheckpointError, match="step_00000012.partial-0123abcd: neither a checkpoint"):
        layout.resolve_checkpoint(partial)
    with pytest.raises(CheckpointError, match="neither"):
        layout.resolve_checkpoint(tmp_path)  # holds a root, is none
    layout.write_latest(root, partial.name)  # a root whose latest is broken says so
    with pytest.raises(CheckpointError, match="which is not a complete checkpoint"):
        layout.resolve_checkpoint(root)


def test_checkpoint_root_of_a_root_or_a_step_directory(tmp_path, monkeypatch):
    root = tmp_path / "run" / "checkpoints"
    assert layout.checkpoint_root(root / "step_00000004") == root
    assert layout.checkpoint_root(root / "step_00000004.partial-0123abcd") == root
    assert layout.checkpoint_root(root) == root
    monkeypatch.chdir(tmp_path)
    assert layout.checkpoint_root("run/checkpoints/step_00000004") == root  # made absolute


def test_step_directories_are_listed_by_step_not_by_name(tmp_path):
    for name in ("step_99999999", "step_100000000", "step_00000002", "step_00000010"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_00000012.partial-0123abcd").mkdir()
    (tmp_path / "step_00000014").write_text("a file, not a checkpoint")
    (tmp_path / "mlflow_run_id").write_text("abc")
    listed = layout.step_directories(tmp_path)
    assert [step for step, _ in listed] == [2, 10, 99999999, 100000000]
    assert [path.name for _, path in listed] == [
        "step_00000002",
        "step_00000010",
        "step_99999999",
        "step_100000000",
    ]


def test_prune_keeps_the_newest_up_to_latest_and_higher_steps(tmp_path):
    for step in (2, 4, 6, 8, 10):
        _complete(tmp_path, layout.step_dir_name(step))
    (tmp_path / "step_00000012.partial-0123abcd").mkdir()  # an interrupted save
    layout.write_latest(tmp_path, "step_00000008")
    layout.prune(tmp_path, keep_last=2)
    # 6 and 8 are the two newest up to latest; 10 is another run's and stays; the leftover goes.
    assert _names(tmp_path) == ["step_00000006", "step_00000008", "step_00000010"]
    layout.prune(tmp_path, keep_last=1)
    assert _names(tmp_path) == ["step_00000008", "step_00000010"]
    assert layout.read_latest(tmp_path) == "step_00000008"


def test_prune_orders_by_step_past_eight_digits(tmp_path):
    for step in (99999998, 99999999, 100000000):
        _complete(tmp_path, layout.step_dir_name(step))
    layout.write_latest(tmp_path, "step_100000000")
    layout.prune(tmp_path, keep_last=2)
    assert _names(tmp_path) == ["step_100000000", "step_99999999"]  # by name order 1 < 9


def test_prune_deletes_nothing_when_latest_names_no_step_directory(tmp_path):
    for step in (2, 4, 6):
        _complete(tmp_path, layout.step_dir_name(step))
    layout.prune(tmp_path, keep_last=1)  # no latest at all
    resaved = _complete(tmp_path, "step_00000006.partial-0123abcd")
    layout.write_latest(tmp_path, resaved.name)  # a re-save in progress names its new copy
    layout.prune(tmp_path, keep_last=1)
    assert _names(tmp_path) == [
        "step_00000002",
        "step_00000004",
        "step_00000006",
        "step_00000006.partial-0123abcd",
    ]


def test_a_save_is_published_under_its_step_name_then_named_by_latest(tmp_path):
    root = tmp_path / "checkpoints"
    stale = root / "step_00000002.partial-deadbeef"
    stale.mkdir(parents=True)  # left by a crash
    partial = layout.start_save(root, 4)
    assert partial.parent == root and partial.name.startswith("step_00000004.partial-")
    assert len(partial.name) == len("step_00000004.partial-") + 8 and partial.is_dir()
    assert not stale.exists()
    assert layout.read_latest(root) is None  # nothing published yet
    (partial / "metadata.json").write_text("{}")
    assert layout.finish_save(partial) == root / "step_00000004"
    assert _names(root) == ["step_00000004"] and layout.read_latest(root) == "step_00000004"


def test_resaving_the_step_latest_names_keeps_latest_on_a_complete_copy(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    old = _complete(root, "step_00000004")
    (old / "old").write_text("1")
    layout.write_latest(root, old.name)
    partial = layout.start_save(root, 4)
    (partial / "metadata.json").write_text("{}")

    def dies(path, *args, **kwargs):
        raise OSError("killed while deleting")

    monkeypatch.setattr(layout.shutil, "rmtree", dies)
    with pytest.raises(OSError, match="killed"):
        layout.finish_save(partial)
    assert layout.read_latest(root) == partial.name  # named before the old copy was touched
    monkeypatch.undo()
    assert layout.start_save(root, 6).exists() and partial.exists()  # latest's copy is no leftover
    assert layout.finish_save(partial) == old
    assert layout.read_latest(root) == "step_00000004" and not (old / "old").exists()


def test_the_saved_recipe_is_read_and_validated(tmp_path):
    import yaml

    from hybrid_megatron.config import RecipeError, load_recipe

    step_dir = _complete(tmp_path, "step_00000004")
    with pytest.raises(
        CheckpointError, match=f"^{step_dir}: has no recipe.yaml; cannot tell which model it holds$"
    ):
        layout.read_saved_recipe(step_dir)
    assert layout.read_saved_model(step_dir) is None
    recipe = load_recipe(REPO / "recipes" / "intra_tiny.yaml", ["model.num_layers=3"])
    (step_dir / "recipe.yaml").write_text(recipe.to_yaml())
    saved = layout.read_saved_recipe(step_dir)
    assert saved.name == recipe.name and saved.model.num_layers == 3
    assert saved.model == recipe.model and saved.data.tokenizer == recipe.data.tokenizer
    assert layout.read_saved_model(step_dir) == recipe.model
    model = recipe.model.model_dump(mode="json")
    model["num_layers"] = 5
    (step_dir / "model.yaml").write_text(yaml.safe_dump({"model": model}))  # as from-hf writes it
    assert layout.read_saved_model(step_dir).num_layers == 5  # model.yaml comes first
    (step_dir / "recipe.yaml").write_text("model:\n  num_layers: zero\n")
    with pytest.raises(RecipeError, match="recipe.yaml"):
        layout.read_saved_recipe(step_dir)


def test_importing_the_layout_loads_neither_torch_nor_megatron():
    # The package __init__ is bypassed so that only this module's own imports count.
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('hybrid_megatron'); pkg.__path__ = [{str(REPO / 'hybrid_megatron')!r}]\n"
        "sys.modules['hybrid_megatron'] = pkg\n"
        "import hybrid_megatron.checkpoint_layout\n"
        "print(sorted(m for m in ('torch', 'megatron', 'megatron.core') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
