"""Conversion entry points: our checkpoints/models <-> Hugging Face directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hybrid_megatron.checkpoint_layout import MODEL_FILE, read_saved_recipe, resolve_checkpoint
from hybrid_megatron.config.model import ModelConfig
from hybrid_megatron.convert.exactness import choose_target
from hybrid_megatron.convert.writer import write_export


def hf_config_and_tensors(cfg: ModelConfig, state_dict: dict, target: str) -> tuple[dict, dict, dict]:
    """Map a full (TP=1) state dict to one target.

    Takes the ModelConfig, the model's ``state_dict()`` and a resolved target name. Returns
    ``(config.json dict, {HF name: tensor}, {file name: source path} of extra files)``.
    """
    if target == "falcon_h1":
        from hybrid_megatron.convert.mapping_falcon_h1 import falcon_h1_config, to_falcon_h1

        return falcon_h1_config(cfg), to_falcon_h1(cfg, state_dict), {}
    if target == "nemotron_h":
        from hybrid_megatron.convert.mapping_nemotron_h import nemotron_h_config, to_nemotron_h

        return nemotron_h_config(cfg), to_nemotron_h(cfg, state_dict), {}
    from hybrid_megatron.convert.mapping_remote_code import (
        TEMPLATE_DIR,
        TEMPLATE_FILES,
        remote_code_config,
        to_remote_code,
    )

    extra = {name: TEMPLATE_DIR / name for name in TEMPLATE_FILES}
    return remote_code_config(cfg), to_remote_code(cfg, state_dict), extra


def export_model(
    cfg: ModelConfig,
    state_dict: dict,
    output: str | Path,
    target: str = "auto",
    dtype: str = "bf16",
    tokenizer_path: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int | None = None,
) -> tuple[Path, str, str]:
    """Export an in-memory model (its ModelConfig and full state dict) as an HF directory.

    Refuses (exactness.NotExactError) a target that is not exact. Returns ``(output dir,
    target, why the target was chosen)``.
    """
    target, why = choose_target(cfg, target)
    config, tensors, extra = hf_config_and_tensors(cfg, state_dict, target)
    generation: dict[str, Any] = {"_from_model_config": True, "do_sample": False}
    tok_writer = None
    if tokenizer_path is not None:
        from hybrid_megatron.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
        for key, value in (
            ("bos_token_id", tok.bos_id),
            ("eos_token_id", tok.eos_id),
            ("pad_token_id", tok.pad_id),
        ):
            config[key] = value
            if value is not None:
                generation[key] = value
        tok_writer = tok.save_hf
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    path = write_export(
        output,
        tensors,
        config,
        dtype,
        generation,
        tok_writer,
        extra,
        overwrite=overwrite,
        progress=progress,
        **kwargs,
    )
    return path, target, why


def to_hf(
    checkpoint: str | Path,
    output: str | Path,
    target: str = "auto",
    dtype: str = "bf16",
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, str, str]:
    """Export a training checkpoint (root or step dir, any TP/PP/EP it was saved at).

    Loads it at TP=PP=1 on CPU (megatron-core reshards), checks exactness before doing any
    work, writes the export with the recipe's tokenizer. Returns ``(output, target, why)``.
    """
    from hybrid_megatron.training.restore import load_trained_model

    step_dir = resolve_checkpoint(checkpoint)
    choose_target(read_saved_recipe(step_dir).model, target)  # refuse before loading anything
    recipe, model = load_trained_model(step_dir)
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    tokenizer = recipe.data.tokenizer if getattr(recipe, "data", None) is not None else None
    return export_model(recipe.model, state, output, target, dtype, tokenizer, overwrite, progress)


def read_hf_config(path: str | Path) -> dict:
    """The ``config.json`` of an HF model directory, as a dict. Raises ValueError naming the
    directory or file when it is missing or not a JSON object."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: not a JSON object")
    return config


def read_hf_weights(path: str | Path) -> dict:
    """{name: tensor} from an HF model directory's safetensors file(s) (sharded with an index, or
    one ``model.safetensors``). Raises ValueError naming a file that is missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    try:
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: not a safetensors index ({err!r})") from None
    tensors = {}
    for name in files:
        if not (path / name).is_file():
            raise ValueError(f"{path / name}: weights file missing")
        try:
            tensors.update(load_file(str(path / name)))
        except SafetensorError as err:
            raise ValueError(f"{path / name}: not a readable safetensors file ({err})") from None
    return tensors


def from_hf(path: str | Path) -> tuple[dict, dict]:
    """A NemotronH or Falcon-H1 HF directory -> (our ``model:`` recipe dict, our state dict).

    The state dict has full (TP=1) tensors named like ``build_model``'s; load it with
    ``model.load_state_dict(sd, strict=False)`` (megatron's ``_extra_state`` entries are absent).
    Raises ValueError for other architectures or features our model does not have.
    """
    config = read_hf_config(path)
    kind = config.get("model_type")
    if kind not in ("falcon_h1", "nemotron_h"):
        raise ValueError(f"{path}: model_type {kind!r}; from-hf reads nemotron_h and falcon_h1")
    tensors = read_hf_weights(path)
    if kind == "falcon_h1":
        from hybrid_megatron.convert.mapping_falcon_h1 import from_falcon_h1, model_config_from_falcon_h1

        model = model_config_from_falcon_h1(config)
        return model, from_falcon_h1(ModelConfig(**model), tensors)
    from hybrid_megatron.convert.mapping_nemotron_h import (
        from_nemotron_h,
        model_config_from_nemotron_h,
        normalise_names,
    )

    tensors = normalise_names(tensors)  # once (it stacks the experts' weights)
    model = model_config_from_nemotron_h(config, tensors)
    return model, from_nemotron_h(ModelConfig(**model), tensors)


def from_hf_to_checkpoint(
    path: str | Path, output: str | Path, overwrite: bool = False, seed: int = 1
) -> tuple[Path, dict]:
    """Convert a NemotronH / Falcon-H1 HF directory into a megatron-core checkpoint.

    Takes the HF directory, the output directory, whether an existing non-empty output may be
    replaced, and the seed for building the model (every weight is then overwritten). Builds
    our model at TP=PP=1 on this process (a single rank unless a process group exists), loads
    the converted weights (every parameter must be covered) and writes, atomically,
    ``output/`` = a megatron-core distributed checkpoint holding the model weights only plus
    ``output/model.yaml`` (``{"model": <recipe model section>}``). Training recipes start
    from it with ``checkpoint.init_from: <output>`` at any parallel layout. Returns
    ``(output, model dict)``. Raises ValueError for checkpoints we cannot represent and
    FileExistsError for a non-empty output without ``overwrite``.
    """
    import yaml
    from megatron.core import dist_checkpointing

    from hybrid_megatron.atomic_output import atomic_directory, refuse_to_replace
    from hybrid_megatron.config.parallel import ParallelConfig
    from hybrid_megatron.models import build_model
    from hybrid_megatron.training.distributed import init_distributed_from_env
    from hybrid_megatron.training.parallel_setup import setup_model_parallel

    model_dict, state = from_hf(path)
    output = Path(output).resolve()
    refuse_to_replace(output, overwrite)
    init_distributed_from_env()
    setup_model_parallel(ParallelConfig(), seed)
    model = build_model(ModelConfig(**model_dict))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: converted weights do not fit the model (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    with atomic_directory(output) as tmp:
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp))
        (tmp / MODEL_FILE).write_text(yaml.safe_dump({"model": model_dict}, sort_keys=False))
    return output, model_dict
