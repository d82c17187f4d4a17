"""Corpora from directory trees: selection, binary and duplicate skipping, the split by file,
the manifest, and tokenizer training on the same selection."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from hybrid_megatron.data import DataToolsError, load_tokenizer
from hybrid_megatron.data.indexed_io import check_indexed_prefix
from hybrid_megatron.data.preprocess import PreprocessOptions, preprocess_trees
from hybrid_megatron.data.tokenizer_training import train_bpe_tokenizer
from hybrid_megatron.data.trees import TreeSelection, iter_tree_texts, list_tree_files, split_of
from tests.data_helpers import TOKENIZER_DIR, corpus_records, run_tool


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


@pytest.fixture
def trees(tmp_path) -> tuple[Path, Path, dict[str, str]]:
    """Two trees: text files (some duplicated across and within trees), binaries, a big file,
    an empty file, a symlink and a cache directory. Returns the roots and the expected
    documents {root-relative key: text} of the selection used below."""
    texts = [r["text"][:1500] for r in corpus_records(40)]
    one, two = tmp_path / "one", tmp_path / "two"
    expected = {}
    for i in range(30):
        rel = f"pkg{i % 3}/mod_{i}.py"
        _write(one / rel, texts[i])
        expected[f"one/{rel}"] = texts[i]
    _write(one / "pkg0/copy_of_mod_0.py", texts[0])  # duplicate within a tree
    _write(one / "pkg0/__pycache__/mod_0.py", texts[31])  # excluded directory
    _write(one / "pkg1/lib.so.py", b"\x7fELF\x00\x01binary")  # NUL byte
    _write(one / "pkg1/latin1.py", "caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    _write(one / "pkg2/empty.py", "")
    _write(one / "pkg2/big.py", "x = 1\n" * 2000)  # over the cap below
    _write(one / "notes.bin", texts[32])  # not included
    os.symlink(one / "pkg0/mod_0.py", one / "pkg0/link.py")
    for i in range(30, 36):
        _write(two / f"include/h{i}.h", texts[i] + " ünïcödé")
        expected[f"two/include/h{i}.h"] = texts[i] + " ünïcödé"
    _write(two / "include/dup.h", texts[5])  # duplicate across trees
    return one, two, expected


def _selection(one: Path, two: Path, valid_fraction: float = 0.25) -> TreeSelection:
    return TreeSelection(
        roots=(str(one), str(two)),
        include=("*.py", "include/*.h"),
        exclude=("__pycache__",),
        max_file_bytes=8000,
        valid_fraction=valid_fraction,
    )


def _options(prefix: Path, selection: TreeSelection, workers: int = 1) -> PreprocessOptions:
    return PreprocessOptions(
        inputs=[],
        output_prefix=str(prefix),
        tokenizer=str(TOKENIZER_DIR),
        workers=workers,
        append_eod=True,
        progress=False,
        trees=selection,
        chunk_bytes=4096,  # several chunks per split
    )


def test_listing_applies_globs_cap_and_skips_links(trees):
    one, two, _ = trees
    files, counts = list_tree_files(_selection(one, two))
    listed = {f"{Path(s).name}/{f.relpath}" for f in files for s in [_selection(one, two).roots[f.source]]}
    assert "one/pkg0/__pycache__/mod_0.py" not in listed
    assert "one/notes.bin" not in listed and "one/pkg0/link.py" not in listed
    assert "one/pkg2/big.py" not in listed and "one/pkg2/empty.py" not in listed
    assert "one/pkg1/lib.so.py" in listed  # binary is decided when reading
    assert (counts[0].too_large, counts[0].empty, counts[0].links) == (1, 1, 1)
    assert counts[1].listed == 7
    # training files come first, each split in (source, path) order
    splits = [f.split for f in files]
    assert splits == sorted(splits, key=("train", "valid").index)


def test_split_depends_on_the_relative_path_only():
    paths = [f"dir/file_{i}.py" for i in range(4000)]
    valid = [p for p in paths if split_of(p, 0.1) == "valid"]
    assert 300 < len(valid) < 500
    # the same decision from the hash, whatever else is in the tree
    first = int.from_bytes(hashlib.sha256(valid[0].encode()).digest()[:8], "big") / 2.0**64
    assert first < 0.1
    assert all(split_of(p, 0.0) == "train" for p in paths)


def test_tree_corpus_round_trip_manifest_and_determinism(tmp_path, trees):
    one, two, expected = trees
    selection = _selection(one, two)
    manifest = preprocess_trees(_options(tmp_path / "out/a", selection, workers=1))
    tok = load_tokenizer(TOKENIZER_DIR)
    # every distinct text is one document (a duplicate keeps its first file in listing
    # order), in its file's split, decoded back to that file's text
    lines = [json.loads(x) for x in (tmp_path / "out/a.files.jsonl").read_text().splitlines()]
    kept = [(Path(x["source"]) / x["path"]).read_text(encoding="utf-8") for x in lines]
    assert sorted(kept) == sorted(set(expected.values())) and len(kept) == len(expected)
    for split, prefix in manifest["outputs"].items():
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(prefix)
        docs = [x for x in lines if x["split"] == split]
        assert len(dataset) == len(docs) == manifest["documents"][split] > 0
        for index, record in enumerate(docs):
            ids = dataset[index].tolist()
            assert ids[-1] == tok.eos_id and len(ids) == record["tokens"]
            assert tok.decode(ids[:-1]) == (Path(record["source"]) / record["path"]).read_text()
            assert split_of(record["path"], 0.25) == split
        assert check_indexed_prefix(prefix).tokens == manifest["tokens"][split]
    sources = {Path(s["root"]).name: s for s in manifest["sources"]}
    assert sources["one"]["skipped"]["binary"] == 2 and sources["two"]["skipped"]["binary"] == 0
    assert sum(s["skipped"]["duplicate"] for s in sources.values()) == 2
    assert sum(sum(s["tokens"].values()) for s in manifest["sources"]) == sum(manifest["tokens"].values())
    written = json.loads((tmp_path / "out/a.manifest.json").read_text())
    assert written["files_digest"] == manifest["files_digest"]
    # the same selection rebuilds the same corpus, whatever the number of workers
    again = preprocess_trees(_options(tmp_path / "out/b", selection, workers=2))
    assert again["files_digest"] == manifest["files_digest"]
    for split in manifest["outputs"]:
        for suffix in (".bin", ".idx"):
            a = Path(manifest["outputs"][split] + suffix).read_bytes()
            assert a == Path(again["outputs"][split] + suffix).read_bytes()


def test_no_validation_share_writes_one_dataset(tmp_path, trees):
    one, two, expected = trees
    manifest = preprocess_trees(_options(tmp_path / "c", _selection(one, two, valid_fraction=0.0)))
    assert manifest["outputs"] == {"train": str(tmp_path / "c")}
    assert check_indexed_prefix(tmp_path / "c").documents == len(expected)


def test_empty_split_fails_and_leaves_nothing(tmp_path, trees):
    one, two, _ = trees
    selection = TreeSelection(roots=(str(two),), include=("include/h30.h",), valid_fraction=0.5)
    with pytest.raises(DataToolsError, match="split of .* holds no document"):
        preprocess_trees(_options(tmp_path / "out/e", selection))
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_cli_tree_errors(tmp_path):
    result = run_tool(
        "preprocess",
        "--input-tree",
        str(tmp_path / "missing"),
        "--tokenizer",
        str(TOKENIZER_DIR),
        "--output-prefix",
        str(tmp_path / "x"),
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'missing'}: input tree is not a directory"


def test_tokenizer_trains_on_a_sample_of_the_training_files(tmp_path, trees):
    one, two, expected = trees
    selection = _selection(one, two)
    texts = list(iter_tree_texts(selection))
    listed, _ = list_tree_files(selection)
    by_split: dict[str, set] = {"train": set(), "valid": set()}
    for item in listed:
        if item.relpath.endswith(".py") and "pkg1/" in item.relpath and "mod_" not in item.relpath:
            continue  # the two binary files
        by_split[item.split].add(Path(item.path(selection)).read_text(encoding="utf-8"))
    held_out = by_split["valid"] - by_split["train"]
    assert held_out and not held_out & set(texts)
    assert sorted(texts) == sorted(by_split["train"]) and len(texts) == len(expected) - len(held_out)
    sample = list(iter_tree_texts(selection, max_bytes=5000))
    assert 0 < len(sample) < len(texts) and sample == list(iter_tree_texts(selection, max_bytes=5000))
    tok = train_bpe_tokenizer([], 400, tmp_path / "tok", trees=selection, max_bytes=5000)
    info = json.loads((tmp_path / "tok/training_info.json").read_text())
    assert info["documents"] == len(sample)
    assert info["text_bytes"] == sum(len(t.encode()) for t in sample)
    assert tok.vocab_size == 400
    ids = tok.encode(texts[0])
    assert tok.decode(ids) == texts[0] and np.all(np.asarray(ids) < 400)
