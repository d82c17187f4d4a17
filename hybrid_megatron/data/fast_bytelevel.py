"""A faster, exact encoder for ASCII text under a GPT-2 style byte-level BPE tokenizer.

Why: HF `tokenizers` spends most of its time per document on regex pre-tokenisation and
bookkeeping (offsets, alignments), about 1.5-2 MB/s per core on the CPUs here. English prose
repeats a small set of words, so this path splits ASCII text with Python's C regex engine,
memoises word -> ids, and asks HF's own BPE model (``model.tokenize``) only for words not seen
before. The merges are therefore HF's; only the pre-tokenisation is re-implemented, and only
for ASCII, where the GPT-2 pattern's Unicode classes reduce to exact ASCII sets. Anything else
(non-ASCII text, text containing an added/special token string, tokenizers with a normaliser
or another pre-tokenizer) returns None and goes through HF unchanged. Tests compare both paths
token for token.
"""

from __future__ import annotations

import json
import os
import re
from array import array

import numpy as np

from hybrid_megatron.data.tiktoken_bpe import byte_to_unicode

# The GPT-2 pattern of HF's ByteLevel pre-tokenizer, restricted to ASCII input:
#   \p{L} -> [A-Za-z], \p{N} -> [0-9], \s -> the ASCII White_Space characters. (Python's own
#   \s would also match \x1c-\x1f, which Unicode's White_Space, used by HF, does not.)
_WS = r" \t\n\x0b\x0c\r"
#   The letters branch comes first (it is the common case, ~10% faster); that is safe because
#   it cannot match where the contraction branch does (different first characters).
_ASCII_GPT2 = re.compile(
    rf" ?[A-Za-z]+|'(?:[stmd]|re|ve|ll)| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
# Bound the memo so a corpus with millions of distinct words cannot grow a worker unboundedly.
_MAX_CACHE = 1_000_000
DISABLE_ENV = "HM_DISABLE_FAST_BPE"


class AsciiByteLevelBPE:
    """Memoising ASCII encoder over an HF byte-level BPE tokenizer; see the module docstring."""

    def __init__(self, backend) -> None:
        """Takes the HF `tokenizers.Tokenizer`; use `for_backend` to check eligibility first."""
        self._model = backend.model
        self._specials = [t.content for t in backend.get_added_tokens_decoder().values()]
        table = byte_to_unicode()
        self._to_bytelevel = {i: table[i] for i in range(128)}
        self._reset()

    def _reset(self) -> None:
        # Memo as flat tables: word -> slot; slot -> (start, length) in one token array, so a
        # document's tokens are gathered by numpy instead of a Python loop over its words.
        self._slot: dict[str, int] = {}
        self._starts = array("q")
        self._lengths = array("q")
        self._tokens = array("q")

    @classmethod
    def for_backend(cls, backend) -> AsciiByteLevelBPE | None:
        """Returns an encoder if the tokenizer is plain GPT-2 style byte-level BPE, else None.

        Eligible: no normaliser, a ByteLevel pre-tokenizer with the GPT-2 regex and no prefix
        space, a BPE model without dropout. Disabled by setting HM_DISABLE_FAST_BPE=1.
        """
        if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
            return None
        spec = json.loads(backend.to_str())
        pre = spec.get("pre_tokenizer") or {}
        model = spec.get("model") or {}
        eligible = (
            spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)
            and model.get("type") == "BPE"
            and not model.get("dropout")
        )
        return cls(backend) if eligible else None

    def _learn(self, words: set[str]) -> None:
        """Adds the BPE tokens of new words (from HF's own model) to the memo."""
        tokenize = self._model.tokenize
        for word in words:
            ids = [token.id for token in tokenize(word.translate(self._to_bytelevel))]
            self._slot[word] = len(self._starts)
            self._starts.append(len(self._tokens))
            self._lengths.append(len(ids))
            self._tokens.extend(ids)

    def encode_array(self, text: str) -> np.ndarray | None:
        """Returns the ids of `text` as an int64 array, or None when this path does not apply."""
        if not text.isascii() or any(special in text for special in self._specials):
            return None
        words = _ASCII_GPT2.findall(text)
        if not words:
            return np.empty(0, np.int64)
        found = list(map(self._slot.get, words))
        if None in found:
            missing = {word for word, slot in zip(words, found) if slot is None}
            if len(self._slot) + len(missing) > _MAX_CACHE:
                self._reset()
                missing = set(words)
            self._learn(missing)
            found = list(map(self._slot.__getitem__, words))
        slots = np.array(found, dtype=np.int64)
        starts = np.frombuffer(self._starts, np.int64)[slots]
        lengths = np.frombuffer(self._lengths, np.int64)[slots]
        # Output position p of word j reads tokens[starts[j] + (p - out_start[j])].
        out_start = np.cumsum(lengths) - lengths
        positions = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(out_start - starts, lengths)
        return np.frombuffer(self._tokens, np.int64)[positions]

    def encode(self, text: str) -> list[int] | None:
        """Returns the ids of `text` as a list, or None when this path does not apply to it."""
        ids = self.encode_array(text)
        return None if ids is None else ids.tolist()
