"""Write an HF export directory atomically: safetensors (sharded + index when large), configs,
tokenizer files, extra files (remote code). Progress bar while writing tensors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from hybrid_megatron.atomic_output import atomic_directory, give_umask_mode, refuse_to_replace
from hybrid_megatron.errors import InputError

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # the usual HF shard size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(InputError, RuntimeError):
    """The export cannot be written (bad dtype, ...); the message says why."""


def _shards(tensors: dict, max_bytes: int) -> list[dict]:
    """Split {name: tensor} into consecutive groups of at most ``max_bytes`` (one tensor min)."""
    shards: list[dict] = []
    current: dict = {}
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def write_export(
    output: str | Path,
    tensors: dict,
    config: dict,
    dtype: str = "bf16",
    generation_config: dict | None = None,
    tokenizer_writer: Callable[[Path], object] | None = None,
    extra_files: dict | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write one HF model directory and return its path.

    Takes the output directory, {name: tensor} (cast to ``dtype``: ``bf16`` | ``fp32``), the
    ``config.json`` dict (``torch_dtype``/``dtype`` filled in), an optional generation config,
    an optional callable writing tokenizer files into a directory, optional {file name: source
    path} copied verbatim (remote code), the shard size limit and whether an existing output
    may be replaced (FileExistsError otherwise). Everything is written into a sibling
    temporary directory that is renamed into place at the end, so an interrupted export never
    leaves a half-written model.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise ExportError(f"--dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    output = Path(output).resolve()
    refuse_to_replace(output, overwrite)
    with atomic_directory(output) as tmp:
        torch_dtype = DTYPES[dtype]
        # contiguous + owned storage: safetensors refuses views sharing memory
        cast = {k: v.detach().to("cpu", torch_dtype).contiguous().clone() for k, v in tensors.items()}
        shards = _shards(cast, max_shard_bytes)
        total = sum(t.numel() * t.element_size() for t in cast.values())
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=not progress)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
            give_umask_mode(tmp / "model.safetensors")
            bar.update(total)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                give_umask_mode(tmp / name)
                weight_map.update({k: name for k in shard})
                bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        bar.close()
        config = {**config, "torch_dtype": {"bf16": "bfloat16", "fp32": "float32"}[dtype]}
        config["dtype"] = config["torch_dtype"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if generation_config is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        if tokenizer_writer is not None:
            tokenizer_writer(tmp)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
    return output
