"""Tests of the data tools: tokenizer, preprocessing, bad input, interruption, blends, CLIs."""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hybrid_megatron.config.data import DataConfig, load_data_config
from hybrid_megatron.data import DataToolsError, load_tokenizer
from hybrid_megatron.data import preprocess as preprocess_module
from hybrid_megatron.data.datasets import build_gpt_datasets, check_vocab_size
from hybrid_megatron.data.indexed_io import check_indexed_prefix
from hybrid_megatron.data.preprocess import PreprocessOptions, preprocess
from hybrid_megatron.data.tiktoken_bpe import byte_to_unicode
from hybrid_megatron.data.tokenizer_training import train_bpe_tokenizer
from tests.data_helpers import (
    DEMO_PREFIX,
    REPO,
    TOKENIZER_DIR,
    corpus_records,
    names_in,
    run_tool,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def small_records():
    # 12 chapters (~180 KB): enough for several chunks with a small chunk size.
    return corpus_records(12)


def read_docs(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].copy() for i in range(len(dataset))]


def run(inputs, prefix, **kw) -> dict:
    kw.setdefault("tokenizer", str(TOKENIZER_DIR))
    kw.setdefault("progress", False)
    return preprocess(PreprocessOptions(inputs=[str(i) for i in inputs], output_prefix=str(prefix), **kw))


# --- tokenizer ---------------------------------------------------------------------------
def test_demo_tokenizer_specials_and_roundtrip(tok):
    assert tok.kind == "hf" and tok.vocab_size == 4096
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.id_to_token(1) == "<|endoftext|>"
    text = "Émile said: “naïve café — 東京 🚀”\n\n  tabs\there 123456"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level BPE: exact, even for unseen scripts
    assert tok.encode_batch([text, "a"]) == [ids, tok.encode("a")]
    # the same file through the file path, the directory and a second load hashes the same
    assert load_tokenizer(TOKENIZER_DIR / "tokenizer.json").content_hash == tok.content_hash


def test_ascii_fast_path_is_exact(tok, monkeypatch):
    """The memoised ASCII encoder gives HF's ids token for token, and steps aside otherwise."""
    import random

    assert tok._fast is not None
    rng = random.Random(0)
    pieces = [chr(i) for i in range(128)] + ["'s", "'re", "'ll", "don't", " 42", "  ", "\n\n", "Mr."]
    stress = ["".join(rng.choice(pieces) for _ in range(2000)) for _ in range(40)]
    specials = [
        "x<|endoftext|>y",
        "<|pad|>",
        "café “quoted”",
        "",
        "   ",
        "\x1c\x1d x\x1f",
        "it's 1234567 'LL",
    ]
    texts = [r["text"] for r in corpus_records(30)] + stress + specials
    reference = tok.encode_batch_reference(texts)
    assert tok.encode_batch(texts) == reference
    assert tok._fast.encode("café") is None and tok._fast.encode("a<|endoftext|>") is None
    assert tok.encode("x<|endoftext|>y")[1] == tok.eos_id  # special token text -> special id, as HF
    flat, lengths = tok.encode_batch_flat(texts)
    assert lengths.tolist() == [len(r) for r in reference]
    assert flat.tolist() == [i for ids in reference for i in ids]
    monkeypatch.setenv("HM_DISABLE_FAST_BPE", "1")
    assert load_tokenizer(TOKENIZER_DIR)._fast is None


def test_train_tokenizer_small(tmp_path, small_records):
    corpus = write_jsonl(tmp_path / "c.jsonl", small_records)
    trained = train_bpe_tokenizer([str(corpus)], 600, tmp_path / "tok")
    assert trained.vocab_size == 600
    assert (trained.bos_id, trained.eos_id, trained.pad_id) == (0, 1, 2)
    text = small_records[3]["text"]
    assert trained.decode(trained.encode(text)) == text
    assert len(trained.encode(text)) < len(text.encode()) / 2  # merges were learned
    with pytest.raises(DataToolsError, match="at least 259"):
        train_bpe_tokenizer([str(corpus)], 100, tmp_path / "tok2")


def test_a_tokenizer_is_replaced_only_when_asked_and_all_at_once(tmp_path, small_records, monkeypatch):
    """Datasets record their tokenizer's hash, so retraining into a used directory by accident
    would orphan them: refused without overwrite. With it, the directory is swapped whole; a
    write that fails leaves the old tokenizer as it was."""
    from hybrid_megatron.data import tokenizer_training

    corpus = write_jsonl(tmp_path / "c.jsonl", small_records)
    out = tmp_path / "tok"
    first = train_bpe_tokenizer([str(corpus)], 600, out).content_hash
    with pytest.raises(DataToolsError, match=f"{out}: exists and is not empty .*--overwrite"):
        train_bpe_tokenizer([str(corpus)], 300, out)
    assert load_tokenizer(out).content_hash == first

    def broken_info(*args, **kwargs):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_training, "_write_training_info", broken_info)
        with pytest.raises(OSError, match="disk full"):
            train_bpe_tokenizer([str(corpus)], 300, out, overwrite=True)
    assert load_tokenizer(out).content_hash == first
    second = train_bpe_tokenizer([str(corpus)], 300, out, overwrite=True)
    assert second.vocab_size == 300 and load_tokenizer(out).content_hash != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "tok"]  # no partial or old copy


def test_tiktoken_file_matches_hf(tmp_path, tok):
    # Write the demo BPE as a tiktoken file (rank = id) and load it back through the converter.
    unicode_to_byte = {v: k for k, v in byte_to_unicode().items()}
    lines = []
    for token, idx in sorted(tok._backend.get_vocab(with_added_tokens=False).items(), key=lambda x: x[1]):
        if idx < 3:
            continue  # special tokens are not ranks
        raw = bytes(unicode_to_byte[c] for c in token)
        lines.append(f"{base64.b64encode(raw).decode()} {idx - 3}")
    path = tmp_path / "demo.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    converted = load_tokenizer(path, tiktoken_pattern="gpt2")
    assert converted.kind == "tiktoken" and converted.vocab_size == 4096 - 3 + 1
    assert converted.eos_id == 4093 and converted.id_to_token(4093) == "<|endoftext|>"
    for record in corpus_records(3):
        text = record["text"][:5000]
        assert converted.encode(text) == [i - 3 for i in tok.encode(text)]
        assert converted.decode(converted.encode(text)) == text


def test_tokenizer_errors(tmp_path):
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(DataToolsError, match=str(bad_json)):
        load_tokenizer(bad_json)
    with pytest.raises(DataToolsError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    spm = tmp_path / "sp.model"
    spm.write_bytes(b"\x0a\x05hello")
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        with pytest.raises(DataToolsError, match="needs the 'sentencepiece' package"):
            load_tokenizer(spm)
    bad_tt = tmp_path / "x.tiktoken"
    bad_tt.write_text("aGVsbG8= 0\nnot-base64!! 1\n")
    with pytest.raises(DataToolsError, match=rf"{bad_tt}:2"):
        load_tokenizer(bad_tt)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataToolsError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty_dir")


# --- preprocessing -----------------------------------------------------------------------
def test_demo_dataset_round_trip(tok):
    """The committed dataset decodes back to the committed corpus, document by document."""
    stats = json.loads(Path(DEMO_PREFIX + ".stats.json").read_text())
    assert stats["tokenizer"]["sha256"] == tok.content_hash
    records = corpus_records()
    docs = read_docs(DEMO_PREFIX)
    assert len(docs) == len(records) == stats["documents"] == 269
    assert sum(len(d) for d in docs) == stats["tokens"]
    for doc, record in zip(docs, records):
        assert doc[-1] == tok.eos_id
        assert tok.decode(doc[:-1].tolist()) == record["text"]


def test_round_trip_and_stats(tmp_path, tok, small_records):
    corpus = write_jsonl(tmp_path / "c.jsonl", small_records)
    stats = run([corpus], tmp_path / "out" / "ds", append_eod=True)
    docs = read_docs(str(tmp_path / "out" / "ds"))
    assert len(docs) == len(small_records)
    for doc, record in zip(docs, small_records):
        assert doc.dtype == np.uint16 and doc[-1] == tok.eos_id
        assert tok.decode(doc[:-1].tolist()) == record["text"]
        assert doc[:-1].tolist() == tok.encode(record["text"])
    assert stats["documents"] == 12
    assert stats["tokens"] == sum(len(d) for d in docs)
    assert stats["text_bytes"] == sum(len(r["text"].encode()) for r in small_records)
    assert stats["inputs"][0]["sha256"] == __import__("hashlib").sha256(corpus.read_bytes()).hexdigest()
    assert stats["inputs"][0]["bytes"] == corpus.stat().st_size
    assert stats["tokenizer"]["sha256"] == tok.content_hash
    assert names_in(tmp_path / "out") == ["ds.bin", "ds.idx", "ds.stats.json"]


def test_workers_1_and_2_byte_identical(tmp_path, small_records):
    corpus = write_jsonl(tmp_path / "c.jsonl", small_records)
    # 16 KiB chunks: about a dozen chunks, so the two workers really interleave.
    run([corpus], tmp_path / "w1", workers=1, append_eod=True, chunk_bytes=16384)
    run([corpus], tmp_path / "w2", workers=2, append_eod=True, chunk_bytes=16384)
    for suffix in (".bin", ".idx"):
        one, two = (tmp_path / f"w1{suffix}").read_bytes(), (tmp_path / f"w2{suffix}").read_bytes()
        assert len(one) > (40_000 if suffix == ".bin" else 200) and one == two


def test_input_formats_agree(tmp_path, tok, small_records):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = [r["text"] for r in small_records[:6]]
    payload = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    pq.write_table(pa.table({"text": texts, "n": list(range(6))}), tmp_path / "a.parquet", row_group_size=2)
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t)
    expected = [tok.encode(t) for t in texts]
    for name, inputs in [
        ("gz", [tmp_path / "a.jsonl.gz"]),
        ("zst", [tmp_path / "a.jsonl.zst"]),
        ("parquet", [tmp_path / "a.parquet"]),
        ("txt", [str(tmp_path / "doc*.txt")]),
    ]:
        run(inputs, tmp_path / name, workers=2, chunk_bytes=4096)
        assert [d.tolist() for d in read_docs(str(tmp_path / name))] == expected, name
    # paragraph / line modes split one text file at blank lines / newlines
    (tmp_path / "p.txt").write_text("first para\nline two\n\n\nsecond para\n")
    run([tmp_path / "p.txt"], tmp_path / "para", text_mode="paragraph")
    assert [tok.decode(d.tolist()) for d in read_docs(str(tmp_path / "para"))] == [
        "first para\nline two",
        "second para",
    ]
    run([tmp_path / "p.txt"], tmp_path / "line", text_mode="line")
    assert len(read_docs(str(tmp_path / "line"))) == 3


def test_max_docs(tmp_path, small_records):
    corpus = write_jsonl(tmp_path / "c.jsonl", small_records)
    stats = run([corpus], tmp_path / "m", workers=2, max_docs=5, chunk_bytes=8192)
    assert stats["documents"] == 5 and len(read_docs(str(tmp_path / "m"))) == 5


# --- bad input ---------------------------------------------------------------------------
def assert_nothing_written(directory: Path, keep: set[str]) -> None:
    assert set(names_in(directory)) == keep, names_in(directory)


def test_malformed_json_names_file_and_line(tmp_path, small_records):
    corpus = write_jsonl(tmp_path / "c.jsonl", small_records[:5], raw_lines={3: '{"text": "broken'})
    with pytest.raises(DataToolsError, match=r"c\.jsonl:4: malformed JSON"):
        run([corpus], tmp_path / "ds", workers=2, chunk_bytes=1024)
    assert_nothing_written(tmp_path, {"c.jsonl"})


def test_skip_bad_counts_and_reports(tmp_path, tok, small_records):
    corpus = write_jsonl(
        tmp_path / "c.jsonl",
        small_records[:5],
        raw_lines={1: "not json at all", 4: '{"body": "no text key"}'},
    )
    stats = run([corpus], tmp_path / "ds", skip_bad=True)
    assert stats["documents"] == 5 and stats["skipped_lines"] == 2
    assert stats["skipped_examples"][0].endswith(
        "c.jsonl:2: malformed JSON: Expecting value: line 1 column 1 (char 0)"
    )
    assert "c.jsonl:5: missing text key 'text'" in stats["skipped_examples"][1]
    decoded = [tok.decode(d.tolist()) for d in read_docs(str(tmp_path / "ds"))]
    assert decoded == [r["text"] for r in small_records[:5]]


def test_missing_text_key(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, {"content": "wrong key"}])
    with pytest.raises(DataToolsError, match=r"c\.jsonl:2: missing text key 'text'"):
        run([corpus], tmp_path / "ds")
    with pytest.raises(DataToolsError, match=r"has no column 'body'"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["x"]}), tmp_path / "t.parquet")
        run([tmp_path / "t.parquet"], tmp_path / "ds", text_key="body")
    assert_nothing_written(tmp_path, {"c.jsonl", "t.parquet"})


def test_empty_and_unreadable_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataToolsError, match="no documents found in .*empty.jsonl"):
        run([tmp_path / "empty.jsonl"], tmp_path / "ds")
    with pytest.raises(DataToolsError, match="does not exist"):
        run([tmp_path / "missing.jsonl"], tmp_path / "ds")
    with pytest.raises(DataToolsError, match="glob matches no file"):
        run([str(tmp_path / "*.parquet")], tmp_path / "ds")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataToolsError, match=r"bad\.jsonl\.gz: cannot read \(gzip\)"):
        run([tmp_path / "bad.jsonl.gz"], tmp_path / "ds")
    (tmp_path / "bad.jsonl.zst").write_bytes(b"neither is this zstd")
    with pytest.raises(DataToolsError, match=r"bad\.jsonl\.zst: cannot read \(zstd\)"):
        run([tmp_path / "bad.jsonl.zst"], tmp_path / "ds")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataToolsError, match="unknown input format"):
        run([tmp_path / "x.csv"], tmp_path / "ds")
    assert_nothing_written(tmp_path, {"empty.jsonl", "bad.jsonl.gz", "bad.jsonl.zst", "x.csv"})


def test_interrupted_run_keeps_previous_dataset(tmp_path, small_records, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", small_records)
    run([corpus], tmp_path / "ds", max_docs=2)
    before = {n: (tmp_path / n).read_bytes() for n in ("ds.bin", "ds.idx", "ds.stats.json")}
    calls = {"n": 0}
    real = preprocess_module.encode_chunk

    def interrupt_on_third(chunk):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(chunk)

    monkeypatch.setattr(preprocess_module, "encode_chunk", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        run([corpus], tmp_path / "ds", chunk_bytes=8192)
    assert calls["n"] == 3
    # no temporaries left, and the previous complete dataset is untouched
    assert_nothing_written(tmp_path, {"c.jsonl", "ds.bin", "ds.idx", "ds.stats.json"})
    assert {n: (tmp_path / n).read_bytes() for n in before} == before


class _Crash(BaseException):
    """A process dying at this point (not an error the writer could handle)."""


def test_replacing_a_dataset_keeps_a_complete_pair_whatever_rename_it_dies_at(tmp_path, monkeypatch):
    """The writer's commit renames and removes files one by one; a crash before each of those
    steps in turn leaves PREFIX.bin/.idx as the old or the new complete pair, or no .idx and the
    old pair as ``.previous`` files, which the next writer puts back before it writes."""
    from hybrid_megatron.data import indexed_io

    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_records(4))
    prefix = tmp_path / "ds"
    run([corpus], prefix, max_docs=1)
    old = {n: (tmp_path / n).read_bytes() for n in ("ds.bin", "ds.idx", "ds.stats.json")}
    run([corpus], tmp_path / "new")
    new = {f"ds{s}": (tmp_path / f"new{s}").read_bytes() for s in (".bin", ".idx")}
    real_replace, real_remove = os.replace, os.remove
    outcomes = []
    for crash_at in range(20):
        steps = []

        def step(real, *paths, steps=steps, crash_at=crash_at):
            if any(str(p).startswith(str(prefix)) for p in paths):
                if len(steps) == crash_at:
                    raise _Crash
                steps.append(paths)
            return real(*paths)

        monkeypatch.setattr(indexed_io.os, "replace", lambda a, b: step(real_replace, a, b))
        monkeypatch.setattr(indexed_io.os, "remove", lambda a: step(real_remove, a))
        try:
            run([corpus], prefix)
            crashed = False
        except _Crash:
            crashed = True
        finally:
            monkeypatch.setattr(indexed_io.os, "replace", real_replace)
            monkeypatch.setattr(indexed_io.os, "remove", real_remove)
        pair = {n: (tmp_path / n).read_bytes() for n in ("ds.bin", "ds.idx") if (tmp_path / n).exists()}
        if "ds.idx" in pair:
            assert pair in ({n: old[n] for n in pair}, new), crash_at
            outcomes.append("new" if pair == new else "old")
            check_indexed_prefix(str(prefix))
        else:
            moved = tmp_path / "ds.bin.previous"
            old_bin = moved if moved.exists() else tmp_path / "ds.bin"
            assert (tmp_path / "ds.idx.previous").read_bytes() == old["ds.idx"], crash_at
            assert old_bin.read_bytes() == old["ds.bin"], crash_at
            with pytest.raises(DataToolsError, match=r"ds.idx does not exist \(.*ds.idx.previous is the"):
                check_indexed_prefix(str(prefix))
            assert indexed_io.restore_previous(prefix)
            assert {n: (tmp_path / n).read_bytes() for n in old} == old
            outcomes.append("restored")
        if not crashed:
            break
        # back to the old dataset for the next crash point
        for name, data in old.items():
            (tmp_path / name).write_bytes(data)
    assert outcomes[-1] == "new" and "restored" in outcomes and outcomes[0] == "old"
    assert not [n for n in names_in(tmp_path) if ".previous" in n or ".partial-" in n]


def test_unwritable_output_prefix_is_one_error(tmp_path):
    """An output folder that cannot be made or written: one DataToolsError naming the file and
    the cause (the CLI prints it and exits 1), no OSError traceback."""
    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_records(1))
    (tmp_path / "file").write_text("a file where a folder should be")
    with pytest.raises(DataToolsError, match=rf"output prefix {tmp_path}/file/ds: cannot write .*file"):
        run([corpus], tmp_path / "file" / "ds")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        result = run_tool(
            "preprocess.py",
            "--input",
            str(corpus),
            "--tokenizer",
            str(TOKENIZER_DIR),
            "--output-prefix",
            str(locked / "ds"),
            "--no-progress",
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"output prefix {locked}/ds: cannot write {locked}/ds.bin.partial-" in result.stderr
        assert "Permission denied" in result.stderr
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_cli_leaves_no_dataset(tmp_path, sig):
    # ~16 MB of text: seconds of work, so the signal lands mid-run.
    records = corpus_records()
    corpus = write_jsonl(tmp_path / "big.jsonl", records * 4)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "data_tools" / "preprocess.py"),
            "--input",
            str(corpus),
            "--tokenizer",
            str(TOKENIZER_DIR),
            "--output-prefix",
            str(out / "ds"),
            "--workers",
            "2",
            "--no-progress",
            "--chunk-mb",
            "0.25",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    deadline = time.monotonic() + 90
    partial = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = [p for p in out.glob("ds.bin.partial-*")] if out.exists() else []
        if found and found[0].stat().st_size > 100_000:
            partial = found[0]
            break
        time.sleep(0.02)
    assert partial is not None, "the run finished or never started writing"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    left = names_in(out)
    assert not {"ds.bin", "ds.idx", "ds.stats.json"} & set(left)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and "interrupted" in err
        assert left == []  # temporaries removed too
    else:
        assert proc.returncode == -signal.SIGKILL


# --- blends and GPTDatasets ----------------------------------------------------------------
def demo_config(tmp_path, **extra) -> DataConfig:
    section = {
        "blend": [{"prefix": "austen_4k_text_document"}],
        "tokenizer": "tokenizer",
        "seq_length": 128,
        "split": "90,5,5",
        "cache_dir": str(tmp_path / "cache"),
        **extra,
    }
    return load_data_config(section, base_dir=REPO / "data")


def test_build_gpt_datasets_split_lengths_and_samples(tmp_path):
    config = demo_config(tmp_path)
    assert config.blend[0].prefix == DEMO_PREFIX and config.tokenizer == str(TOKENIZER_DIR)
    train, valid, test = build_gpt_datasets(config, [None, None, None], model_vocab_size=4096)
    lengths = check_indexed_prefix(DEMO_PREFIX)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(DEMO_PREFIX)  # keep it alive: its arrays view its mmap
    seq = indexed.sequence_lengths.astype(np.int64)
    cut = [0, round(0.90 * 269), round(0.95 * 269), 269]  # documents per split
    expected = [(int(seq[a:b].sum()) - 1) // 128 for a, b in zip(cut[:-1], cut[1:])]
    assert lengths.documents == 269
    assert [len(train), len(valid), len(test)] == expected == [7303, 472, 590]
    sample = train[5]
    assert sample["tokens"].shape == (128,) and sample["labels"].shape == (128,)
    assert sample["loss_mask"].shape == (128,) and "attention_mask" not in sample
    # labels are the tokens shifted by one: check against the raw sample
    raw, _ = train._query_document_sample_shuffle_indices(5)
    assert sample["tokens"].tolist() == raw[:-1].tolist() and sample["labels"].tolist() == raw[1:].tolist()
    assert int(sample["tokens"].max()) < 4096


def test_weighted_blend_and_per_split_blends(tmp_path, small_records):
    # 12 documents cut 90/5/5 leave the valid split empty: a clear error, not megatron's hang
    write_jsonl(tmp_path / "tiny.jsonl", small_records)
    run([tmp_path / "tiny.jsonl"], tmp_path / "tiny", append_eod=True)
    with pytest.raises(DataToolsError, match=r"tiny: its 12 documents leave the valid split empty"):
        build_gpt_datasets(demo_config(tmp_path, blend=str(tmp_path / "tiny")), [10, 2, 2])
    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_records(40))
    run([corpus], tmp_path / "small", append_eod=True)
    config = demo_config(
        tmp_path, blend=[{"prefix": "austen_4k_text_document", "weight": 3}, [1.0, str(tmp_path / "small")]]
    )
    train, valid, test = build_gpt_datasets(config, [400, 40, 40])
    assert [len(train), len(valid), len(test)] == [400, 40, 40]
    # 3:1 weights -> about 300 samples from the first dataset
    from_first = int(np.sum(train.dataset_index == 0))
    assert 290 <= from_first <= 310
    assert train[0]["tokens"].shape == (128,)
    per_split = demo_config(tmp_path, split=None, valid_blend=str(tmp_path / "small"))
    train, valid, test = build_gpt_datasets(per_split, [100, None, None])
    # a single unweighted dataset is built in whole epochs: at least the 100 samples asked for
    assert len(train) == (check_indexed_prefix(DEMO_PREFIX).tokens - 1) // 128 and test is None
    small_tokens = check_indexed_prefix(str(tmp_path / "small")).tokens
    assert len(valid) == (small_tokens - 1) // 128


def test_vocab_and_prefix_errors(tmp_path, tok, small_records):
    config = demo_config(tmp_path)
    with pytest.raises(DataToolsError, match="has 4096 tokens but the model's vocab_size is 32000"):
        build_gpt_datasets(config, [10, 1, 1], model_vocab_size=32000)
    with pytest.raises(DataToolsError, match="vocab_size is 4000"):
        build_gpt_datasets(config, [10, 1, 1], model_vocab_size=4000)
    check_vocab_size(tok, 4096 + 64)  # padding is fine
    missing = demo_config(tmp_path, blend=["austen_4k_text_document", str(tmp_path / "nope")])
    with pytest.raises(DataToolsError, match=rf"dataset prefix {tmp_path / 'nope'}: .*does not exist"):
        build_gpt_datasets(missing, [10, 1, 1])
    # a truncated .bin and a garbage .idx are reported with their prefix
    corpus = write_jsonl(tmp_path / "c.jsonl", small_records[:3])
    run([corpus], tmp_path / "trunc")
    data = (tmp_path / "trunc.bin").read_bytes()
    (tmp_path / "trunc.bin").write_bytes(data[:-10])
    with pytest.raises(DataToolsError, match=r"trunc: .*truncated or mismatched"):
        build_gpt_datasets(demo_config(tmp_path, blend=str(tmp_path / "trunc")), [10, 1, 1])
    (tmp_path / "trunc.idx").write_bytes(b"garbage" * 10)
    with pytest.raises(DataToolsError, match=r"trunc: unreadable index"):
        build_gpt_datasets(demo_config(tmp_path, blend=str(tmp_path / "trunc")), [10, 1, 1])
    # a dataset made with another tokenizer is refused
    other = train_bpe_tokenizer([str(corpus)], 300, tmp_path / "other_tok")
    run([corpus], tmp_path / "other", tokenizer=str(other.path))
    with pytest.raises(DataToolsError, match=r"other was tokenized with tokenizer sha256"):
        build_gpt_datasets(demo_config(tmp_path, blend=str(tmp_path / "other")), [10, 1, 1])


def test_data_config_validation(tmp_path):
    base = {"blend": "p", "tokenizer": "t", "seq_length": 8}
    config = load_data_config(base, base_dir="/recipes")
    assert (
        config.split == "98,1,1"
        and config.blend[0].prefix == "/recipes/p"
        and config.tokenizer == "/recipes/t"
    )
    assert load_data_config({**base, "tokenizer": "/abs/t"}, base_dir="/r").tokenizer == "/abs/t"
    from pydantic import ValidationError

    for bad, message in [
        ({**base, "blnd": "x"}, "Extra inputs are not permitted"),
        ({**base, "split": "98;1;1"}, "split must be"),
        ({**base, "split": "98,1,1", "valid_blend": "v"}, "either split or valid_blend"),
        ({**base, "seq_length": 0}, "greater than 0"),
        ({**base, "blend": [{"prefix": "p.bin"}]}, "without '.bin'"),
        ({**base, "blend": [{"prefix": "p", "weight": -1}]}, "greater than 0"),
    ]:
        with pytest.raises(ValidationError, match=message):
            load_data_config(bad)


# --- CLIs --------------------------------------------------------------------------------
def test_clis_run_as_scripts(tmp_path, small_records):
    corpus = write_jsonl(tmp_path / "c.jsonl", small_records[:4], raw_lines={2: "{oops"})
    result = run_tool(
        "preprocess",
        "--input",
        str(corpus),
        "--tokenizer",
        str(TOKENIZER_DIR),
        "--output-prefix",
        str(tmp_path / "ds"),
        "--workers",
        "2",
        "--append-eod",
        "--no-progress",
    )
    assert result.returncode == 1 and f"{corpus}:3: malformed JSON" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_tool(
        "preprocess",
        "--input",
        str(corpus),
        "--tokenizer",
        str(TOKENIZER_DIR),
        "--output-prefix",
        str(tmp_path / "ds"),
        "--workers",
        "2",
        "--append-eod",
        "--skip-bad",
    )
    assert result.returncode == 0, result.stderr
    assert "4 documents" in result.stdout and "skipped 1 bad lines" in result.stdout
    assert "docs/s" in result.stderr and "MB/s text" in result.stderr  # the progress bar
    result = run_tool("inspect_dataset", str(tmp_path / "ds"), "--decode", "1")
    assert result.returncode == 0, result.stderr
    assert "documents   4" in result.stdout
    assert small_records[1]["text"][:200] in result.stdout
    result = run_tool(
        "train_tokenizer",
        "--input",
        str(corpus),
        "--skip-bad",
        "--vocab-size",
        "400",
        "--output",
        str(tmp_path / "tok"),
    )
    assert result.returncode == 0 and "vocab 400" in result.stdout, result.stderr
