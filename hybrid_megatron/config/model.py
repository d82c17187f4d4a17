"""The recipe's ``model:`` section: what network to build.

Every field maps to one place in the built model; ``hybrid_megatron.models.build_model`` is the
only consumer. Validation here raises one error naming the bad field (pydantic's path).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from hybrid_megatron.config.base import StrictSection

Kind = Literal["transformer", "swa", "mamba", "inter", "intra"]
Flavour = Literal["llama", "nemotron_h"]


def parse_ratio(text: str, field: str) -> tuple[int, int]:
    """Parse a ratio such as ``"1:5"`` into ``(1, 5)``.

    Takes the text and the field name used in the error; returns two non-negative ints, not both 0.
    """
    parts = str(text).split(":")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{field}: expected a ratio like '1:5', got {text!r}") from None
    if a < 0 or b < 0 or a + b == 0:
        raise ValueError(f"{field}: ratio parts must be >= 0 and not both 0, got {text!r}")
    return a, b


class AttentionConfig(StrictSection):
    """Self-attention of Transformer blocks and of the intra block's attention branch."""

    num_heads: int = Field(gt=0, description="query heads (Transformer blocks)")
    num_query_groups: int | None = Field(
        default=None, gt=0, description="GQA key/value heads; default = num_heads (MHA)"
    )
    head_dim: int | None = Field(default=None, gt=0, description="default hidden/num_heads")
    sliding_window: int | None = Field(
        default=None, gt=0, description="window in tokens (kind swa, or any attention)"
    )
    rotary_base: float = Field(
        default=10000.0, description="RoPE base (flavour llama; nemotron_h attention has no RoPE)"
    )


class MambaConfig(StrictSection):
    """Mamba2 mixer of Mamba blocks and of the intra block's Mamba branch."""

    state_dim: int = Field(default=64, gt=0, description="SSM state size N (d_state)")
    head_dim: int = Field(default=64, gt=0, description="P, channels per SSM head")
    num_groups: int = Field(default=1, gt=0, description="groups sharing B and C (ngroups)")
    expand: int = Field(default=2, gt=0, description="d_inner = expand * hidden_size")
    conv_kernel: int = Field(default=4, ge=2)
    chunk_size: int = Field(default=128, gt=0, description="SSD chunk length")


class PatternConfig(StrictSection):
    """Which block goes at which depth (kinds inter and intra)."""

    ratio: str | None = Field(
        default=None,
        description="inter: attention:mamba blocks (default 1:5); "
        "intra: hybrid:mamba blocks (default 1:0, all hybrid)",
    )
    placement: Literal["middle", "even"] = Field(
        default="even", description="where the attention (inter) or hybrid (intra) blocks go"
    )
    layout: str | None = Field(
        default=None,
        description="explicit pattern, one letter per layer. Blocks: A attention + FFN, M mamba "
        "(+ FFN if mamba_block_ffn), H intra hybrid + FFN. Single-sublayer layers (flavour "
        "nemotron_h): * attention only, - MLP only (dense), E MoE only. Kinds inter/intra; with "
        "flavour nemotron_h also transformer, swa (A * - E) and mamba (M - E)",
    )
    allow_early_attention: bool = False
    early_layers: int | None = Field(
        default=None, ge=0, description="depth guarded against attention; default max(1, L//8)"
    )


class IntraConfig(StrictSection):
    """The intra-layer (parallel, head-split) hybrid block."""

    dim_ratio: str = Field(default="1:1", description="attention:mamba share of mixer_width")
    mixer_width: int | None = Field(
        default=None, gt=0, description="attention + mamba channels; default mamba.expand*hidden"
    )
    num_query_groups: int | None = Field(
        default=None, gt=0, description="attention-branch KV heads; default = its query heads"
    )
    branch_norm: Literal["none", "rmsnorm"] = "rmsnorm"
    branch_scalars: bool = Field(default=False, description="learnable scalar per branch")
    fusion: Literal["add", "subtract", "concat"] = "concat"
    overlap_branches: bool = Field(
        default=False,
        description="GPU: run the attention and Mamba branches on two CUDA streams (no effect on CPU)",
    )

    @field_validator("dim_ratio")
    @classmethod
    def _check_ratio(cls, v: str) -> str:
        parse_ratio(v, "intra.dim_ratio")
        return v


class MoEConfig(StrictSection):
    """Mixture-of-experts FFN (megatron-core MoELayer)."""

    num_experts: int = Field(gt=1)
    top_k: int = Field(default=2, gt=0)
    expert_ffn_hidden_size: int | None = Field(default=None, gt=0, description="default ffn")
    shared_expert_ffn_hidden_size: int | None = Field(default=None, gt=0)
    aux_loss_coeff: float = Field(default=1e-2, ge=0)
    token_dispatcher: Literal["auto", "allgather", "alltoall"] = Field(
        default="auto", description="auto: alltoall on GPU, allgather on CPU"
    )
    experts: Literal["grouped", "sequential", "te_grouped"] = Field(
        default="grouped",
        description="how the local experts run. grouped: two grouped GEMMs with the token counts "
        "kept on the device (no host sync per layer; CPU and GPU); sequential: megatron-core's "
        "SequentialMLP, one MLP per expert; te_grouped: megatron-core's TEGroupedMLP (GPU). "
        "All three give the same numbers and checkpoints",
    )
    score_function: Literal["softmax", "sigmoid"] | None = Field(
        default=None,
        description="router scores; default by flavour: llama softmax, nemotron_h sigmoid "
        "(top_k > 1: the chosen sigmoid scores are renormalised to sum to 1)",
    )
    expert_bias: bool | None = Field(
        default=None,
        description="score-correction bias added to the scores for expert choice only, "
        "updated from expert load (aux-loss-free balancing; NemotronH's "
        "e_score_correction_bias); needs sigmoid; default: on with sigmoid",
    )
    expert_bias_update_rate: float = Field(
        default=1e-3, gt=0, description="step size of the expert_bias load update"
    )
    topk_scaling_factor: float | None = Field(
        default=None, gt=0, description="multiplies the routing weights (NemotronH routed_scaling_factor)"
    )

    @model_validator(mode="before")
    @classmethod
    def _grouped_gemm_flag(cls, data: Any) -> Any:
        """Recipes saved before ``experts`` existed say ``grouped_gemm: true|false`` (TE's grouped
        experts or the sequential ones); read it as that choice so their checkpoints resume."""
        if isinstance(data, dict) and "grouped_gemm" in data:
            data = dict(data)
            flag = data.pop("grouped_gemm")
            if not isinstance(flag, bool):
                raise ValueError(
                    f"grouped_gemm: expected true or false, got {flag!r} "
                    "(it is now moe.experts: grouped, sequential or te_grouped)"
                )
            data.setdefault("experts", "te_grouped" if flag else "sequential")
        return data

    @model_validator(mode="after")
    def _topk(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k ({self.top_k}) > moe.num_experts ({self.num_experts})")
        return self


class ModelConfig(StrictSection):
    """A whole language model: kind, sizes, block pattern, FFN and numerics."""

    kind: Kind
    flavour: Flavour = Field(
        default="llama",
        description="layer numerics. llama: RoPE attention, gated SwiGLU FFNs, softmax-routed "
        "MoE. nemotron_h (NemotronH): attention without any position embedding, non-gated "
        "squared-ReLU (relu2) FFNs and experts (up, down), sigmoid-routed MoE with an expert "
        "score-correction bias; allows the layout letters * - E; no kind intra",
    )
    impl: Literal["auto", "te", "local"] = Field(
        default="auto", description="te: Transformer Engine layers (GPU, FP8); local: megatron-core"
    )
    num_layers: int = Field(
        gt=0, description="letters of the layer pattern: blocks (mixer + FFN) and single-sublayer layers"
    )
    hidden_size: int = Field(gt=0)
    ffn_hidden_size: int | None = Field(
        default=None,
        gt=0,
        description="FFN inner size (llama: SwiGLU, default 8/3*hidden rounded up to 64; "
        "nemotron_h: relu2, default 4*hidden)",
    )
    vocab_size: int = Field(gt=0)
    max_position_embeddings: int = Field(default=4096, gt=0)
    attention: AttentionConfig | None = None
    mamba: MambaConfig = MambaConfig()
    pattern: PatternConfig = PatternConfig()
    intra: IntraConfig = IntraConfig()
    moe: MoEConfig | None = None
    mamba_block_ffn: bool = Field(
        default=True, description="Mamba blocks carry an FFN (False: NemotronH-style mixer-only)"
    )
    norm_epsilon: float = Field(
        default=1e-5, gt=0, description="epsilon of every RMSNorm, the Mamba gated norm included"
    )
    init_method_std: float = 0.02
    tie_embeddings: bool = False
    fp8: Literal["hybrid", "e4m3"] | None = Field(default=None, description="TE FP8 recipe")
    fp8_attention: bool = Field(
        default=False,
        description="with fp8: the attention core (QK^T, softmax, PV) in FP8 too, through TE's "
        "cuDNN FP8 attention (Hopper and newer); default keeps it in bf16",
    )
    fp8_output_layer: bool = Field(
        default=False,
        description="with fp8: the LM head (output layer) as a Transformer Engine layer in FP8 "
        "too; megatron-core's own output layer stays bf16. Needs untied embeddings and a "
        "vocab_size whose shard per TP rank is a multiple of 16. Off by default: the logits' "
        "precision matters more than any one layer's, so compare losses before relying on it",
    )
    params_dtype: Literal["fp32", "bf16"] = "fp32"

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        needs_attention = self.kind != "mamba"
        if needs_attention and self.attention is None:
            raise ValueError(f"model.attention: required for kind {self.kind!r}")
        if self.kind == "swa" and (self.attention is None or not self.attention.sliding_window):
            raise ValueError("model.attention.sliding_window: required for kind 'swa'")
        if self.attention is not None:
            a = self.attention
            if a.head_dim is None and self.hidden_size % a.num_heads:
                raise ValueError(
                    f"model.attention.num_heads: hidden_size {self.hidden_size} is not divisible "
                    f"by num_heads {a.num_heads}"
                )
            groups = a.num_query_groups or a.num_heads
            if a.num_heads % groups:
                raise ValueError(
                    f"model.attention.num_query_groups: num_heads {a.num_heads} is not divisible "
                    f"by num_query_groups {groups}"
                )
        if self.flavour == "nemotron_h" and self.kind == "intra":
            raise ValueError(
                "model.flavour: nemotron_h has no intra-layer hybrid block; use kind inter (or flavour llama)"
            )
        if self.kind not in ("inter", "intra") and self.pattern.ratio is not None:
            raise ValueError("model.pattern.ratio: only kinds inter and intra take a ratio")
        if self.kind in ("inter", "intra") and self.pattern.ratio is not None:
            special = "attention" if self.kind == "inter" else "hybrid"
            if parse_ratio(self.pattern.ratio, "model.pattern.ratio")[0] == 0:
                raise ValueError(
                    f"model.pattern.ratio: {self.pattern.ratio} leaves no {special} block, and kind "
                    f"{self.kind} needs at least one; a model of Mamba blocks only is kind mamba"
                )
        if (
            self.kind not in ("inter", "intra")
            and self.flavour == "llama"
            and self.pattern.layout is not None
        ):
            raise ValueError("model.pattern: only kinds inter and intra take a pattern (with flavour llama)")
        if self.moe is not None and self.moe.expert_bias and self.moe_score_function != "sigmoid":
            raise ValueError(
                "model.moe.expert_bias: needs the sigmoid score function (set "
                "model.moe.score_function: sigmoid)"
            )
        if self.fp8 is not None and self.impl == "local":
            raise ValueError("model.fp8: needs impl 'te' (Transformer Engine)")
        if self.fp8_attention and self.fp8 is None:
            raise ValueError("model.fp8_attention: needs model.fp8 (hybrid or e4m3)")
        if self.fp8_output_layer:
            if self.fp8 is None:
                raise ValueError("model.fp8_output_layer: needs model.fp8 (hybrid or e4m3)")
            if self.tie_embeddings:
                # TE's linear owns its weight; a tied head borrows the embedding's each call.
                raise ValueError("model.fp8_output_layer: needs tie_embeddings false")
            # Its vocabulary rows per TP rank must be a multiple of 16: check_parallel_layout.
        if self.fp8_attention and self.attention is not None and self.head_dim != 128:
            # Measured on an H100 (TE 2.11, cuDNN 9.14): head size 64 finds no FP8 attention
            # backend at all, 128 trains (bench/results/train_throughput_h100_2026-11-24).
            raise ValueError(
                f"model.fp8_attention: TE's cuDNN FP8 attention takes head size 128; this "
                f"model's attention heads are {self.head_dim} wide"
            )
        return self

    # Derived sizes, one definition each so builders and accounting agree.
    @property
    def head_dim(self) -> int:
        """Attention head size (kv_channels)."""
        a = self.attention
        return a.head_dim or self.hidden_size // a.num_heads

    @property
    def ffn_size(self) -> int:
        """FFN inner size: the configured one, else for llama (SwiGLU) 8/3*hidden rounded up to
        a multiple of 64, for nemotron_h (relu2, two matrices) 4*hidden."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.flavour == "nemotron_h":
            return 4 * self.hidden_size
        return -(-(8 * self.hidden_size // 3) // 64) * 64

    @property
    def gated_ffn(self) -> bool:
        """Whether FFNs and experts are gated (SwiGLU: gate, up, down) or not (relu2: up, down)."""
        return self.flavour == "llama"

    @property
    def moe_score_function(self) -> str | None:
        """The router's score function: ``moe.score_function``, else the flavour's (llama
        softmax, nemotron_h sigmoid); None without MoE."""
        if self.moe is None:
            return None
        if self.moe.score_function is not None:
            return self.moe.score_function
        return "sigmoid" if self.flavour == "nemotron_h" else "softmax"

    @property
    def moe_expert_bias(self) -> bool:
        """Whether the router has an expert score-correction bias: ``moe.expert_bias``, else on
        exactly when the scores are sigmoids."""
        if self.moe is None:
            return False
        if self.moe.expert_bias is not None:
            return self.moe.expert_bias
        return self.moe_score_function == "sigmoid"

    @property
    def query_groups(self) -> int:
        """Key/value heads of Transformer blocks."""
        return self.attention.num_query_groups or self.attention.num_heads
