"""From the recipe's data section to train/valid/test megatron-core GPTDatasets.

`build_gpt_datasets` checks everything that can be checked before megatron-core starts
(each prefix's files, the tokenizer against the model's vocabulary and against the tokenizer
each dataset was made with, each dataset's largest token id against the model's vocabulary),
then builds the splits with `BlendedMegatronDatasetBuilder`.
Every failure is one DataToolsError naming the bad prefix or file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from hybrid_megatron.config.data import BlendEntry, DataConfig
from hybrid_megatron.data.errors import DataToolsError
from hybrid_megatron.data.indexed_io import IndexSummary, check_indexed_prefix, max_token_id
from hybrid_megatron.data.tokenizer import Tokenizer, load_tokenizer

# A model vocabulary may exceed the tokenizer's by padding (for tensor-parallel divisibility);
# a larger gap means the recipe and the tokenizer belong to different setups.
DEFAULT_MAX_VOCAB_PADDING = 128


def check_vocab_size(
    tokenizer: Tokenizer, model_vocab_size: int, max_padding: int = DEFAULT_MAX_VOCAB_PADDING
) -> None:
    """Raises DataToolsError unless model_vocab_size is the tokenizer's size plus padding.

    Takes the tokenizer, the model's embedding rows and the largest allowed padding. Too small
    a model vocabulary would index past the embedding; a much larger one signals the wrong
    tokenizer for this recipe.
    """
    have = tokenizer.vocab_size
    if model_vocab_size < have or model_vocab_size - have > max_padding:
        raise DataToolsError(
            f"tokenizer {tokenizer.path} has {have} tokens but the model's vocab_size is "
            f"{model_vocab_size}: set model.vocab_size to {have} (or up to {have + max_padding} "
            "with padding), or use the tokenizer the data was prepared with"
        )


def read_dataset_stats(prefix: str) -> dict | None:
    """PREFIX.stats.json (written by the preprocessing) as a dict, or None when there is none.

    Raises DataToolsError naming the file when it exists but cannot be read.
    """
    stats_path = Path(prefix + ".stats.json")
    if not stats_path.is_file():
        return None
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        if not isinstance(stats, dict):
            raise ValueError("not a JSON object")
        return stats
    except (OSError, ValueError) as exc:
        raise DataToolsError(f"dataset prefix {prefix}: unreadable {stats_path}: {exc}") from exc


def check_dataset_tokenizer(prefix: str, tokenizer: Tokenizer, stats: dict | None = None) -> None:
    """Raises DataToolsError if PREFIX.stats.json records a different tokenizer hash.

    Takes the prefix, the tokenizer and the stats already read (else they are read here).
    Datasets without a stats file (made by other tools) are accepted as they are.
    """
    stats = stats if stats is not None else read_dataset_stats(prefix)
    if stats is None:
        return
    try:
        recorded = stats["tokenizer"]["sha256"]
    except (KeyError, TypeError) as exc:
        raise DataToolsError(f"dataset prefix {prefix}: unreadable {prefix}.stats.json: {exc}") from exc
    if recorded != tokenizer.content_hash:
        raise DataToolsError(
            f"dataset prefix {prefix} was tokenized with tokenizer sha256 {recorded[:16]}… but the "
            f"recipe's tokenizer {tokenizer.path} has sha256 {tokenizer.content_hash[:16]}…"
        )


def check_token_ids(summary: IndexSummary, stats: dict | None, vocab_size: int) -> None:
    """Raises DataToolsError naming the dataset and its largest token id when that id is not
    below ``vocab_size`` (the model's embedding rows): such a token would index past the
    embedding, on GPU as a device-side assert far from its cause.

    The largest id is the one the preprocessing recorded in the stats (``max_token_id``); a
    dataset without it (another tool's, or an older stats file) is scanned once
    (`max_token_id`). A stats file that records the tokenizer but no largest id is trusted:
    its tokenizer was checked against the model's vocabulary.
    """
    if stats is not None and "max_token_id" in stats:
        largest, source = int(stats["max_token_id"]), f"{summary.prefix}.stats.json"
    elif stats is not None and "tokenizer" in stats:
        return
    else:
        largest, source = max_token_id(summary), f"{summary.prefix}.bin"
    if largest >= vocab_size:
        raise DataToolsError(
            f"dataset prefix {summary.prefix}: its largest token id is {largest} (per {source}) "
            f"but model.vocab_size is {vocab_size}, so ids must be below {vocab_size}: the data was "
            "tokenized with another tokenizer, or the file is corrupt"
        )


def check_prefixes(
    config: DataConfig, tokenizer: Tokenizer | None = None, vocab_size: int | None = None
) -> dict[str, IndexSummary]:
    """Checks every prefix of the config (files, index, optional tokenizer hash, and token ids
    against the model's ``vocab_size`` when given).

    Returns {prefix: IndexSummary}. Raises DataToolsError naming the first bad prefix.
    """
    summaries = {}
    for prefix in config.prefixes():
        summaries[prefix] = check_indexed_prefix(prefix)
        if summaries[prefix].documents == 0:
            raise DataToolsError(f"dataset prefix {prefix}: holds no documents")
        stats = read_dataset_stats(prefix)
        if tokenizer is not None:
            check_dataset_tokenizer(prefix, tokenizer, stats)
        if vocab_size is not None:
            check_token_ids(summaries[prefix], stats, vocab_size)
    return summaries


def split_document_ranges(split: str, documents: int) -> list[tuple[int, int] | None]:
    """Returns the [begin, end) document range of train/valid/test for a split string.

    Mirrors megatron-core's arithmetic (normalised weights, cumulative bookends, rounding) so
    empty splits can be reported before megatron-core would loop forever on them. A split
    with weight 0 is None.
    """
    weights = [float(part) for part in split.split(",")] + [0.0] * (3 - len(split.split(",")))
    total = sum(weights)
    bookends = [0.0]
    for weight in weights:
        bookends.append(bookends[-1] + weight / total)
    ranges: list[tuple[int, int] | None] = []
    for lo, hi in zip(bookends[:-1], bookends[1:]):
        if hi <= lo:
            ranges.append(None)
        else:
            ranges.append((int(round(lo * documents)), int(round(hi * documents))))
    return ranges


def check_split_coverage(
    config: DataConfig, summaries: dict[str, IndexSummary], num_samples: Sequence[int | None]
) -> None:
    """Raises DataToolsError if a split that must yield samples gets no document of a prefix.

    megatron-core does not check this: a split with zero tokens makes GPTDataset's epoch
    count loop forever.
    """
    if not config.uses_split:
        return
    assert config.split is not None  # what uses_split means
    for entry in config.blend:
        documents = summaries[entry.prefix].documents
        ranges = split_document_ranges(config.split, documents)
        for name, wanted, bounds in zip(("train", "valid", "test"), num_samples, ranges):
            if bounds is not None and wanted != 0 and bounds[1] <= bounds[0]:
                raise DataToolsError(
                    f"dataset prefix {entry.prefix}: its {documents} documents leave the {name} split "
                    f"empty with split {config.split!r}; use more documents, another split, or "
                    "valid_blend/test_blend"
                )


def _megatron_blend(entries: list[BlendEntry] | None):
    """Converts entries to megatron's (prefixes, weights); one dataset needs no weights."""
    if not entries:
        return None
    prefixes = [entry.prefix for entry in entries]
    weights = None if len(entries) == 1 else [entry.weight for entry in entries]
    return prefixes, weights


def build_gpt_datasets(
    config: DataConfig,
    num_samples: Sequence[int | None],
    *,
    tokenizer: Tokenizer | None = None,
    model_vocab_size: int | None = None,
    max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
    cache_dir: str | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
):
    """Builds (train, valid, test) megatron-core GPTDatasets for a DataConfig.

    Takes the config; the number of samples wanted per split (train, valid, test; None = one
    epoch of that split, only for unweighted single-dataset blends); optionally an already
    loaded tokenizer (else `config.tokenizer` is loaded); the model's vocab_size to check the
    tokenizer against; the index cache directory (else `config.cache_dir`, else a directory
    under the system temp dir — use a shared path for multi-node runs); and megatron's
    is_built_on_rank callable (default: every rank builds). Returns a list of three datasets,
    None for a split with no data. Must be called on every rank when torch.distributed is up.
    Raises DataToolsError for a bad prefix, tokenizer or vocabulary mismatch.
    """
    if len(num_samples) != 3:
        raise DataToolsError(f"num_samples needs (train, valid, test), got {list(num_samples)}")
    tokenizer = tokenizer or load_tokenizer(config.tokenizer)
    if model_vocab_size is not None:
        check_vocab_size(tokenizer, model_vocab_size, max_vocab_padding)
    if tokenizer.eod is None:
        raise DataToolsError(f"tokenizer {tokenizer.path}: has no eos token, which GPTDataset uses as EOD")
    check_split_coverage(config, check_prefixes(config, tokenizer, model_vocab_size), num_samples)

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if config.uses_split:
        blend_kwargs = {"blend": _megatron_blend(config.blend), "split": config.split}
        weighted = [len(config.blend) > 1] * 3
    else:
        per_split = [config.blend, config.valid_blend, config.test_blend]
        blend_kwargs = {"blend_per_split": [_megatron_blend(entries) for entries in per_split]}
        weighted = [entries is not None and len(entries) > 1 for entries in per_split]
    for name, count, is_weighted in zip(("train", "valid", "test"), num_samples, weighted):
        if count is None and is_weighted:
            raise DataToolsError(f"a weighted blend needs a sample count for the {name} split, got None")
    cache = (
        cache_dir or config.cache_dir or os.path.join(tempfile.gettempdir(), "hybrid_megatron_index_cache")
    )
    gpt_config = GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.seq_length,
        tokenizer=tokenizer,
        reset_position_ids=config.reset_position_ids,
        reset_attention_mask=config.reset_attention_mask,
        eod_mask_loss=config.eod_mask_loss,
        create_attention_mask=config.create_attention_mask,
        path_to_cache=cache,
        mmap_bin_files=config.mmap_bin_files,
        **blend_kwargs,
    )
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, list(num_samples), is_built_on_rank or (lambda: True), gpt_config
    )
    with _single_process_rank():
        return builder.build()


@contextmanager
def _single_process_rank():
    """Lets megatron-core's BlendedDataset run without a process group (tools, tests).

    megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() unguarded when it
    caches indices, which raises unless a process group exists. Without one there is a single
    process, rank 0, so answer that for the duration of the build and restore afterwards.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original
