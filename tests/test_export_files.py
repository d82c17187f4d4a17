"""What an exported Hugging Face directory looks like to the programs that read it: every file
readable as any file a plain open() writes (the umask's mode), and the tokenizer of a
remote-code export loadable as the plain fast tokenizer, without running the export's code."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from hybrid_megatron.atomic_output import umask_file_mode
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.convert import export_model
from tests.conftest import build_single
from tests.convert_helpers import full_state
from tests.model_configs import tiny_model
from tests.training_helpers import REPO

TOKENIZER = REPO / "data" / "tokenizer"


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_umask_file_mode_is_what_open_gives(tmp_path, umask_027):
    assert umask_file_mode() == 0o640
    (tmp_path / "plain").write_text("x")
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o640


def _export_tiny(tmp_path, max_shard_bytes=None):
    """A tiny inter model exported as remote code in fp32, with the demo tokenizer."""
    cfg = tiny_model("inter")
    path, target, _ = export_model(
        ModelConfig(**cfg),
        full_state(build_single(cfg)),
        tmp_path / "hf",
        "remote_code",
        "fp32",
        tokenizer_path=str(TOKENIZER),
        progress=False,
        max_shard_bytes=max_shard_bytes,
    )
    return path, target


@pytest.mark.parametrize("max_shard_bytes", [None, 64 * 1024], ids=["one_file", "sharded"])
def test_every_exported_file_has_the_umask_mode(single_rank, tmp_path, umask_027, max_shard_bytes):
    path, _ = _export_tiny(tmp_path, max_shard_bytes=max_shard_bytes)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in path.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)  # the weights are among them
    assert "tokenizer.json" in modes
    assert set(modes.values()) == {"0o640"}, modes


# Loads the export's tokenizer as a user would, with no trust_remote_code; prints its class,
# the ids of a text and whether any of the export's code was imported.
LOAD = """
import sys
from transformers import AutoTokenizer, PreTrainedTokenizerFast
path = sys.argv[1]
auto = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
fast = PreTrainedTokenizerFast.from_pretrained(path)
code = sorted(m for m in sys.modules if "hybrid_megatron" in m and "finder" not in m)
print(type(auto).__name__, auto("Emma Woodhouse")["input_ids"], fast("Emma Woodhouse")["input_ids"], code)
"""


def test_the_tokenizer_of_a_remote_code_export_loads_without_its_code(single_rank, tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    path, target = _export_tiny(tmp_path)
    assert target == "remote_code" and json.loads((path / "config.json").read_text())["auto_map"]
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "auto_map" not in tokenizer_config
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(path)],
        cwd=tmp_path,  # not the repository: nothing of ours importable but through the export
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trust_remote_code" not in done.stdout + done.stderr  # never asked
    ids = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json")).encode("Emma Woodhouse").ids
    name, auto_ids, fast_ids, code = done.stdout.strip().split(" ", 1)[0], *_lists(done.stdout)
    assert name == "TokenizersBackend"  # transformers' fast tokenizer class
    assert auto_ids == fast_ids == ids and code == []


def _lists(line: str) -> list[list]:
    """The three bracketed lists printed by LOAD, parsed."""
    import ast

    start = line.index("[")
    return list(ast.literal_eval("(" + line[start:].strip().replace("] [", "], [") + ")"))
