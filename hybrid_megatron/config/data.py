"""The recipe's ``data:`` section: which indexed datasets to train on, and how to cut them.

Example (YAML)::

    data:
      tokenizer: ../data/tokenizer            # tokenizer.json / HF dir / .model / tiktoken file
      blend:                                  # or a single prefix string, or a list of prefixes
        - {prefix: ../data/austen_4k_text_document, weight: 1.0}
      split: "98,1,1"                         # or valid_blend / test_blend (then no split)
      seq_length: 256

Relative paths (prefixes, tokenizer, cache_dir) are resolved against a base directory given
at validation time — the recipe file's directory — via `load_data_config` or
``DataConfig.model_validate(section, context={"base_dir": ...})``. Unknown keys are errors.
`hybrid_megatron.data.datasets.build_gpt_datasets` is the consumer.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from hybrid_megatron.config.base import StrictSection, resolve_path

DEFAULT_SPLIT = "98,1,1"


class BlendEntry(StrictSection):
    """One dataset of a blend: an indexed dataset prefix (no .bin/.idx) and its weight."""

    prefix: str = Field(min_length=1, description="path prefix of PREFIX.bin / PREFIX.idx")
    weight: float = Field(default=1.0, gt=0, description="relative sampling weight")

    @field_validator("prefix")
    @classmethod
    def _resolve_prefix(cls, value: str, info: ValidationInfo) -> str:
        for suffix in (".bin", ".idx"):
            if value.endswith(suffix):
                raise ValueError(f"give the prefix without {suffix!r}: {value!r}")
        return resolve_path(value, info)


def _coerce_blend(value: Any) -> Any:
    """Accepts a prefix string, a list of prefixes, of {prefix, weight} maps, or of
    [weight, prefix] pairs (Megatron's --data-path order); returns a list of maps."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("a blend is a non-empty list of prefixes or {prefix, weight} entries")
    out = []
    for entry in value:
        if isinstance(entry, str):
            out.append({"prefix": entry})
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            out.append({"weight": entry[0], "prefix": entry[1]})
        else:
            out.append(entry)
    return out


class DataConfig(StrictSection):
    """Datasets, splits and sample layout for training (the recipe's ``data:`` section)."""

    blend: list[BlendEntry] = Field(
        description="training datasets (split by `split` unless per-split blends)"
    )
    split: str | None = Field(
        default=None, description=f"train,valid,test weights over documents, e.g. {DEFAULT_SPLIT!r}"
    )
    valid_blend: list[BlendEntry] | None = Field(default=None, description="separate validation datasets")
    test_blend: list[BlendEntry] | None = Field(default=None, description="separate test datasets")
    seq_length: int = Field(gt=0, description="tokens per training sample")
    tokenizer: str = Field(
        min_length=1, description="tokenizer.json / HF dir / sentencepiece .model / tiktoken file"
    )
    num_workers: int = Field(default=2, ge=0, description="DataLoader worker processes")
    seed: int = Field(default=1234, description="seed of the document/sample shuffles")
    reset_position_ids: bool = Field(default=False, description="restart positions after each EOD")
    reset_attention_mask: bool = Field(default=False, description="block attention across EOD")
    eod_mask_loss: bool = Field(default=False, description="no loss on EOD tokens")
    create_attention_mask: bool = Field(
        default=False, description="materialise a seq x seq mask per sample (causal kernels don't need it)"
    )
    cache_dir: str | None = Field(default=None, description="where megatron-core caches sample indices")
    mmap_bin_files: bool = True

    @field_validator("blend", "valid_blend", "test_blend", mode="before")
    @classmethod
    def _coerce_blends(cls, value: Any) -> Any:
        return _coerce_blend(value)

    @field_validator("tokenizer", "cache_dir")
    @classmethod
    def _resolve_paths(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_path(value, info)

    @field_validator("split")
    @classmethod
    def _check_split(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = [p.strip() for p in str(value).split(",")]
        if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts):
            raise ValueError(
                f"split must be up to three comma-separated numbers like {DEFAULT_SPLIT!r}, got {value!r}"
            )
        if sum(float(p) for p in parts) <= 0:
            raise ValueError(f"split weights must not all be zero, got {value!r}")
        return ",".join(parts)

    @model_validator(mode="before")
    @classmethod
    def _default_split(cls, data: Any) -> Any:
        # The default split applies only when no per-split blend says otherwise.
        if isinstance(data, dict) and data.get("split") is None:
            if data.get("valid_blend") is None and data.get("test_blend") is None:
                data = {**data, "split": DEFAULT_SPLIT}
        return data

    @model_validator(mode="after")
    def _check_exclusive(self) -> DataConfig:
        if self.split is not None and (self.valid_blend is not None or self.test_blend is not None):
            raise ValueError("data: give either split or valid_blend/test_blend, not both")
        return self

    @property
    def uses_split(self) -> bool:
        """True when train/valid/test are cut from `blend` by `split`."""
        return self.split is not None

    def prefixes(self) -> list[str]:
        """Returns every dataset prefix named anywhere in the section, without duplicates."""
        entries = list(self.blend) + list(self.valid_blend or []) + list(self.test_blend or [])
        return list(dict.fromkeys(entry.prefix for entry in entries))


def load_data_config(section: dict, base_dir: str | os.PathLike | None = None) -> DataConfig:
    """Validates a ``data:`` mapping; relative paths are joined to `base_dir`.

    Takes the mapping (e.g. from YAML) and the directory the recipe lives in; returns the
    DataConfig. Raises pydantic.ValidationError naming the bad field.
    """
    context = {"base_dir": os.fspath(base_dir)} if base_dir is not None else None
    return DataConfig.model_validate(section, context=context)
