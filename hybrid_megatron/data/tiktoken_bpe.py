"""Read a tiktoken BPE file and turn it into an equivalent HF `tokenizers` tokenizer.

A tiktoken file holds, per line, ``<base64 token bytes> <rank>``; the ranks double as merge
priorities. HF ``tokenizers`` has a byte-level BPE model, so rebuilding the merge list from
the ranks gives a tokenizer with the same behaviour and no need for the ``tiktoken`` package.
The pre-tokenisation regex is not stored in the file, so the caller chooses it (cl100k's by
default).
"""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path

from hybrid_megatron.data.errors import DataToolsError

# Pre-tokenisation patterns of the public tiktoken encodings (the file does not carry them).
PATTERNS = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "cl100k": (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"""
        r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    ),
}
DEFAULT_SPECIAL_TOKEN = "<|endoftext|>"


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Returns the GPT-2 byte -> printable character table used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the others are shifted above U+0100 so that
    every byte has a visible, whitespace-free stand-in (the HF ByteLevel alphabet).
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, shift = {}, 0
    for byte in range(256):
        if byte in keep:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shift)
            shift += 1
    return table


def token_bytes_to_str(token: bytes) -> str:
    """Maps raw token bytes to their byte-level BPE string form."""
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parses a tiktoken file; returns {token bytes: rank}. Raises DataToolsError naming the line."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise DataToolsError(f"{path}: cannot read tiktoken file: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            encoded, rank = line.split()
            ranks[base64.b64decode(encoded, validate=True)] = int(rank)
        except ValueError as exc:
            raise DataToolsError(
                f"{path}:{number}: not a tiktoken BPE line (want '<base64> <rank>'): {exc}"
            ) from exc
    if not ranks:
        raise DataToolsError(f"{path}: tiktoken file has no tokens")
    return ranks


def _split_by_ranks(ranks: dict[bytes, int], token: bytes, below: int) -> list[bytes]:
    """Runs BPE on `token` using only merges ranked below `below`; returns the parts.

    For a token of rank r this yields exactly the two parts whose merge created it.
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_index = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < below and (best_rank is None or rank < best_rank):
                best_rank, best_index = rank, i
        if best_rank is None:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def build_hf_from_tiktoken(path: Path, pattern: str = "cl100k", special_tokens: list[str] | None = None):
    """Builds a `tokenizers.Tokenizer` equivalent to the tiktoken file at `path`.

    Takes the file, a pattern name from PATTERNS (or a regex), and special tokens to append
    after the ranks (default: ``<|endoftext|>``). Returns the HF tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = read_tiktoken_ranks(path)
    vocab = {token_bytes_to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _split_by_ranks(ranks, token, rank)
        if len(parts) != 2:
            raise DataToolsError(f"{path}: token of rank {rank} cannot be built by a merge")
        merges.append((token_bytes_to_str(parts[0]), token_bytes_to_str(parts[1])))
    # ignore_merges: like tiktoken, a pre-token that is itself in the vocabulary is one token.
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True)
    tokenizer = Tokenizer(model)
    regex = PATTERNS.get(pattern, pattern)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Special tokens get ids after the highest rank, as tiktoken encodings number them.
    tokenizer.add_special_tokens(list(special_tokens or [DEFAULT_SPECIAL_TOKEN]))
    return tokenizer
