"""Training throughput, MFU and peak memory of every kind vs megatron-core's own models.

One process, one GPU, one row after another (same sequence length, micro-batch and width within a
scale); a step is forward + backward + the distributed optimizer's update, through the trainer's
own components (``wrap_for_training`` and ``Trainable``: optimizer, schedule, step). Baselines are
megatron-core's native ``GPTModel`` (TE layer spec) and ``MambaModel`` (its hybrid stack, with our
``inter`` and ``mamba`` models' block patterns: each of our blocks = a mixer layer + an FFN layer
there).

Subcommands (each writes JSON; ``report`` turns JSON files into the markdown table):

    python bench/train_throughput.py run --scales 350m --out OUT.json [--precisions bf16 fp8]
        [--recompute full] [--seq-length 16384]
    python bench/train_throughput.py max-mbs --scale 1b --out OUT.json
    python bench/train_throughput.py profile --scale 350m --kind intra --out OUT.txt
    python bench/train_throughput.py report A.json B.json --json ALL.json --markdown ALL.md

``--tiny`` runs the same code on a small model (CPU: our kinds only, native models need TE);
tests/test_bench.py uses it so the harness keeps working between GPU sessions.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_megatron.atomic_output import write_json_atomically as write_json

ROOT = Path(__file__).resolve().parents[1]

KINDS = ["transformer", "swa", "mamba", "inter", "intra"]
# A row's kind is one of ours or a megatron-core native baseline, built from this kind's recipe.
NATIVES = {"native_gpt": "transformer", "native_mamba_hybrid": "inter", "native_mamba": "mamba"}
# Sequence length and micro-batch per scale (8K tokens per micro-batch at both).
SCALES = {"350m": {"seq": 4096, "mbs": 2}, "1b": {"seq": 8192, "mbs": 1}, "tiny": {"seq": 64, "mbs": 2}}
ROW_PROCESS_ENV = "HM_BENCH_ROW_PROCESS"  # set in a row's own process (see _measure_in_subprocess)
PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}  # H100/H200 SXM dense peaks (NVIDIA's datasheet)


# ----------------------------------------------------------------------------- model configs
def _option(default, flag: str, help: str, choices: tuple | None = None):
    """A RunOptions field with its command-line flag, help and allowed values (the one place each
    is declared)."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Settings shared by every row of one run (one ``run`` invocation, one JSON record).

    Each field declares its own flag (``add_option_flags`` and ``as_args`` read them). Bool
    fields are on/off flags; the others take a value.
    """

    micro_batch: int | None = _option(None, "--mbs", "samples per micro-batch (default: the scale's)")
    microbatches: int = _option(
        1,
        "--microbatches",
        "micro-batches per optimizer step (gradient "
        "accumulation, as in real training where one step sees many)",
    )
    cuda_graphs: bool = _option(
        False, "--cuda-graphs", "train.cuda_graphs on every row (each row then runs in its own process)"
    )
    fp8_attention: bool = _option(False, "--fp8-attention", "model.fp8_attention on fp8 rows")
    fp8_output_layer: bool = _option(
        False,
        "--fp8-output-layer",
        "model.fp8_output_layer on fp8 rows (the LM head in FP8; native baselines get the same head)",
    )
    overlap_branches: bool = _option(
        False, "--overlap-branches", "model.intra.overlap_branches on intra rows"
    )
    intra_dim_ratio: str | None = _option(
        None, "--intra-dim-ratio", "model.intra.dim_ratio on intra rows, e.g. 1:3 (default: the recipe's)"
    )
    intra_pattern: str | None = _option(
        None,
        "--intra-pattern",
        "model.pattern.ratio on intra "
        "rows: hybrid to Mamba blocks, e.g. 1:3 (default: the "
        "recipe's, every block hybrid)",
    )
    attention_head_dim: int | None = _option(
        None,
        "--attention-head-dim",
        "attention head size for every attention mixer, at the same "
        "widths (heads and KV groups rescaled, so parameters and FLOPs stay the same)",
    )
    unfused: bool = _option(
        False,
        "--unfused",
        "switch off the fused loss, SwiGLU, weight-gradient "
        "accumulation and MoE router/permutation (the before side of their measurement)",
    )
    unfused_moe: bool = _option(
        False,
        "--unfused-moe",
        "switch off only the MoE fusions (TE's fused router top-k and token permutation)",
    )
    moe_experts: str = _option(
        "grouped",
        "--moe-experts",
        "model.moe.experts on our MoE rows: grouped, "
        "te_grouped or sequential (native rows keep megatron-core's TE grouped experts)",
    )
    adam_moments: str = _option(
        "fp32",
        "--adam-moments",
        "train.adam_moments: fp32 or bf16 (the "
        "precision-aware optimizer, for MoE rows whose optimizer state does not fit)",
    )
    gpu_busy: bool = _option(
        False,
        "--gpu-busy",
        "after the timed steps, profile 2 more steps (kernels "
        "only) and record the share of the step the GPU is busy",
    )
    recompute: str = _option(
        "none",
        "--recompute",
        "train.recompute on every row: none, selective (the attention core) or full (each whole layer)",
        choices=("none", "selective", "full"),
    )
    seq_length: int | None = _option(
        None,
        "--seq-length",
        "data.seq_length on every row (default: the scale's); model.max_position_embeddings is "
        "raised to it where the recipe's is shorter",
    )
    max_memory_gib: float | None = _option(
        None,
        "--max-memory-gib",
        "the memory a row may take: on GPU the caching allocator's cap (a smaller card on a "
        "larger one), on CPU the process's address space; beyond it the row runs out of memory",
    )

    def as_args(self) -> list[str]:
        """The command-line flags that reproduce these options."""
        out = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in (bool, "bool"):
                out += [f.metadata["flag"]] if value else []
            elif value is not None:
                out += [f.metadata["flag"], str(value)]
        return out

    @classmethod
    def from_args(cls, args) -> RunOptions:
        """The options parsed by :func:`add_option_flags` from an argparse namespace."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_option_flags(parser) -> None:
    """Add every RunOptions flag to an argparse parser (run and profile share them)."""
    types = {"int | None": int, "int": int, "str | None": str, "str": str, "float | None": float}
    for f in dataclasses.fields(RunOptions):
        if f.type in (bool, "bool"):
            parser.add_argument(f.metadata["flag"], dest=f.name, action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(
                f.metadata["flag"],
                dest=f.name,
                type=types[str(f.type)],
                default=f.default,
                choices=f.metadata["choices"],
                help=f.metadata["help"],
            )


def _rescaled_heads(section: dict, old_head_dim: int, head_dim: int, keys: tuple) -> dict:
    """A copy of a recipe section with its head counts under ``keys`` (those set) scaled by
    old/new head size: the same widths at another head size. Raises ValueError if they do not
    divide."""
    out = dict(section)
    for key in keys:
        if out.get(key):
            scaled = out[key] * old_head_dim
            if scaled % head_dim:
                raise ValueError(
                    f"--attention-head-dim {head_dim}: {key} {out[key]} x {old_head_dim} "
                    f"does not divide into heads of {head_dim}"
                )
            out[key] = scaled // head_dim
    return out


def row_recipe(scale: str, kind: str, options: RunOptions = RunOptions()):
    """The shipped ``recipes/<kind>_<scale>.yaml`` under the run's ``train.recompute``,
    ``train.cuda_graphs`` and ``data.seq_length`` (``model.max_position_embeddings`` raised to a
    longer sequence: RoPE has no length limit of its own, the recipe's check does), validated as
    a recipe is. Raises RecipeError naming the field a setting breaks."""
    from hybrid_megatron.config import load_recipe

    path = ROOT / "recipes" / f"{kind}_{scale}.yaml"
    overrides = [f"train.recompute={options.recompute}"]
    if options.cuda_graphs:
        overrides.append("train.cuda_graphs=true")
    if options.seq_length is not None:
        overrides.append(f"data.seq_length={options.seq_length}")
        if options.seq_length > load_recipe(path).model.max_position_embeddings:
            overrides.append(f"model.max_position_embeddings={options.seq_length}")
    return load_recipe(path, overrides)


def model_config(scale: str, kind: str, moe: bool, precision: str, options: RunOptions = RunOptions()):
    """The ModelConfig of one row: the model section of :func:`row_recipe`, with
    an MoE FFN (8 experts, top-2, each half the dense FFN so the active FFN equals it), FP8 when
    asked and the run's options
    (attention head size, FP8 attention and LM head, intra branch overlap, dim ratio and share of
    hybrid blocks)."""
    from hybrid_megatron.config.model import ModelConfig

    fields = row_recipe(scale, kind, options).model.model_dump()
    if moe:
        ffn = fields.get("ffn_hidden_size") or ModelConfig(**fields).ffn_size
        fields["moe"] = {
            "num_experts": 8,
            "top_k": 2,
            "expert_ffn_hidden_size": ffn // 2,
            "experts": options.moe_experts,
        }
    if options.attention_head_dim and fields.get("attention"):
        old = ModelConfig(**fields).head_dim
        fields["attention"] = _rescaled_heads(
            fields["attention"], old, options.attention_head_dim, ("num_heads", "num_query_groups")
        )
        fields["attention"]["head_dim"] = options.attention_head_dim
        if fields.get("intra"):  # the intra branch's query heads follow from its width and head_dim
            fields["intra"] = _rescaled_heads(
                fields["intra"], old, options.attention_head_dim, ("num_query_groups",)
            )
    fields["fp8"] = "hybrid" if precision == "fp8" else None
    fields["fp8_attention"] = precision == "fp8" and options.fp8_attention and kind != "mamba"
    fields["fp8_output_layer"] = precision == "fp8" and options.fp8_output_layer
    if kind == "intra":
        fields["intra"] = {**(fields.get("intra") or {}), "overlap_branches": options.overlap_branches}
        if options.intra_dim_ratio:
            fields["intra"]["dim_ratio"] = options.intra_dim_ratio
        if options.intra_pattern:
            fields["pattern"] = {**(fields.get("pattern") or {}), "ratio": options.intra_pattern}
    return ModelConfig(**fields)


def native_pattern(our_pattern: str, moe: bool) -> str:
    """megatron-core MambaModel's hybrid_override_pattern for one of our block patterns: each
    block (mixer + FFN) becomes a mixer layer (M mamba, * attention) and an FFN layer (- MLP,
    E MoE)."""
    ffn = "E" if moe else "-"
    return "".join({"M": "M", "A": "*"}[letter] + ffn for letter in our_pattern)


def build_row_model(kind: str, cfg, recompute: str = "none", bf16: bool = True, cuda_graphs: bool = False):
    """Build the unwrapped model of one row: ours through ``build_model``, or a megatron-core
    native baseline with the same TransformerConfig (same widths, heads, MoE, FP8 and CUDA-graph
    settings; ``model.fp8_output_layer`` swaps their LM head like ours). Returns (model, pattern
    text)."""
    from hybrid_megatron.config.layer_pattern import build_layer_pattern
    from hybrid_megatron.models import build_model
    from hybrid_megatron.models.output_layer import use_fp8_output_layer
    from hybrid_megatron.models.transformer_config import build_transformer_config

    pattern = build_layer_pattern(cfg)
    if not kind.startswith("native_"):
        return build_model(cfg, bf16=bf16, recompute=recompute, cuda_graphs=cuda_graphs), pattern
    if cfg.moe is not None:  # megatron-core's own experts, with their FP8 router rules
        cfg = cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"experts": "te_grouped"})})
    tconfig = build_transformer_config(cfg, bf16=bf16, recompute=recompute, cuda_graphs=cuda_graphs)
    model, text = _native_model(kind, cfg, pattern, tconfig, bf16)
    if cfg.fp8_output_layer:
        use_fp8_output_layer(model)
    return model, text


def _native_model(kind: str, cfg, pattern: str, tconfig, bf16: bool):
    """megatron-core's GPTModel (``native_gpt``) or MambaModel with our block ``pattern``, built
    from our TransformerConfig (for MoE, one built with ``moe.experts: te_grouped``, megatron-core's
    TE grouped experts). Returns (model, pattern text)."""
    if kind == "native_gpt":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        from megatron.core.models.gpt.gpt_model import GPTModel

        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=cfg.moe.num_experts if cfg.moe else None,
            moe_grouped_gemm=cfg.moe is not None,
        )
        model = GPTModel(
            config=tconfig,
            transformer_layer_spec=spec,
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.max_position_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.attention.rotary_base),
        )
        return model, pattern
    from megatron.core.models.mamba import MambaModel
    from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec

    hybrid = native_pattern(pattern, cfg.moe is not None)
    # MambaLayer casts its input to params_dtype; megatron's own bf16 training builds bf16 params.
    tconfig = dataclasses.replace(
        tconfig, num_layers=len(hybrid), params_dtype=torch.bfloat16 if bf16 else torch.float32
    )
    has_attention = "*" in hybrid
    model = MambaModel(
        config=tconfig,
        mamba_stack_spec=mamba_stack_spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        hybrid_override_pattern=hybrid,
        position_embedding_type="rope" if has_attention else "none",
        rotary_base=int(cfg.attention.rotary_base) if has_attention else 10000,
    )
    return model, hybrid


# ----------------------------------------------------------------------------- one row
def _device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _synthetic_batch(vocab: int, mbs: int, seq: int, seed: int, microbatches: int = 1) -> list:
    """One global batch of random tokens on this rank's device: ``microbatches`` micro-batch
    dicts of ``mbs`` samples each."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(microbatches):
        tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=gen)
        batch.append(
            {
                "tokens": tokens[:, :-1].contiguous().to(device),
                "labels": tokens[:, 1:].contiguous().to(device),
                "loss_mask": torch.ones(mbs, seq, device=device),
                "position_ids": torch.arange(seq, device=device).expand(mbs, seq).contiguous(),
            }
        )
    return batch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_run_state() -> None:
    """Forget what the previous row left in process globals (MoE tracker, FP8 state, memory)."""
    from hybrid_megatron.training.trainer import reset_run_state

    reset_run_state()
    try:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

        FP8GlobalStateManager.reset()
    except Exception:  # no TE (CPU)
        pass
    _free_cached_memory()


def _free_cached_memory() -> None:
    """Collect garbage, return the allocator's cached blocks and restart the peak-memory count."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Trainee:
    """A row's model, set up and stepped as the trainer does: megatron-core's parallel state and
    RNG streams, ``wrap_for_training``, then a ``Trainable`` (optimizer, schedule, step).

    ``fused=False`` switches off the fused cross-entropy, SwiGLU, weight-gradient accumulation and
    MoE fusions (``--unfused``), ``fused_moe=False`` only the MoE router and permutation fusions
    (``--unfused-moe``), so that their effect is measured within one session.
    """

    def __init__(
        self,
        kind: str,
        cfg,
        recompute: str = "none",
        seed: int = 1234,
        cuda_graphs: bool = False,
        fused: bool = True,
        fused_moe: bool = True,
        adam_moments: str = "fp32",
    ):
        from hybrid_megatron.config.parallel import ParallelConfig
        from hybrid_megatron.config.train import TrainConfig
        from hybrid_megatron.training.model_setup import wrap_for_training
        from hybrid_megatron.training.parallel_setup import setup_model_parallel
        from hybrid_megatron.training.trainable import Trainable

        setup_model_parallel(ParallelConfig(), seed, cuda_graphs=cuda_graphs)
        bf16 = torch.cuda.is_available()  # CPU smoke runs train in fp32
        model, self.pattern = build_row_model(kind, cfg, recompute, bf16, cuda_graphs)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        # megatron-core reads these per call (the layers share the model's config): the unfused
        # loss, SwiGLU, router and token permutation from here on.
        if not fused:
            model.config.cross_entropy_loss_fusion = False
            model.config.bias_activation_fusion = False
        if not (fused and fused_moe):
            model.config.moe_router_fusion = False
            model.config.moe_permute_fusion = False
        train = TrainConfig(
            global_batch_size=1,
            steps=1000,
            lr=1e-4,
            warmup_steps=10,
            precision="bf16" if bf16 else "fp32",
            adam_moments=adam_moments,
        )
        self.trainable = Trainable.build(wrap_for_training(model, bf16=bf16, fuse_wgrad=fused), train, 1000)

    @classmethod
    def for_options(cls, kind: str, cfg, options: RunOptions) -> Trainee:
        """A row's Trainee under a run's options (recompute, CUDA graphs, the fusions switched off)."""
        return cls(
            kind,
            cfg,
            recompute=options.recompute,
            cuda_graphs=options.cuda_graphs,
            fused=not options.unfused,
            fused_moe=not options.unfused_moe,
            adam_moments=options.adam_moments,
        )

    def step(self, batch: list, seq: int) -> float:
        """One optimizer step on ``batch`` (the trainer's own step); returns the loss."""
        loss, _, _ = self.trainable.step(batch, seq)
        return loss

    def release(self) -> None:
        """Drop the tensors the model's modules (and the plain objects they hold, such as
        megatron-core's MoE token dispatchers) kept from their last forward with an autograd
        graph attached. Such a tensor holds the whole DDP-wrapped model alive
        through its graph's gradient hooks, in a cycle that runs through C++ autograd nodes
        Python's collector cannot follow: every MoE row's model stayed allocated in the process
        (the next row measured about 13 GiB more at 350M)."""
        for chunk in self.trainable.model_chunks:
            for module in chunk.modules():
                plain = [v for v in vars(module).values() if not isinstance(v, torch.nn.Module)]
                holders = [module] + [v for v in plain if hasattr(v, "__dict__")]
                for holder in holders:
                    for name, value in list(vars(holder).items()):
                        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                            setattr(holder, name, None)


# What an allocation that does not fit raises: torch.OutOfMemoryError (the CUDA caching
# allocator), a CUDA runtime call's "out of memory", or the CPU allocator's RuntimeError.
OUT_OF_MEMORY_TEXTS = ("OutOfMemoryError", "out of memory", "can't allocate memory")


def is_out_of_memory(error: str) -> bool:
    """Whether a row's error text (``"Type: message"``, or a process's stderr) says that it ran
    out of memory."""
    return any(text in error for text in OUT_OF_MEMORY_TEXTS)


def limit_memory(gib: float | None) -> None:
    """Cap what this process may allocate at ``gib`` GiB (None: no cap): on GPU the caching
    allocator's share of the card, on CPU the address space (RLIMIT_AS, which also counts
    mapped libraries). Beyond it an allocation fails as on a card with that much memory."""
    if gib is None:
        return
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
        return
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))


def row_seq_length(scale: str, options: RunOptions) -> int:
    """Tokens per sample of a row: ``--seq-length``, else the scale's."""
    return options.seq_length or SCALES[scale]["seq"]


def row_identity(scale: str, kind: str, moe: bool, precision: str, options: RunOptions) -> dict:
    """The fields that name a row (what a measured row and a failed process's row share)."""
    return {
        "scale": scale,
        "kind": kind,
        "ffn": "moe" if moe else "dense",
        "precision": precision,
        "seq_length": row_seq_length(scale, options),
        "recompute": options.recompute,
    }


def measure_row(
    scale: str,
    kind: str,
    moe: bool,
    precision: str,
    warmup: int,
    steps: int,
    options: RunOptions = RunOptions(),
) -> dict:
    """Train one row for ``warmup`` + ``steps`` steps; returns its record (tokens/s over the
    timed steps, peak memory, parameters, losses) or the error it hit (``oom`` true when it ran
    out of memory)."""
    shape = SCALES[scale]
    mbs = options.micro_batch or shape["mbs"]
    seq = row_seq_length(scale, options)
    row = {
        **row_identity(scale, kind, moe, precision, options),
        "micro_batch": mbs,
        "microbatches": options.microbatches,
    }
    _reset_run_state()
    try:
        limit_memory(options.max_memory_gib)
        cfg = model_config(scale, NATIVES.get(kind, kind), moe, precision, options)
        from hybrid_megatron.accounting.flops import model_flops_per_token

        row["flops_per_token"] = float(model_flops_per_token(cfg, seq))
        t_build = time.perf_counter()
        trainee = Trainee.for_options(kind, cfg, options)
        row.update(
            pattern=trainee.pattern,
            num_parameters=trainee.num_parameters,
            build_s=round(time.perf_counter() - t_build, 2),
        )
        batch = _synthetic_batch(cfg.vocab_size, mbs, seq, seed=0, microbatches=options.microbatches)
        losses = [trainee.step(batch, seq) for _ in range(warmup)]
        _sync()
        t0 = time.perf_counter()
        with GcPauses() as pauses:
            for _ in range(steps):
                losses.append(trainee.step(batch, seq))
            _sync()
        elapsed = time.perf_counter() - t0
        row.update(gc_s_per_step=pauses.seconds / steps, gc_collections_per_step=pauses.count / steps)
        tokens_per_s = steps * options.microbatches * mbs * seq / elapsed
        row.update(
            step_s=elapsed / steps,
            tokens_per_s=tokens_per_s,
            peak_memory_gib=(torch.cuda.max_memory_allocated() / 2**30)
            if torch.cuda.is_available()
            else None,
            losses=losses,
        )
        if options.gpu_busy and torch.cuda.is_available():
            step = trainee.step
            row["gpu_busy_share"] = gpu_busy_share(lambda: step(batch, seq), steps=2)
        trainee.release()
        del trainee
    except Exception as err:  # one row's failure (e.g. OOM) must not lose the others
        row["error"] = f"{type(err).__name__}: {err}"[:500]
        row["traceback"] = traceback.format_exc()[-2000:]
        if is_out_of_memory(row["error"]):
            row["oom"] = True
    _reset_run_state()
    return row


def _rows(scales, kinds, ffns, precisions):
    for scale in scales:
        for ffn in ffns:
            for precision in precisions:
                for kind in kinds:
                    yield scale, kind, ffn == "moe", precision


def _header() -> dict:
    import megatron.core

    header = {
        "device": _device(),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
    }
    try:
        import transformer_engine

        header["transformer_engine"] = transformer_engine.__version__
    except Exception:
        header["transformer_engine"] = None
    return header


def measure_in_subprocess(
    scale: str,
    kind: str,
    moe: bool,
    precision: str,
    warmup: int,
    steps: int,
    options: RunOptions,
    timeout: float | None = None,
) -> dict:
    """measure_row in a fresh process, killed after ``timeout`` seconds (None: never): the row
    starts from an empty allocator, with no earlier row's fragmentation or leftovers, and an
    out-of-memory row takes nothing else down. The row says which device ran it; a process that
    fails outside the row gets a row with its error (``oom`` when it ran out of memory,
    ``timed_out`` when it was killed)."""
    import subprocess
    import tempfile

    failed = row_identity(scale, kind, moe, precision, options)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [
            sys.executable,
            __file__,
            "run",
            "--scales",
            scale,
            "--kinds",
            kind,
            "--ffn",
            "moe" if moe else "dense",
            "--precisions",
            precision,
            "--warmup",
            str(warmup),
            "--steps",
            str(steps),
            "--out",
            str(out),
            *options.as_args(),
        ]
        env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}  # the parent's is taken
        env[ROW_PROCESS_ENV] = "1"  # the child measures its row itself instead of isolating again
        # Triton keeps its autotuning winners on disk, so a row's process reuses the earlier
        # rows' instead of timing mamba-ssm's kernel configurations again (seconds of start-up)
        env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**failed, "error": f"killed after {timeout:.0f} s", "timed_out": True}
        if done.returncode == 0 and out.exists():
            record = json.loads(out.read_text())
            return {**record["rows"][0], "device": record["device"]}
    failed["error"] = f"subprocess exit {done.returncode}: {done.stderr[-400:]}"
    if is_out_of_memory(done.stderr):
        failed["oom"] = True
    return failed


def spawns_row_processes(args) -> bool:
    """Whether this ``run`` measures each row in a process of its own (``--isolate``, or CUDA
    graphs, whose pools outlive a row) instead of in this one: the parent then only spawns.
    Takes the parsed ``run`` arguments; a row's own process (``ROW_PROCESS_ENV``) never spawns."""
    return (args.isolate or args.cuda_graphs) and not os.environ.get(ROW_PROCESS_ENV)


def _run_kinds(args) -> list[str]:
    """The kinds a ``run`` measures: ``--kinds``, else ours and (on GPU) the native baselines."""
    return args.kinds or (KINDS + (list(NATIVES) if torch.cuda.is_available() else []))


def check_run(args) -> None:
    """Validate the recipe of every row of a ``run`` under its options before any is measured.
    Raises RecipeError naming the field a setting (e.g. ``--seq-length``) breaks."""
    options = RunOptions.from_args(args)
    for scale in args.scales:
        for kind in dict.fromkeys(NATIVES.get(k, k) for k in _run_kinds(args)):
            row_recipe(scale, kind, options)


def cmd_run(args) -> None:
    """Measure every (scale, ffn, precision, kind) row; rewrites ``--out`` after each row so a
    time limit loses at most the row in flight."""
    kinds = _run_kinds(args)
    options = RunOptions.from_args(args)
    record = {
        **_header(),
        "warmup": args.warmup,
        "steps": args.steps,
        "options": dataclasses.asdict(options),
        "rows": [],
    }
    deadline = time.monotonic() + args.time_budget
    for scale, kind, moe, precision in _rows(args.scales, kinds, args.ffn, args.precisions):
        if time.monotonic() > deadline:
            record.setdefault("skipped", []).append(f"{scale}/{kind}/{moe}/{precision}")
            continue
        # Captured CUDA graphs keep their memory pool for the life of the process (measured: the
        # 1b row after a graphed one ran out of memory), so graphed rows always get their own.
        if spawns_row_processes(args):
            row = measure_in_subprocess(scale, kind, moe, precision, args.warmup, args.steps, options)
        else:
            row = measure_row(scale, kind, moe, precision, args.warmup, args.steps, options)
        record["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "traceback")}), flush=True)
        write_json(args.out, record)
    write_json(args.out, record)


# ----------------------------------------------------------------------------- largest micro-batch
def largest_fitting(try_size, limit: int, deadline: float = float("inf")) -> list[dict]:
    """Search for the largest micro-batch that fits: doubling from 1 until one does not fit (or
    ``limit``), then bisection between the last size that fit and the first that did not.

    Takes ``try_size(mbs)``, which returns the step's peak memory in GiB (None off GPU) or raises
    torch.OutOfMemoryError, the largest size to try and a time.monotonic() deadline. Returns the
    attempts in order, each ``{"micro_batch", "fits", "peak_memory_gib"}``.
    """
    attempts = []

    def attempt(mbs: int) -> bool:
        try:
            peak = try_size(mbs)
        except torch.OutOfMemoryError:
            attempts.append({"micro_batch": mbs, "fits": False, "peak_memory_gib": None})
            return False
        attempts.append({"micro_batch": mbs, "fits": True, "peak_memory_gib": peak})
        return True

    fit, failed = 0, None
    mbs = 1
    while mbs <= limit and time.monotonic() < deadline:
        if not attempt(mbs):
            failed = mbs
            break
        fit, mbs = mbs, mbs * 2
    while failed is not None and failed - fit > 1 and time.monotonic() < deadline:
        mid = (fit + failed) // 2
        if attempt(mid):
            fit = mid
        else:
            failed = mid
    return attempts


def _step_peak_memory(trainee: Trainee, vocab: int, seq: int, mbs: int) -> float | None:
    """One training step at micro-batch ``mbs``; its peak memory in GiB (None off GPU)."""
    try:
        batch = _synthetic_batch(vocab, mbs, seq, seed=0)
        trainee.step(batch, seq)
        _sync()
        return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    finally:
        batch = None
        _free_cached_memory()  # an out-of-memory step leaves its blocks cached


def cmd_max_mbs(args) -> None:
    """Largest micro-batch (doubling from 1, then bisection) that trains one step, per kind and
    recompute mode; writes the attempts and the largest size of each to the JSON record."""
    shape = SCALES[args.scale]
    # warm_step: each search starts after one untimed step at micro-batch 1, so every size's peak
    # includes Adam's moments (a model's first step peaks before the optimizer creates them)
    record = {**_header(), "scale": args.scale, "seq_length": shape["seq"], "warm_step": True, "rows": []}
    deadline = time.monotonic() + args.time_budget
    for kind in args.kinds:
        for recompute in args.recompute:
            if time.monotonic() > deadline:
                break
            _reset_run_state()
            row = {"kind": kind, "recompute": recompute, "ffn": "dense", "attempts": []}
            try:
                cfg = model_config(args.scale, kind, False, "bf16")
                trainee = Trainee(kind, cfg, recompute)
                try_size = functools.partial(_step_peak_memory, trainee, cfg.vocab_size, shape["seq"])
                try_size(1)
                row["attempts"] = largest_fitting(try_size, args.max, deadline)
                del try_size  # holds the model
                del trainee
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"[:500]
            fits = [a for a in row["attempts"] if a["fits"]]
            best = max(fits, key=lambda a: a["micro_batch"], default=None)
            row["largest_micro_batch"] = best["micro_batch"] if best else 0
            row["peak_memory_gib"] = best["peak_memory_gib"] if best else None
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
            write_json(args.out, record)
    _reset_run_state()
    write_json(args.out, record)


# ----------------------------------------------------------------------------- profile
def cmd_profile(args) -> None:
    """torch.profiler over a few steps of one row; writes the op table (by device time)."""
    from torch.profiler import ProfilerActivity, profile

    shape = SCALES[args.scale]
    options = RunOptions.from_args(args)
    seq = row_seq_length(args.scale, options)
    _reset_run_state()
    limit_memory(options.max_memory_gib)
    cfg = model_config(args.scale, NATIVES.get(args.kind, args.kind), args.moe, args.precision, options)
    trainee = Trainee.for_options(args.kind, cfg, options)
    batch = _synthetic_batch(
        cfg.vocab_size,
        options.micro_batch or shape["mbs"],
        seq,
        seed=0,
        microbatches=options.microbatches,
    )
    for _ in range(3):
        trainee.step(batch, seq)
    _sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, with_stack=args.stacks > 0) as prof, GcPauses() as pauses:
        start = time.perf_counter()
        for _ in range(args.steps):
            trainee.step(batch, seq)
        _sync()
        wall_s = time.perf_counter() - start
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=90)
    # the host's side: where its time goes when the GPU waits for it
    table += "\nBy host time:\n" + averages.table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=90
    )
    if args.stacks:
        table += stack_tables(prof.events(), torch.cuda.is_available(), args.stacks, args.rows, args.steps)
    kernels = [
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    syncs = {e.key: e.count for e in averages if e.key in HOST_SYNC_CALLS}
    timing = (
        f"per step: {1e3 * wall_s / args.steps:.1f} ms wall (under the profiler), GPU busy "
        f"{1e-3 * busy_time(kernels) / args.steps:.1f} ms; host waits on the GPU per step: "
        + (", ".join(f"{k} x{v / args.steps:g}" for k, v in sorted(syncs.items())) or "none")
        + f"; Python garbage collection per step: {pauses.count / args.steps:g} collections, "
        f"{1e3 * pauses.seconds / args.steps:.1f} ms"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        f"{_header()}\n{args.scale} {args.kind} moe={args.moe} "
        f"{args.precision} {options}, {args.steps} steps\n{timing}\n{table}\n"
    )
    print(timing)
    print(table)


AUTOGRAD_NODE = "autograd::engine::evaluate_function: "


def python_frames(event, frames: int) -> str:
    """The innermost ``frames`` Python frames above a profiled op, innermost first, read from the
    profiler's event tree (``with_stack`` records each Python call as an ancestor event). An op
    of the backward pass also names its autograd node: its Python frames are only the engine's."""
    chain = []
    parent = event.cpu_parent
    while parent is not None and len(chain) < frames:
        if parent.name.startswith(AUTOGRAD_NODE):
            chain.append(parent.name[len(AUTOGRAD_NODE) :])
        elif _is_python_frame(parent.name):
            chain.append(parent.name)
        parent = parent.cpu_parent
    return " < ".join(chain) or "(no Python frame)"


def _is_python_frame(name: str) -> bool:
    return name.endswith(")") or "): " in name


def stack_tables(events, on_gpu: bool, frames: int, rows: int, steps: int) -> str:
    """Ops grouped by (name, innermost ``frames`` Python frames): the largest by device time (host
    time off GPU), then the host's waits on the GPU. Names the code behind an op whose total
    matters, such as copies or synchronisations, which the op table cannot."""
    groups: dict[tuple[str, str], list[float]] = {}
    waits: dict[str, list[float]] = {}
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        if event.name in HOST_SYNC_CALLS:
            entry = waits.setdefault(f"{event.name} {python_frames(event, frames)}", [0, 0.0])
            entry[0] += 1
            entry[1] += event.self_cpu_time_total
            continue
        if _is_python_frame(event.name) or event.name.startswith(AUTOGRAD_NODE):
            continue  # a frame, not an op
        time_us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if time_us > 0:
            entry = groups.setdefault((event.name, python_frames(event, frames)), [0, 0.0])
            entry[0] += 1
            entry[1] += time_us
    clock = "device" if on_gpu else "host"
    lines = [f"\nBy call stack ({frames} Python frames, innermost first), {clock} time per step:"]
    for (name, stack), (calls, time_us) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:rows]:
        lines.append(f"{time_us / 1e3 / steps:9.2f} ms {calls / steps:7g} calls  {name[:60]}  {stack}")
    lines.append("\nHost waits on the GPU by call stack, per step:")
    for where, (calls, time_us) in sorted(waits.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"{calls / steps:7g} calls {time_us / 1e3 / steps:9.2f} ms  {where}")
    if not waits:
        lines.append("none")
    return "\n".join(lines) + "\n"


class GcPauses:
    """Context manager that counts Python's garbage collections inside it and their total time
    (``count``, ``seconds``), through gc.callbacks. Each collection walks every tracked object of
    its generation on the host thread that launches the GPU's work."""

    def __init__(self):
        self.count, self.seconds, self._start = 0, 0.0, None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.count += 1
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)


# the CUDA runtime calls with which the host waits for the GPU (a drained launch queue after each)
HOST_SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")


def gpu_busy_share(step, steps: int) -> float:
    """The share of wall time the GPU runs kernels over ``steps`` calls of ``step`` (the profiler
    records kernels only, so the host is slowed as little as possible)."""
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync()
        wall_s = time.perf_counter() - start
    kernels = [
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    return 1e-6 * busy_time(kernels) / wall_s


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals (kernels on several streams overlap):
    the time the GPU had at least one kernel running, in the intervals' unit."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


# ----------------------------------------------------------------------------- report
def _mfu(row: dict) -> float | None:
    if not row.get("tokens_per_s") or row["device"] == "cpu":
        return None
    return row["flops_per_token"] * row["tokens_per_s"] / (PEAK_TFLOPS[row["precision"]] * 1e12)


def _baseline(kind: str) -> str | None:
    return {
        "transformer": "native_gpt",
        "swa": "native_gpt",
        "mamba": "native_mamba",
        "inter": "native_mamba_hybrid",
        "intra": "native_mamba_hybrid",
    }.get(kind)


# The targets the report checks: dense from the dense-efficiency work; MoE from the MoE work
# (3x megatron-core's own MoE MambaModel, 0.8x the dense MFU at 1b, FP8 1.2x).
GOALS = {
    "vs_native": {"dense": 1.0, "moe": 3.0},
    "mfu_1b": {"dense": {"inter": 0.45, "intra": 0.45}, "moe": {"inter": 0.38, "intra": 0.36}},
    "fp8_1b": {"dense": 1.25, "moe": 1.2},
}


def summarise(records: list[dict]) -> dict:
    """Merge run records: every row gets ``mfu`` and ``vs_baseline`` (tokens/s over the
    megatron-core baseline's at the same scale, FFN and precision); plus the GOALS met or missed."""
    rows = []
    for run, record in enumerate(records):
        for row in record.get("rows", []):
            if "precision" in row:  # a throughput row (max-mbs rows have none)
                kind = row.get("kind", row.get("arch"))  # the records in bench/results say "arch"
                rows.append(
                    {
                        **{k: v for k, v in row.items() if k != "arch"},
                        "kind": kind,
                        "run": run,
                        "device": record["device"],
                        "date": record["date"],
                    }
                )
    # Ratios only within one run (one process on one machine): run-to-run noise is 10-25%.
    index = {(r["run"], r["scale"], r["kind"], r["ffn"], r["precision"]): r for r in rows}
    for r in rows:
        r["mfu"] = _mfu(r)
        base = index.get((r["run"], r["scale"], _baseline(r["kind"]), r["ffn"], r["precision"]))
        r["baseline"] = _baseline(r["kind"])
        r["vs_baseline"] = (
            r["tokens_per_s"] / base["tokens_per_s"]
            if base and r.get("tokens_per_s") and base.get("tokens_per_s")
            else None
        )

    goals = []
    for run, scale in sorted({(r["run"], r["scale"]) for r in rows}):

        def tps(scale, kind, ffn, precision, run=run):
            r = index.get((run, scale, kind, ffn, precision))
            return r.get("tokens_per_s") if r else None

        for ffn in ("dense", "moe"):
            for precision in ("bf16", "fp8"):
                native = tps(scale, "native_mamba_hybrid", ffn, precision)
                inter, intra = tps(scale, "inter", ffn, precision), tps(scale, "intra", ffn, precision)
                bound = GOALS["vs_native"][ffn]
                for kind, ours in (("inter", inter), ("intra", intra) if ffn == "moe" else (None, None)):
                    if ours and native:
                        goals.append(
                            {
                                "run": run,
                                "value": ours / native,
                                "met": ours / native >= bound,
                                "goal": f"{scale} {ffn} {precision}: {kind} >= {bound:.2f}x "
                                "native MambaModel",
                            }
                        )
                if inter and intra:
                    goals.append(
                        {
                            "run": run,
                            "goal": f"{scale} {ffn} {precision}: intra >= 0.95x inter",
                            "value": intra / inter,
                            "met": intra / inter >= 0.95,
                        }
                    )
            for kind in ("inter", "intra"):
                r = index.get((run, scale, kind, ffn, "bf16"))
                bound = GOALS["mfu_1b"][ffn][kind]
                if scale == "1b" and r and r.get("mfu") is not None:
                    goals.append(
                        {
                            "run": run,
                            "goal": f"1b {ffn} bf16 8K: {kind} MFU >= {bound:.0%}",
                            "value": r["mfu"],
                            "met": r["mfu"] >= bound,
                        }
                    )
                if ffn == "moe" and r and r.get("gpu_busy_share") is not None:
                    goals.append(
                        {
                            "run": run,
                            "goal": f"{scale} moe bf16: {kind} GPU busy >= 90% of the step",
                            "value": r["gpu_busy_share"],
                            "met": r["gpu_busy_share"] >= 0.9,
                        }
                    )
            for kind in KINDS:
                b, f = tps(scale, kind, ffn, "bf16"), tps(scale, kind, ffn, "fp8")
                bound = GOALS["fp8_1b"][ffn]
                if scale == "1b" and b and f:
                    goals.append(
                        {
                            "run": run,
                            "goal": f"1b {ffn} {kind}: fp8 >= {bound:.2f}x bf16",
                            "value": f / b,
                            "met": f / b >= bound,
                        }
                    )
    return {"rows": rows, "goals": goals}


def markdown(summary: dict) -> str:
    """The summary as markdown tables (rows, then goals)."""
    lines = [
        "| run | scale | kind | ffn | precision | params (M) | tokens/s | MFU | GPU busy | peak GiB "
        "| vs baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        if r.get("error"):
            lines.append(
                f"| {r['run']} | {r['scale']} | {r['kind']} | {r['ffn']} | {r['precision']} | | "
                f"error: {' '.join(r['error'].split())[:80]} | | | | |"
            )
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        vs = f"{r['vs_baseline']:.2f}x {r['baseline']}" if r.get("vs_baseline") else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "-"
        busy = f"{r['gpu_busy_share']:.0%}" if r.get("gpu_busy_share") is not None else "-"
        lines.append(
            f"| {r['run']} | {r['scale']} | {r['kind']} | {r['ffn']} | {r['precision']} | "
            f"{r['num_parameters'] / 1e6:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {busy} | {mem} | {vs} |"
        )
    runs = summary.get("sources") or []
    if any(r.get("options") for r in runs):
        lines += ["", "| run | device | date | options (flags of `run`) |", "|---|---|---|---|"]
        names = {f.name for f in dataclasses.fields(RunOptions)}
        for i, r in enumerate(runs):
            o = RunOptions(**{k: v for k, v in (r.get("options") or {}).items() if k in names})
            lines.append(f"| {i} | {r.get('device')} | {r.get('date')} | `{' '.join(o.as_args())}` |")
    lines += ["", "| run | goal | value | met |", "|---|---|---|---|"]
    for g in summary["goals"]:
        # Three decimals: a ratio just under its goal must not print as the goal ("1.00x NO").
        value = f"{g['value']:.1%}" if ("MFU" in g["goal"] or "busy" in g["goal"]) else f"{g['value']:.3f}x"
        lines.append(f"| {g['run']} | {g['goal']} | {value} | {'yes' if g['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def cmd_report(args) -> None:
    """Merge JSON run records into one summary JSON and a markdown table."""
    records = [json.loads(Path(p).read_text()) for p in args.inputs]
    summary = summarise(records)
    summary["sources"] = [
        {
            k: r.get(k)
            for k in (
                "device",
                "date",
                "torch",
                "transformer_engine",
                "megatron_core",
                "warmup",
                "steps",
                "options",
            )
        }
        for r in records
    ]
    if args.json:
        write_json(args.json, summary)
    text = markdown(summary)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)


# ----------------------------------------------------------------------------- main
def _init_process_group() -> None:
    """A one-rank process group (nccl on GPU, gloo on CPU)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)


def main(argv=None) -> None:
    """Parse the command line and run one subcommand."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="throughput rows")
    run.add_argument("--scales", nargs="+", default=["350m", "1b"], choices=list(SCALES))
    run.add_argument("--kinds", nargs="+", choices=KINDS + list(NATIVES))
    run.add_argument("--ffn", nargs="+", default=["dense", "moe"], choices=["dense", "moe"])
    run.add_argument("--precisions", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    run.add_argument("--warmup", type=int, default=3)
    run.add_argument("--steps", type=int, default=5)
    run.add_argument("--time-budget", type=float, default=540.0, help="seconds; later rows are skipped")
    run.add_argument("--isolate", action="store_true", help="each row in its own process")
    run.add_argument("--out", required=True)
    add_option_flags(run)
    mm = sub.add_parser("max-mbs", help="largest micro-batch per kind and recompute mode")
    mm.add_argument("--scale", default="1b", choices=list(SCALES))
    mm.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    mm.add_argument("--recompute", nargs="+", default=["none", "selective", "full"])
    mm.add_argument("--max", type=int, default=32)
    mm.add_argument("--time-budget", type=float, default=540.0)
    mm.add_argument("--out", required=True)
    prof = sub.add_parser("profile", help="torch.profiler table of one row")
    prof.add_argument("--scale", default="350m", choices=list(SCALES))
    prof.add_argument("--kind", default="intra", choices=KINDS + list(NATIVES))
    prof.add_argument("--moe", action="store_true")
    prof.add_argument("--precision", default="bf16", choices=["bf16", "fp8"])
    prof.add_argument("--steps", type=int, default=2)
    prof.add_argument("--rows", type=int, default=40)
    prof.add_argument(
        "--stacks",
        type=int,
        default=0,
        metavar="FRAMES",
        help="also group ops by their innermost FRAMES Python frames",
    )
    prof.add_argument("--out", required=True)
    add_option_flags(prof)
    rep = sub.add_parser("report", help="merge JSON records into a table")
    rep.add_argument("inputs", nargs="+")
    rep.add_argument("--json")
    rep.add_argument("--markdown")
    args = parser.parse_args(argv)
    if args.cmd == "report":
        cmd_report(args)
        return
    if args.cmd == "run":
        from hybrid_megatron.errors import InputError

        try:
            check_run(args)
        except InputError as err:
            parser.exit(2, f"{parser.prog} run: error: {err}\n")
    from hybrid_megatron import runtime

    runtime.setup()  # the CPU shims when there is no GPU, the allocator and compile defaults

    # A run whose rows each get their own process only spawns them: no CUDA context here, which
    # would hold about 0.5 GiB of the GPU that the rows need (1b at micro-batch 4 is at the edge).
    if not (args.cmd == "run" and spawns_row_processes(args)):
        _init_process_group()
    {"run": cmd_run, "max-mbs": cmd_max_mbs, "profile": cmd_profile}[args.cmd](args)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
