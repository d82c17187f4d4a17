"""The one tokenizer abstraction shared by data tools, training, evaluation and conversion.

`load_tokenizer(path)` accepts, all from local files (no hub access):

* an HF ``tokenizer.json`` file, or a directory holding one (with an optional
  ``tokenizer_config.json`` / ``special_tokens_map.json`` naming bos/eos/pad);
* a sentencepiece ``.model`` file (needs the ``sentencepiece`` package, which is optional);
* a tiktoken BPE file (``.tiktoken`` / ``.bpe``), converted to an HF byte-level BPE here.

Whatever the source, callers see one `Tokenizer`: encode/decode, vocab size, bos/eos/pad ids
and a content hash (sha256 of the tokenizer file) that preprocessing records and training
compares. It also exposes ``eod`` and ``pad`` as megatron-core's GPTDataset expects.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from hybrid_megatron.data.errors import DataToolsError

# Names tried, in order, when no tokenizer_config.json says which token is which.
BOS_CANDIDATES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|eos|>", "<eos>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")
TIKTOKEN_SUFFIXES = (".tiktoken", ".bpe")


def write_hf_tokenizer_config(out: Path, specials: dict[str, str]) -> None:
    """Writes tokenizer_config.json and special_tokens_map.json (what HF's
    ``PreTrainedTokenizerFast`` reads beside tokenizer.json) naming the special tokens.

    Takes the directory and a map like ``{"bos_token": "<|bos|>", ...}``; returns nothing.
    """
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000_000,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def file_sha256(path: Path) -> str:
    """Returns the hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SpecialTokens:
    """Token strings for bos/eos/pad; None where the tokenizer has no such token."""

    bos: str | None = None
    eos: str | None = None
    pad: str | None = None


class Tokenizer:
    """A loaded tokenizer with one interface whatever file it came from.

    Build it with `load_tokenizer`. Attributes: ``path`` (the file whose bytes are hashed),
    ``kind`` ("hf", "tiktoken" or "sentencepiece"), ``vocab_size``, ``bos_id``, ``eos_id``,
    ``pad_id`` (int or None), ``content_hash`` (sha256 hex of ``path``).
    """

    def __init__(self, backend, path: Path, kind: str, specials: SpecialTokens) -> None:
        """Takes the backend (an HF `tokenizers.Tokenizer` or a sentencepiece processor),
        the file it was read from, its kind, and the special token strings."""
        self._backend = backend
        self.path = Path(path)
        self.kind = kind
        self.content_hash = file_sha256(self.path)
        self.specials = specials
        self.bos_id = self.token_to_id(specials.bos) if specials.bos else None
        self.eos_id = self.token_to_id(specials.eos) if specials.eos else None
        self.pad_id = self.token_to_id(specials.pad) if specials.pad else None
        self._fast = None
        if kind != "sentencepiece":
            from hybrid_megatron.data.fast_bytelevel import AsciiByteLevelBPE

            # Exact shortcut for ASCII text under GPT-2 style byte-level BPE (3-4x faster).
            self._fast = AsciiByteLevelBPE.for_backend(backend)

    # --- sizes and ids ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Returns the number of token ids, special tokens included."""
        if self.kind == "sentencepiece":
            return int(self._backend.get_piece_size())
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    @property
    def eod(self) -> int | None:
        """End-of-document id (the eos token), the name megatron-core's GPTDataset reads."""
        return self.eos_id

    @property
    def pad(self) -> int | None:
        """Padding id, the name megatron-core's GPTDataset reads."""
        return self.pad_id

    @property
    def unique_identifiers(self) -> dict:
        """Identity of this tokenizer for megatron-core's dataset cache key (it JSON-dumps
        ``obj.unique_identifiers`` of config members), so a new tokenizer means new indices."""
        return {"class": "hybrid_megatron.data.Tokenizer", "kind": self.kind, "sha256": self.content_hash}

    def token_to_id(self, token: str) -> int | None:
        """Returns the id of a token string, or None if it is not in the vocabulary."""
        if self.kind == "sentencepiece":
            idx = int(self._backend.piece_to_id(token))
            return None if idx == self._backend.unk_id() and token != self._backend.id_to_piece(idx) else idx
        return self._backend.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        """Returns the token string of an id, or None if out of range."""
        if self.kind == "sentencepiece":
            return self._backend.id_to_piece(int(idx)) if 0 <= idx < self.vocab_size else None
        return self._backend.id_to_token(int(idx))

    # --- encode / decode -------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Returns the token ids of `text`, with no bos/eos added."""
        if self.kind == "sentencepiece":
            return list(self._backend.encode(text))
        ids = self._fast.encode(text) if self._fast is not None else None
        return ids if ids is not None else self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Returns the ids of each text; one call so the Rust backend loops, not Python."""
        if self.kind == "sentencepiece":
            return [list(ids) for ids in self._backend.encode(list(texts))]
        texts = list(texts)
        if self._fast is None:
            return [enc.ids for enc in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        out = [self._fast.encode(text) for text in texts]
        rest = [i for i, ids in enumerate(out) if ids is None]
        if rest:
            slow = self._backend.encode_batch_fast([texts[i] for i in rest], add_special_tokens=False)
            for i, enc in zip(rest, slow):
                out[i] = enc.ids
        return cast(list[list[int]], out)  # every None was filled above

    def encode_batch_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Returns (all ids concatenated as int64, per-text lengths); the preprocessing
        workers' form, which skips building a Python list per document where it can."""
        texts = list(texts)
        parts: list = (
            [self._fast.encode_array(t) for t in texts] if self._fast is not None else [None] * len(texts)
        )
        rest = [i for i, ids in enumerate(parts) if ids is None]
        if rest:
            for i, ids in zip(rest, self.encode_batch_reference([texts[i] for i in rest])):
                parts[i] = np.asarray(ids, dtype=np.int64)
        lengths = np.fromiter((len(p) for p in parts), np.int64, count=len(parts))
        flat = np.concatenate(parts) if parts else np.empty(0, np.int64)
        return flat.astype(np.int64, copy=False), lengths

    def encode_batch_reference(self, texts: Sequence[str]) -> list[list[int]]:
        """Like `encode_batch` but always through the backend itself (no ASCII shortcut);
        for tests and for checking the shortcut on new data."""
        if self.kind == "sentencepiece":
            return self.encode_batch(texts)
        return [enc.ids for enc in self._backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Returns the text of `ids`; special tokens are kept unless asked otherwise."""
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # --- export ----------------------------------------------------------------------------
    def save_hf(self, directory: str | Path) -> Path:
        """Writes tokenizer.json + tokenizer_config.json + special_tokens_map.json, the files
        HF ``PreTrainedTokenizerFast`` loads. Returns the directory. Not for sentencepiece
        (copy its .model file instead)."""
        if self.kind == "sentencepiece":
            raise DataToolsError(f"{self.path}: a sentencepiece model is exported by copying the .model file")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(out / "tokenizer.json"))
        specials = {f"{name}_token": value for name, value in vars(self.specials).items() if value}
        write_hf_tokenizer_config(out, specials)
        return out

    def describe(self) -> dict:
        """Returns a JSON-ready summary (path, kind, hash, sizes, special ids) for stats files."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "sha256": self.content_hash,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, path={str(self.path)!r}, vocab_size={self.vocab_size})"


# --- loading -------------------------------------------------------------------------------
def _token_content(value) -> str | None:
    """tokenizer_config.json stores a special token as a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _configured_specials(directory: Path) -> dict[str, str]:
    """Reads bos/eos/pad token strings from HF config files next to the tokenizer, if any."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = directory / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataToolsError(f"{file}: unreadable tokenizer config: {exc}") from exc
        for key in ("bos", "eos", "pad"):
            value = _token_content(data.get(f"{key}_token"))
            if value:
                found[key] = value
    return found


def _pick(vocab_has, configured: str | None, candidates: Sequence[str]) -> str | None:
    """Chooses the configured token if present, else the first known name in the vocab."""
    if configured and vocab_has(configured):
        return configured
    return next((c for c in candidates if vocab_has(c)), None)


def _resolve_specials(vocab_has, configured: dict[str, str], overrides: SpecialTokens) -> SpecialTokens:
    """Combines explicit overrides, config files and name heuristics into SpecialTokens."""
    chosen = {}
    for key, candidates in (("bos", BOS_CANDIDATES), ("eos", EOS_CANDIDATES), ("pad", PAD_CANDIDATES)):
        override = getattr(overrides, key)
        if override is not None:
            if not vocab_has(override):
                raise DataToolsError(f"{key} token {override!r} is not in the tokenizer's vocabulary")
            chosen[key] = override
        else:
            chosen[key] = _pick(vocab_has, configured.get(key), candidates)
    return SpecialTokens(**chosen)


def _load_hf(file: Path, overrides: SpecialTokens) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises plain Exception for bad json
        raise DataToolsError(f"{file}: not a readable HF tokenizer.json: {exc}") from exc
    specials = _resolve_specials(
        lambda t: backend.token_to_id(t) is not None, _configured_specials(file.parent), overrides
    )
    return Tokenizer(backend, file, "hf", specials)


def _load_tiktoken(file: Path, overrides: SpecialTokens, pattern: str) -> Tokenizer:
    from hybrid_megatron.data.tiktoken_bpe import DEFAULT_SPECIAL_TOKEN, build_hf_from_tiktoken

    extra = [t for t in vars(overrides).values() if t] or [DEFAULT_SPECIAL_TOKEN]
    backend = build_hf_from_tiktoken(file, pattern=pattern, special_tokens=list(dict.fromkeys(extra)))

    def has(token: str) -> bool:
        return backend.token_to_id(token) is not None

    # tiktoken encodings use <|endoftext|> both to start and to end documents.
    default = SpecialTokens(
        bos=overrides.bos or (DEFAULT_SPECIAL_TOKEN if has(DEFAULT_SPECIAL_TOKEN) else None),
        eos=overrides.eos or (DEFAULT_SPECIAL_TOKEN if has(DEFAULT_SPECIAL_TOKEN) else None),
        pad=overrides.pad,
    )
    return Tokenizer(backend, file, "tiktoken", default)


def _load_sentencepiece(file: Path, overrides: SpecialTokens) -> Tokenizer:
    try:
        import sentencepiece  # optional: not a dependency of this project
    except ImportError as exc:
        raise DataToolsError(
            f"{file}: loading a sentencepiece .model needs the 'sentencepiece' package "
            "(pip install sentencepiece), which is not installed"
        ) from exc
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(file))
    except Exception as exc:
        raise DataToolsError(f"{file}: not a readable sentencepiece model: {exc}") from exc

    def piece(idx: int) -> str | None:
        return processor.id_to_piece(idx) if idx >= 0 else None

    specials = SpecialTokens(
        bos=overrides.bos or piece(processor.bos_id()),
        eos=overrides.eos or piece(processor.eos_id()),
        pad=overrides.pad or piece(processor.pad_id()),
    )
    return Tokenizer(processor, file, "sentencepiece", specials)


def load_tokenizer(
    path: str | Path,
    *,
    bos: str | None = None,
    eos: str | None = None,
    pad: str | None = None,
    tiktoken_pattern: str = "cl100k",
) -> Tokenizer:
    """Loads a tokenizer from a local file or directory.

    Takes a tokenizer.json, a directory with tokenizer.json (or tokenizer.model / one
    *.tiktoken), a sentencepiece .model or a tiktoken file; optional bos/eos/pad token strings
    overriding what the files say; and, for tiktoken, the pre-tokenisation pattern name
    ("cl100k", "gpt2") or regex. Returns a `Tokenizer`. Raises DataToolsError naming the file
    for anything missing or unreadable.
    """
    path = Path(path)
    overrides = SpecialTokens(bos=bos, eos=eos, pad=pad)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            tiktokens = sorted(p for p in path.iterdir() if p.suffix in TIKTOKEN_SUFFIXES)
            if len(tiktokens) != 1:
                raise DataToolsError(
                    f"{path}: directory has no tokenizer.json, tokenizer.model or single *.tiktoken file"
                )
            path = tiktokens[0]
    if not path.exists():
        raise DataToolsError(f"{path}: tokenizer file does not exist")
    if not path.is_file():
        raise DataToolsError(f"{path}: tokenizer path is not a file or directory")
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError as exc:
        raise DataToolsError(f"{path}: cannot read tokenizer file: {exc}") from exc
    if path.suffix == ".model":
        return _load_sentencepiece(path, overrides)
    if path.suffix in TIKTOKEN_SUFFIXES:
        return _load_tiktoken(path, overrides, tiktoken_pattern)
    if path.suffix == ".json" or head.lstrip().startswith(b"{"):
        return _load_hf(path, overrides)
    raise DataToolsError(
        f"{path}: unknown tokenizer format (want tokenizer.json, a sentencepiece .model or a "
        f"tiktoken {'/'.join(TIKTOKEN_SUFFIXES)} file)"
    )
