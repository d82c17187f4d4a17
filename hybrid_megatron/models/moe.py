"""Mixture-of-experts parts that keep the step on the GPU: grouped experts and a dispatcher.

megatron-core's grouped experts (TEGroupedMLP) need each expert's token count on the host, so
every MoE layer waits for the GPU once per micro-batch and TE's grouped GEMM then spends
milliseconds of host time per call. Here the counts stay on the device:

- :class:`GroupedExperts` runs all local experts as two grouped GEMMs (``torch._grouped_mm``,
  group offsets on the device). Each expert's rows are padded to :func:`group_alignment` inside
  a buffer of fixed size, so shapes do not depend on the routing and a CUDA graph can replay it.
  Its checkpoint keys and global shapes are those of megatron-core's SequentialMLP, so a
  checkpoint moves between the two (and between EP/TP layouts).
- :class:`DeviceCountsAlltoAllDispatcher` is megatron-core's all-to-all dispatcher without the
  device-to-host copy of the token counts where no collective needs them (one EP and expert-TP
  rank); :func:`keep_token_counts_on_device` installs it in a built model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_rank, get_pg_size

from hybrid_megatron.ops.fp8_grouped_mm import QuantisedWeight, fp8_grouped_linear, quantise_weight


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x[rows of g] @ weight[g].T`` for each group ``g`` of rows (``offsets``: int32 end rows),
    ``weight`` [groups, out, in]: one ``torch._grouped_mm``."""
    if x.is_cuda and x.dtype != torch.bfloat16:
        # the CUDA grouped GEMM takes bf16 only; fp32/fp16 runs (checks, debugging) loop over
        # the groups, reading the offsets back to the host
        out, start = x.new_zeros(x.shape[0], weight.shape[1]), 0
        for g, end in enumerate(offsets.tolist()):
            out[start:end] = x[start:end] @ weight[g].T
            start = end
        return out
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)


def group_alignment(device: torch.device) -> int:
    """Rows per expert group are padded to a multiple of this: 16 on CUDA (the 16-byte rule of
    the grouped GEMM's tensor-memory loads, also for FP8's one-byte rows), 1 elsewhere."""
    return 16 if device.type == "cuda" else 1


def padded_group_layout(counts: torch.Tensor, num_rows: int, alignment: int):
    """Where each routed row goes when every group is padded to ``alignment`` rows.

    Takes the per-group row counts (int tensor on the rows' device, summing to ``num_rows``), the
    number of rows and the alignment. Returns ``(destination, offsets, buffer_rows)``: the padded
    row index of each input row, the int32 end offset of each padded group (``torch._grouped_mm``'s
    ``offs``) and the fixed buffer size ``num_rows + groups * alignment`` rounded up to the
    alignment, a bound that does not depend on the counts. Nothing is read back to the host.

    With ``alignment`` > 1, a group without rows still gets one block of padding rows (zeros), so
    every group's weight gradient is a sum over real rows, zero for that group, and no kernel
    meets an empty group, whose output a grouped GEMM leaves undefined. The last group ends at
    the buffer's end: the buffer's spare rows become its padding, because a grouped GEMM leaves
    output rows past the last offset unwritten and FP8's scales read every row.
    With ``alignment`` 1 the layout is the identity (the rows are used in place).
    """
    groups = counts.numel()
    counts = counts.to(torch.int64)
    blocks = (counts + alignment - 1) // alignment
    if alignment > 1:
        blocks = blocks.clamp(min=1)
    padded = blocks * alignment
    padded_ends = torch.cumsum(padded, 0)
    shift = (padded_ends - padded) - (torch.cumsum(counts, 0) - counts)  # padded start - start
    group_of_row = torch.repeat_interleave(
        torch.arange(groups, device=counts.device), counts, output_size=num_rows
    )
    destination = torch.arange(num_rows, device=counts.device) + shift[group_of_row]
    bound = num_rows + groups * alignment if alignment > 1 else num_rows
    # the buffer's row count a multiple of the alignment too: FP8's weight-gradient GEMM reads
    # the transposed buffer, whose row stride must be a multiple of 16 bytes
    buffer_rows = -(-bound // alignment) * alignment
    offsets = padded_ends.to(torch.int32)
    offsets[-1] = buffer_rows
    return destination, offsets, buffer_rows


class GroupedExperts(MegatronModule):
    """The local experts of an MoE layer as two grouped GEMMs with device-side group sizes.

    Same call contract as megatron-core's experts modules: ``forward(tokens [rows, hidden]`` sorted
    by local expert, ``tokens_per_expert`` (host or device), ``probs [rows])`` returns
    ``(output [rows, hidden], None)``. Weights: ``weight1 [experts, (2 x) ffn / tp, hidden]``
    (gate rows first, then the linear rows, for gated FFNs) and ``weight2 [experts, hidden,
    ffn / tp]``, split over the expert-TP group like megatron-core's column/row-parallel experts.
    Under an FP8 config both GEMMs (and their gradients) run in E4M3
    (:func:`~hybrid_megatron.ops.fp8_grouped_mm.fp8_grouped_linear`): weights with row-wise
    scales, activations and gradients with TE's per-tensor current scaling on a GPU.
    """

    alignment: int | None = None  # rows per padded group; None: group_alignment(device)

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection=None):
        super().__init__(config=config)
        if config.add_bias_linear:
            raise ValueError("GroupedExperts: experts have no biases (add_bias_linear=False)")
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        tp_size = get_pg_size(self.tp_group)
        self.ffn_per_rank = config.moe_ffn_hidden_size // tp_size
        if self.ffn_per_rank * tp_size != config.moe_ffn_hidden_size:
            raise ValueError(
                f"moe_ffn_hidden_size {config.moe_ffn_hidden_size} does not split over expert TP {tp_size}"
            )
        self.gated = config.gated_linear_unit
        self.fp8 = config.fp8 is not None
        if self.fp8 and (config.hidden_size % 16 or self.ffn_per_rank % 16):
            raise ValueError(
                f"FP8 grouped experts need hidden size ({config.hidden_size}) and expert FFN size per "
                f"TP rank ({self.ffn_per_rank}) in multiples of 16"
            )
        # FP8 copies of the weights, made on the first micro-batch of each step and reused by the
        # others: megatron-core's schedules set ``is_first_microbatch`` on every module that has
        # it under FP8 (``MegatronModule.set_is_first_microbatch``), as for TE's weight cache
        self.is_first_microbatch = True
        self._fp8_weights: dict[str, tuple[tuple[int, int], QuantisedWeight]] = {}
        fc1_rows = (2 if self.gated else 1) * self.ffn_per_rank
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        shape1 = (num_local_experts, fc1_rows, config.hidden_size)
        shape2 = (num_local_experts, config.hidden_size, self.ffn_per_rank)
        self.weight1 = torch.nn.Parameter(torch.empty(shape1, dtype=config.params_dtype, device=device))
        self.weight2 = torch.nn.Parameter(torch.empty(shape2, dtype=config.params_dtype, device=device))
        if config.perform_initialization:
            self._initialise()
        expert_parallel = get_pg_size(self.ep_group) > 1
        for weight, tp_dim in ((self.weight1, 1), (self.weight2, 2)):
            # megatron-core's DDP reduces expert weights over the expert-data-parallel group
            # (``allreduce`` False) and counts TP-split weights once in the gradient norm.
            set_tensor_model_parallel_attributes(weight, True, tp_dim, 1)
            weight.allreduce = not expert_parallel  # type: ignore[attr-defined]  # megatron-core reads it

    @torch.no_grad()
    def _initialise(self) -> None:
        """Each expert's full fc1/fc2 weights drawn with the config's init methods, then this
        rank's TP slice: on the CPU from the default generator, so that weights do not depend on
        the TP size; on the GPU under megatron-core's expert-parallel RNG stream."""
        cfg = self.config
        tp_rank, tp_size = get_pg_rank(self.tp_group), get_pg_size(self.tp_group)
        for e in range(self.num_local_experts):
            if cfg.use_cpu_initialization:
                rows = (2 if self.gated else 1) * cfg.moe_ffn_hidden_size
                fc1 = torch.empty(rows, cfg.hidden_size, dtype=torch.float32)
                cfg.init_method(fc1)
                fc2 = torch.empty(cfg.hidden_size, cfg.moe_ffn_hidden_size, dtype=torch.float32)
                cfg.output_layer_init_method(fc2)
                halves = fc1.chunk(2 if self.gated else 1, dim=0)
                fc1_slice = torch.cat([h.chunk(tp_size, dim=0)[tp_rank] for h in halves])
                self.weight1[e].copy_(fc1_slice)
                self.weight2[e].copy_(fc2.chunk(tp_size, dim=1)[tp_rank])
            else:
                with tensor_parallel.get_cuda_rng_tracker().fork(
                    tensor_parallel.get_expert_parallel_rng_tracker_name()
                ):
                    cfg.init_method(self.weight1[e])
                    cfg.output_layer_init_method(self.weight2[e])

    # plain state dicts (export, import, tests) name each expert's weights as SequentialMLP does
    _PLAIN_KEYS = (("weight1", "linear_fc1"), ("weight2", "linear_fc2"))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, fc in self._PLAIN_KEYS:
            weight = getattr(self, name) if keep_vars else getattr(self, name).detach()
            for e in range(self.num_local_experts):
                destination[f"{prefix}local_experts.{e}.{fc}.weight"] = weight[e]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Takes each weight stacked (``weight1``: a distributed checkpoint's merged tensor) or
        per expert (``local_experts.<e>.linear_fc1.weight``: a plain or SequentialMLP state
        dict); the experts' TE extra state of such a state dict is not needed here."""
        for name, fc in self._PLAIN_KEYS:
            param = getattr(self, name)
            stacked = state_dict.get(prefix + name)
            if stacked is None:
                keys = [f"{prefix}local_experts.{e}.{fc}.weight" for e in range(self.num_local_experts)]
                absent = [k for k in keys if k not in state_dict]
                if absent:
                    missing_keys.extend(absent)
                    continue
                stacked = torch.stack([state_dict[k] for k in keys])
            if stacked.shape != param.shape:
                error_msgs.append(
                    f"size mismatch for {prefix}{name}: checkpoint {tuple(stacked.shape)}, "
                    f"model {tuple(param.shape)}"
                )
                continue
            with torch.no_grad():
                param.copy_(stacked)

    def _activation(self, fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The FFN activation weighted by each row's routing probability, as megatron-core's
        expert MLP computes it (fused weighted SwiGLU when the config fuses it)."""
        cfg = self.config
        if cfg.bias_activation_fusion and self.gated and cfg.activation_func is F.silu:
            return weighted_bias_swiglu_impl(fc1_out, None, probs.unsqueeze(-1))
        if self.gated:
            gate, linear = torch.chunk(fc1_out, 2, dim=-1)
            hidden = cfg.activation_func(gate) * linear
        else:
            hidden = cfg.activation_func(fc1_out)
        return (hidden * probs.unsqueeze(-1)).to(fc1_out.dtype)

    def _fp8_weight(self, name: str) -> QuantisedWeight:
        """The weight's FP8 copies: cached, remade on a step's first micro-batch or when the
        weight was written in place since (its version counter moved)."""
        weight = getattr(self, name)
        key = (weight._version, weight.data_ptr())
        cached = self._fp8_weights.get(name)
        if cached is None or self.is_first_microbatch or cached[0] != key:
            cached = (key, quantise_weight(weight))
            self._fp8_weights[name] = cached
        return cached[1]

    def _linear(self, x: torch.Tensor, name: str, offsets: torch.Tensor, padded: bool) -> torch.Tensor:
        weight = getattr(self, name)
        if self.fp8:
            # padded layouts give every group rows (padded_group_layout)
            return fp8_grouped_linear(x, weight, offsets, self._fp8_weight(name), every_group_has_rows=padded)
        return grouped_linear(x, weight, offsets)

    def forward(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        counts = tokens_per_expert.to(device=tokens.device, non_blocking=True)
        rows = tokens.shape[0]
        alignment = self.alignment or group_alignment(tokens.device)
        destination, offsets, buffer_rows = padded_group_layout(counts, rows, alignment)
        padded = alignment > 1
        if padded:
            tokens = tokens.new_zeros(buffer_rows, tokens.shape[1]).index_copy(0, destination, tokens)
            probs = probs.new_zeros(buffer_rows).index_copy(0, destination, probs)
        fc1_out = self._linear(tokens, "weight1", offsets, padded)
        hidden = self._activation(fc1_out, probs)
        out = self._linear(hidden, "weight2", offsets, padded)
        self.is_first_microbatch = False
        if padded:
            out = out.index_select(0, destination)
        return out, None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """SequentialMLP's checkpoint layout: one tensor per weight,
        ``{prefix}experts.linear_fc{1,2}.weight`` of global shape ``[experts, out, in]``, gated
        fc1 rows stored as all gate rows then all linear rows whatever the TP size."""
        ep_rank, ep_size = get_pg_rank(self.ep_group), get_pg_size(self.ep_group)
        tp_rank, tp_size = get_pg_rank(self.tp_group), get_pg_size(self.tp_group)
        replica_id = (0, 0, get_pg_rank(self.dp_group))
        first_expert = ep_rank * self.num_local_experts
        num_experts = ep_size * self.num_local_experts
        expert_axis = len(sharded_offsets)
        prepend = expert_axis + 1

        def expert_shards(key, weight, local_expert, tp_axis):
            expert = (expert_axis, first_expert + local_expert, num_experts)
            if tp_axis == 0 and self.gated:  # gate and linear halves land in separate blocks
                gate, linear = weight.chunk(2, dim=0)
                return [
                    ShardedTensor.from_rank_offsets(
                        key,
                        part,
                        *sharded_offsets,
                        expert,
                        (prepend, half * tp_size + tp_rank, 2 * tp_size),
                        replica_id=replica_id,
                        prepend_axis_num=prepend,
                    )
                    for half, part in enumerate((gate, linear))
                ]
            return [
                ShardedTensor.from_rank_offsets(
                    key,
                    weight,
                    *sharded_offsets,
                    expert,
                    (prepend + tp_axis, tp_rank, tp_size),
                    replica_id=replica_id,
                    prepend_axis_num=prepend,
                )
            ]

        def factory(param: torch.Tensor, fc: str, tp_axis: int) -> ShardedTensorFactory:
            key = f"{prefix}experts.linear_{fc}.weight"

            def build(key, data, replica_id, flattened_range):
                return [expert_shards(key, data[e], e, tp_axis) for e in range(self.num_local_experts)]

            def merge(loaded):
                return torch.stack([torch.cat(parts, dim=0) for parts in loaded])

            return ShardedTensorFactory(key, param, build, merge, replica_id)

        return {
            f"{prefix}weight1": factory(self.weight1, "fc1", 0),
            f"{prefix}weight2": factory(self.weight2, "fc2", 1),
        }


class DeviceCountsAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron-core's all-to-all dispatcher; on one EP and expert-TP rank with dropless routing it
    hands the experts the per-expert token counts on the device instead of copying them to the
    host and waiting for that copy (GroupedExperts reads them on the device)."""

    def _counts_stay_on_device(self) -> bool:
        cfg = self.config
        return (
            self.ep_size == 1
            and self.tp_size == 1
            and not self.drop_and_pad
            and cfg.moe_expert_capacity_factor is None
            and not cfg.moe_router_padding_for_quantization
            # the unfused chunk sort splits by host counts
            and (self.num_local_experts == 1 or cfg.moe_permute_fusion)
        )

    def _maybe_dtoh_and_synchronize(self, point: str, tokens_per_expert: torch.Tensor | None = None):
        if self._counts_stay_on_device():
            return tokens_per_expert
        return super()._maybe_dtoh_and_synchronize(point, tokens_per_expert)


def keep_token_counts_on_device(model: torch.nn.Module) -> int:
    """Give every MoE layer of ``model`` whose experts are :class:`GroupedExperts` a
    :class:`DeviceCountsAlltoAllDispatcher` in place of megatron-core's all-to-all dispatcher
    (other dispatchers are left as configured). Returns how many layers were changed.

    A swap after building, since megatron-core's MoELayer picks its dispatcher by name and its
    TransformerLayer passes process groups only to MoELayer itself, not to a subclass."""
    changed = 0
    for layer in model.modules():
        if (
            isinstance(layer, MoELayer)
            and isinstance(layer.experts, GroupedExperts)
            and type(layer.token_dispatcher) is MoEAlltoAllTokenDispatcher
        ):
            layer.token_dispatcher = DeviceCountsAlltoAllDispatcher(
                layer.num_local_experts,
                layer.local_expert_indices,
                config=layer.config,
                pg_collection=get_default_pg_collection(),
            )
            if layer.shared_experts is not None and layer.shared_expert_overlap:
                layer.token_dispatcher.set_shared_experts(layer.shared_experts)
            changed += 1
    return changed


__all__ = [
    "DeviceCountsAlltoAllDispatcher",
    "GroupedExperts",
    "group_alignment",
    "keep_token_counts_on_device",
    "padded_group_layout",
]
