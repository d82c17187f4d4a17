"""The intra-layer (parallel, head-split) hybrid mixer.

One block of the paper's intra-layer hybrid, as the mixer sublayer of a TransformerLayer:

    x -> fused column-parallel in-projection -> [Q,K,V (GQA) | z,x,B,C,dt]
      -> attention branch (megatron-core SelfAttention core: RoPE, causal, optional window)
      -> Mamba2 branch   (megatron-core MambaMixer: conv1d, SSD scan, gated norm)
      -> per-branch output RMSNorm (optional) -> per-branch learnable scalar (optional)
      -> fusion: add | subtract (attention - mamba) | concat
      -> one row-parallel out-projection

TransformerLayer supplies the input RMSNorm before and the residual add after; its ``mlp`` slot
holds the block's FFN. Tensor parallelism shards the heads of both branches: every rank's slice
of the fused projection holds its own attention heads and Mamba heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from hybrid_megatron.models.sharding import split_sharded_tensor


class _ShardedRMSNorm(torch.autograd.Function):
    """RMSNorm of a channel-sharded ``x`` whose mean square spans every rank of ``group``.

    Saves what torch's fused RMSNorm saves (``x`` in its own dtype and the reciprocal RMS per
    position, in fp32 or wider), where autograd through the elementwise formula kept two fp32
    copies of ``x`` and a product: in bf16, 2 bytes per element instead of 10. Backward, with r
    the reciprocal RMS, g = dy * w and N the full width: dx = r g - x r^3 sum_N(g x) / N (the sum
    all-reduced like the mean square), dw = sum over positions of dy * (x r).
    """

    @staticmethod
    def forward(ctx, x, weight, full_width, eps, group):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        square_sum = xf.square().sum(dim=-1, keepdim=True)
        torch.distributed.all_reduce(square_sum, group=group)
        rstd = torch.rsqrt(square_sum / full_width + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.full_width, ctx.group = full_width, group
        return (xf * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xf, dyf = x.to(rstd.dtype), dy.to(rstd.dtype)
        g = dyf * weight.to(rstd.dtype)
        dot = (g * xf).sum(dim=-1, keepdim=True)
        torch.distributed.all_reduce(dot, group=ctx.group)
        dx = rstd * g - xf * rstd.pow(3) * (dot / ctx.full_width)
        normed = (xf * rstd).to(x.dtype).to(rstd.dtype)
        dw = (dyf * normed).reshape(-1, weight.shape[0]).sum(dim=0)
        return dx.to(x.dtype), dw.to(weight.dtype), None, None, None


class BranchRMSNorm(torch.nn.Module):
    """RMSNorm over a TP-sharded branch output, exact at any TP size.

    The mean square runs over the branch's full width: each rank sums its own channels and the
    sums are all-reduced (forward and backward) across the tensor-parallel group, so TP=2
    computes what TP=1 computes. The per-channel weight is sharded like the channels.
    """

    def __init__(self, local_width: int, full_width: int, eps: float, tp_group, dtype):
        super().__init__()
        self.full_width = full_width
        self.eps = eps
        self.tp_group = tp_group
        self.weight = torch.nn.Parameter(torch.ones(local_width, dtype=dtype))
        setattr(self.weight, "tensor_model_parallel", True)
        setattr(self.weight, "partition_dim", 0)
        setattr(self.weight, "partition_stride", 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` [..., local_width]; returns a tensor of the same shape and dtype."""
        if self.tp_group is None or self.tp_group.size() == 1:
            # The whole width is on this rank: torch's fused RMSNorm (one kernel each way on
            # GPU instead of ~6 elementwise fp32 passes), the same formula.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return _ShardedRMSNorm.apply(x, self.weight, self.full_width, self.eps, self.tp_group)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Checkpoint entry for the weight, sharded along its only axis."""
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets
        )


class MambaBranchCacheKey(int):
    """The layer number of an H block's Mamba branch, as a distinct inference-cache key.

    megatron-core's static inference context keys the attention KV cache and MambaMixer's
    conv/SSM states by ``layer_number`` in one dict, and both branches of an H block share it.
    This is the same integer for arithmetic and printing (MambaMixer uses its layer_number only
    as that cache key), but it hashes and compares apart from the plain int, so the branch's
    states get their own entry instead of overwriting the attention branch's KV cache.
    """

    def __eq__(self, other):
        return isinstance(other, MambaBranchCacheKey) and int(self) == int(other)

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(("mamba-branch", int(self)))


@dataclass
class IntraHybridSubmodules:
    """Specs of the hybrid mixer's parts (chosen per impl: TE or local megatron-core)."""

    in_proj: ModuleSpec | type = None
    attention: ModuleSpec | None = None
    mamba: ModuleSpec | None = None
    out_proj: ModuleSpec | type = None


class IntraHybridMixer(MegatronModule):
    """Attention and Mamba2 on the same input, head-split, fused into one output projection.

    Args:
        config: the model's TransformerConfig.
        submodules: IntraHybridSubmodules.
        attention_config / mamba_config: per-branch TransformerConfigs (head counts and widths of
            each branch; built by ``hybrid_megatron.models.transformer_config``). None drops the
            branch (a 0-dim share).
        fusion: ``add`` | ``subtract`` | ``concat``.
        branch_norm: ``rmsnorm`` | ``none``.
        branch_scalars: learn one scalar per branch, initialised to 1.
        overlap_branches: on GPU, run the Mamba branch on a side CUDA stream, concurrently with
            the attention branch (training and eval forward; cached inference stays sequential).
            The same kernels on the same data: only their scheduling changes. Under
            CUDA_DEVICE_MAX_CONNECTIONS=1 all streams share one hardware queue, so little overlaps.
        layer_number, pg_collection: as for megatron-core attention modules.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: IntraHybridSubmodules,
        attention_config: TransformerConfig | None,
        mamba_config: TransformerConfig | None,
        fusion: str,
        branch_norm: str,
        branch_scalars: bool,
        overlap_branches: bool = False,
        layer_number: int = 1,
        pg_collection=None,
        **unused,
    ):
        super().__init__(config)
        self.fusion = fusion
        self.overlap_branches = overlap_branches
        # created on the first overlapped forward (see forward)
        self._side_stream: torch.cuda.Stream | None = None
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        self.attention = None
        self.mamba = None
        widths = {}  # branch -> full output width (before fusion)
        in_sections: list[tuple[str, int]] = []  # local row sections of the fused projection

        if attention_config is not None:
            self.attention = build_module(
                submodules.attention,
                config=attention_config,
                layer_number=layer_number,
                pg_collection=pg_collection,
            )
            heads, groups = attention_config.num_attention_heads, attention_config.num_query_groups
            head_dim = attention_config.kv_channels
            in_sections.append(("qkv", (heads + 2 * groups) * head_dim // tp))
            widths["attention"] = heads * head_dim
        if mamba_config is not None:
            self.mamba = build_module(
                submodules.mamba,
                config=mamba_config,
                d_model=config.hidden_size,
                layer_number=layer_number,
                pg_collection=pg_collection,
            )
            # Cached inference: a cache key of its own (see MambaBranchCacheKey).
            self.mamba.layer_number = MambaBranchCacheKey(layer_number)
            in_sections.extend(self.mamba.in_proj_sections)
            widths["mamba"] = self.mamba.d_inner
        if not widths:
            raise ValueError("intra.dim_ratio: both branches have width 0")
        if fusion in ("add", "subtract") and len(set(widths.values())) > 1:
            raise ValueError(
                f"intra.fusion: {fusion!r} needs equal branch widths, got {widths}; "
                f"use dim_ratio 1:1 or fusion concat"
            )
        self.branch_widths = widths
        self.in_sections = in_sections

        self.in_proj = build_module(
            submodules.in_proj,
            config.hidden_size,
            sum(size for _, size in in_sections) * tp,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.tp_group,
        )

        # Per-branch parts are direct attributes (not ModuleDicts) so that megatron-core's
        # sharded_state_dict recursion reaches BranchRMSNorm's own TP-sharded entry.
        for name, width in widths.items():
            norm = None
            if branch_norm == "rmsnorm":
                norm = BranchRMSNorm(
                    width // tp, width, config.layernorm_epsilon, self.tp_group, config.params_dtype
                )
            setattr(self, f"{name}_norm", norm)
            # Replicated across TP; the gradient is summed over ranks inside autograd (see
            # _finish_branch).
            scale = torch.nn.Parameter(torch.ones((), dtype=config.params_dtype)) if branch_scalars else None
            setattr(self, f"{name}_scale", scale)

        fused_width = sum(widths.values()) if fusion == "concat" else next(iter(widths.values()))
        self.out_proj = build_module(
            submodules.out_proj,
            fused_width,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
        )

    def _finish_branch(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Apply the branch's output norm and scalar (each optional)."""
        norm = getattr(self, f"{name}_norm")
        if norm is not None:
            out = norm(out)
        scale = getattr(self, f"{name}_scale")
        if scale is not None:
            # Each rank sees only its channels, so d(loss)/d(scale) is a partial sum per rank;
            # copy_to's backward all-reduce makes it the full gradient on every rank.
            out = out * tensor_parallel.copy_to_tensor_model_parallel_region(scale, self.tp_group)
        return out

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        inference_context=None,
        rotary_pos_emb=None,
        packed_seq_params=None,
        **unused,
    ):
        """Mix ``hidden_states`` [s, b, h]; returns (output [s, b, h], bias or None)."""
        fused, _ = self.in_proj(hidden_states)
        # Two views of the fused projection: [qkv | z,x,B,C,dt]. The Mamba part stays a strided
        # view: MambaMixer copies it into its own [b, s, d] layout anyway, so slicing it into
        # z, x, B, C, dt here and concatenating them again would cost one more copy each way.
        qkv_width = self.in_sections[0][1] if self.attention is not None else 0
        attention_in, mamba_in = torch.split(fused, [qkv_width, fused.shape[-1] - qkv_width], dim=-1)
        branches = {}
        overlap = (
            self.overlap_branches
            and hidden_states.is_cuda
            and inference_context is None
            and self.attention is not None
            and self.mamba is not None
        )
        if overlap:
            # The Mamba branch (many small, latency-bound SSD kernels) goes on a side stream while
            # attention runs on the current one. Host order stays as in the sequential path, so
            # the ops, their autograd graph and any RNG draws are identical; only streams differ.
            # Fork before attention is queued, so the side stream waits for the fused projection
            # only. wait_stream is an event record/wait: no host sync, and legal under CUDA-graph
            # capture, where it pulls the side stream into the capture (megatron-core's local
            # graphs capture on a non-default stream, hence current_stream(), not the default).
            main = torch.cuda.current_stream()
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device=hidden_states.device)
            side = self._side_stream
            side.wait_stream(main)
        if self.attention is not None:
            # megatron-core's attention views its input as [s, b, groups, ...]; a slice of the
            # fused projection's last dim is strided, so it is made contiguous first.
            attn_out, _ = self.attention(
                attention_in.contiguous(),
                attention_mask=attention_mask,
                inference_context=inference_context,
                rotary_pos_emb=rotary_pos_emb,
                packed_seq_params=packed_seq_params,
            )
            branches["attention"] = self._finish_branch("attention", attn_out)
        if self.mamba is not None:
            if inference_context is not None and not self.training and inference_context.is_static_batching():
                self._allocate_mamba_states(inference_context, mamba_in.shape[1])
            if overlap:
                with torch.cuda.stream(side):
                    # mamba_in is a view of `fused`, allocated on main: without this, once Python
                    # frees it the allocator could hand its memory to main-stream work while the
                    # side stream is still reading it.
                    mamba_in.record_stream(side)
                    mamba_out, _ = self.mamba(mamba_in, inference_context=None)
                    mamba_out = self._finish_branch("mamba", mamba_out)
                # Join after attention is queued (joining earlier would serialise the branches).
                main.wait_stream(side)
                # Allocated on side, read (and freed) on main: tie its reuse to main's progress.
                mamba_out.record_stream(main)
                # Backward needs nothing more: autograd runs each op's backward on the stream its
                # forward ran on, waits on events where a gradient crosses streams and records it
                # on the consuming stream, and syncs the caller's stream with every leaf stream at
                # the end (torch docs, CUDA semantics: "Stream semantics of backward passes").
                # So the branches' backwards overlap too, and .grad is safe to use afterwards.
                branches["mamba"] = mamba_out
            else:
                mamba_out, _ = self.mamba(mamba_in, inference_context=inference_context)
                branches["mamba"] = self._finish_branch("mamba", mamba_out)

        if len(branches) == 1:
            fused_out = next(iter(branches.values()))
        elif self.fusion == "add":
            fused_out = branches["attention"] + branches["mamba"]
        elif self.fusion == "subtract":
            fused_out = branches["attention"] - branches["mamba"]
        else:
            fused_out = torch.cat([branches["attention"], branches["mamba"]], dim=-1)
        return self.out_proj(fused_out)

    def _allocate_mamba_states(self, inference_context, batch: int) -> None:
        """Create the Mamba branch's conv/SSM states in a static inference context.

        MambaMixer allocates them itself on first use, taking device and dtype from its
        ``in_proj.weight``, which the branch's pass-through projection does not have; this
        allocates the same zero tensors (shapes from ``mamba_state_shapes_per_request``) from
        the conv weight instead, so MambaMixer then finds and reuses them.
        """
        key = self.mamba.layer_number
        if key in inference_context.key_value_memory_dict and self.mamba.cached_batch_size == batch:
            return
        conv_shape, ssm_shape = self.mamba.mamba_state_shapes_per_request()
        weight = self.mamba.conv1d.weight
        inference_context.key_value_memory_dict[key] = (
            torch.zeros(batch, *conv_shape, device=weight.device, dtype=weight.dtype),
            torch.zeros(batch, *ssm_shape, device=weight.device, dtype=weight.dtype),
        )
        self.mamba.cached_batch_size = batch

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Checkpoint entries with the fused projections split into their logical parts.

        in_proj rows become ``in_proj.weight.{qkv,z,x,B,C,dt}`` and, for concat fusion, the
        out_proj columns ``out_proj.weight.{attention,mamba}``, so a checkpoint reloads at any TP.
        """
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}in_proj.weight"
        sd[key] = split_sharded_tensor(
            sd[key], [size for _, size in self.in_sections], [n for n, _ in self.in_sections], 0
        )
        if self.fusion == "concat" and len(self.branch_widths) == 2:
            tp = self.tp_group.size()
            key = f"{prefix}out_proj.weight"
            sd[key] = split_sharded_tensor(
                sd[key],
                [w // tp for w in self.branch_widths.values()],
                list(self.branch_widths),
                1,
            )
        return sd
