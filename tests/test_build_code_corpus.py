"""bench/build_code_corpus.sh on a small tree: a rebuild that reuses the first build's tokenizer
(TOKENIZER_FROM) gives the same corpus, byte for byte, and a wrong folder is refused."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

from tests.training_helpers import REPO

WORDS = ["def", "return", "import", "class", "self", "for", "in", "if", "else", "value", "node"]


def _build(tmp_path, corpus: str, **env) -> subprocess.CompletedProcess:
    settings = {"ROOTS": str(tmp_path / "src"), "CORPUS_DIR": str(tmp_path / corpus), "VOCAB": "300"}
    settings |= {"WORKERS": "1", "VALID_FRACTION": "0.2", "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", "bench/build_code_corpus.sh"],
        cwd=REPO,
        env={**os.environ, **settings},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_reused_tokenizer_rebuilds_the_same_corpus(tmp_path):
    rng = random.Random(0)
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    for i in range(40):
        lines = (" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(30))
        (tmp_path / "src" / "pkg" / f"f{i}.py").write_text("\n".join(lines))
    first = _build(tmp_path, "a")
    assert first.returncode == 0, first.stderr[-2000:]
    again = _build(tmp_path, "b", TOKENIZER_FROM=str(tmp_path / "a" / "tokenizer"))
    assert again.returncode == 0, again.stderr[-2000:]
    trained = "tokenizer/tokenizer.json: vocab 300"  # what the tokenizer's training prints
    assert trained in first.stdout + first.stderr and trained not in again.stdout + again.stderr
    a, b = (json.loads((tmp_path / d / "code.manifest.json").read_text()) for d in "ab")
    assert a["files_digest"] == b["files_digest"] and a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
    assert a["tokens"] == b["tokens"] and a["tokens"]["train"] > 10_000
    for name in ("code_train.bin", "code_train.idx", "code_valid.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    wrong = _build(tmp_path, "c", TOKENIZER_FROM=str(tmp_path / "nowhere"))
    assert wrong.returncode == 1
    assert f"TOKENIZER_FROM={tmp_path / 'nowhere'} holds no tokenizer.json" in wrong.stderr
    assert not (tmp_path / "c" / "code_train.bin").exists()
