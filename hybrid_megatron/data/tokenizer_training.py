"""Training a byte-level BPE tokenizer with HF `tokenizers`, or importing an existing one.

Byte-level BPE needs no normaliser and no unknown token: every UTF-8 byte is in the base
alphabet, so decode(encode(text)) == text for any input, which the preprocessing round trip
relies on. Special tokens (bos, eos, pad) get the first ids 0, 1, 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hybrid_megatron import runtime
from hybrid_megatron.atomic_output import atomic_directory, refuse_to_replace
from hybrid_megatron.data.errors import DataToolsError
from hybrid_megatron.data.readers import TEXT_MODES, expand_inputs, iter_texts
from hybrid_megatron.data.tokenizer import Tokenizer, load_tokenizer, write_hf_tokenizer_config
from hybrid_megatron.data.trees import TreeSelection, add_tree_arguments, iter_tree_texts, tree_selection
from hybrid_megatron.errors import InputError

DEFAULT_SPECIALS = {"bos": "<|bos|>", "eos": "<|endoftext|>", "pad": "<|pad|>"}


def train_bpe_tokenizer(
    inputs: list[str],
    vocab_size: int,
    output_dir: str | Path,
    *,
    text_key: str = "text",
    text_mode: str = "file",
    min_frequency: int = 2,
    skip_bad: bool = False,
    show_progress: bool = False,
    overwrite: bool = False,
    trees: TreeSelection | None = None,
    max_bytes: int | None = None,
) -> Tokenizer:
    """Trains byte-level BPE on the inputs and writes OUTPUT_DIR/tokenizer.json (+ HF configs).

    Takes input files/globs (same formats as preprocessing), the total vocabulary size
    (special tokens and the 256 byte symbols included), the output directory, the JSON text
    field, plain-text mode, the BPE minimum pair frequency, whether to skip bad lines and
    whether a non-empty output directory may be replaced (a tokenizer in use is hashed into
    its datasets: replacing it by accident orphans them). ``trees`` replaces the inputs by
    directory trees (their training files only: the held-out ones stay unseen); ``max_bytes``
    stops after that much text (trees: a deterministic sample spread over the whole
    selection), which bounds the training time. The directory is written all at once.
    Returns the saved tokenizer, loaded back through `load_tokenizer`.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    out = Path(output_dir)
    _refuse_to_replace(out, overwrite)
    specials = list(DEFAULT_SPECIALS.values())
    floor = 256 + len(specials)
    if vocab_size < floor:
        raise DataToolsError(
            f"--vocab-size must be at least {floor} (256 bytes + special tokens), got {vocab_size}"
        )
    if max_bytes is not None and max_bytes < 1:
        raise DataToolsError(f"--max-bytes must be >= 1, got {max_bytes}")
    files = [] if trees is not None else expand_inputs(inputs)
    backend = HFTokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(x)) == x exactly (no injected leading space).
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    count = taken = 0
    if trees is not None:
        source = iter_tree_texts(trees, max_bytes)
        described: list = [trees.describe()]
    else:
        source = iter_texts(files, text_key=text_key, text_mode=text_mode, skip_bad=skip_bad)
        described = [str(f.path) for f in files]

    def texts():
        nonlocal count, taken
        for text in source:
            if max_bytes is not None and taken >= max_bytes:
                return
            count += 1
            taken += len(text.encode("utf-8", "surrogatepass"))
            yield text

    backend.train_from_iterator(texts(), trainer=trainer)
    if count == 0:
        where = ", ".join(trees.roots) if trees is not None else ", ".join(described)
        raise DataToolsError(f"no documents found in {where}")
    with atomic_directory(out) as tmp:
        _write_hf_files(backend, tmp)
        _write_training_info(tmp, vocab_size, backend, count, taken, min_frequency, described)
    return load_tokenizer(out)


def _write_training_info(
    out: Path, vocab_size: int, backend, count: int, text_bytes: int, min_frequency: int, inputs: list
) -> None:
    """training_info.json: what the tokenizer was trained on and with which settings."""
    (out / "training_info.json").write_text(
        json.dumps(
            {
                "vocab_size_requested": vocab_size,
                "vocab_size": backend.get_vocab_size(with_added_tokens=True),
                "documents": count,
                "text_bytes": text_bytes,
                "min_frequency": min_frequency,
                "inputs": inputs,
                "special_tokens": DEFAULT_SPECIALS,
            },
            indent=2,
        )
        + "\n"
    )


def _write_hf_files(backend, out: Path) -> None:
    """Saves tokenizer.json and the two small HF config files naming bos/eos/pad."""
    backend.save(str(out / "tokenizer.json"), pretty=True)
    write_hf_tokenizer_config(out, {f"{k}_token": v for k, v in DEFAULT_SPECIALS.items()})


def import_tokenizer(
    source: str | Path, output_dir: str | Path, overwrite: bool = False, **load_kwargs
) -> Tokenizer:
    """Converts an existing local tokenizer (tokenizer.json/dir/tiktoken) into OUTPUT_DIR.

    Takes the source path, the output directory, whether a non-empty output may be replaced
    and `load_tokenizer` keyword arguments; writes the directory all at once and returns the
    re-loaded tokenizer. A sentencepiece .model cannot become tokenizer.json here
    (that needs the sentencepiece package and a model-specific converter): use it directly.
    """
    out = Path(output_dir)
    _refuse_to_replace(out, overwrite)
    tokenizer = load_tokenizer(source, **load_kwargs)
    with atomic_directory(out) as tmp:
        tokenizer.save_hf(tmp)
    return load_tokenizer(out)


def _refuse_to_replace(out: Path, overwrite: bool) -> None:
    """refuse_to_replace as a DataToolsError (the data tools' one-line error)."""
    try:
        refuse_to_replace(out, overwrite)
    except FileExistsError as err:
        raise DataToolsError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of data_tools/train_tokenizer.py."""
    parser = argparse.ArgumentParser(
        prog="train_tokenizer.py",
        description="Train a byte-level BPE tokenizer on local files, or import an existing local tokenizer.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input", nargs="+", metavar="FILE_OR_GLOB", help="training text (jsonl/parquet/txt)"
    )
    source.add_argument(
        "--from-existing",
        metavar="PATH",
        help="import a tokenizer.json / HF dir / tiktoken file instead of training",
    )
    add_tree_arguments(parser, source)
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="train on at most this much text (--input-tree: a sample spread over the selection)",
    )
    parser.add_argument("--vocab-size", type=int, help="total vocabulary size (training)")
    parser.add_argument("--output", required=True, help="output directory (gets tokenizer.json)")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--text-mode", choices=TEXT_MODES, default="file")
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--skip-bad", action="store_true", help="skip malformed jsonl lines")
    parser.add_argument("--tiktoken-pattern", default="cl100k", help="pre-tokenizer regex for tiktoken files")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output directory (datasets hashed with the old "
        "tokenizer no longer match it)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    runtime.setup()
    try:
        if args.from_existing:
            tokenizer = import_tokenizer(
                args.from_existing, args.output, args.overwrite, tiktoken_pattern=args.tiktoken_pattern
            )
        else:
            if args.vocab_size is None:
                parser.error("--vocab-size is required when training")
            tokenizer = train_bpe_tokenizer(
                args.input or [],
                args.vocab_size,
                args.output,
                text_key=args.text_key,
                text_mode=args.text_mode,
                min_frequency=args.min_frequency,
                skip_bad=args.skip_bad,
                show_progress=sys.stderr.isatty(),
                overwrite=args.overwrite,
                trees=tree_selection(args),
                max_bytes=args.max_bytes,
            )
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {Path(args.output) / 'tokenizer.json'}: vocab {tokenizer.vocab_size}, "
        f"bos={tokenizer.bos_id} eos={tokenizer.eos_id} pad={tokenizer.pad_id}, "
        f"sha256 {tokenizer.content_hash[:16]}…"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
