"""CPU shims for megatron-core 0.16.1 on a CUDA-less torch (measured list: ../shared/CPU_NOTES.md).

Every shim replaces one CUDA-only call with its CPU equivalent and is applied only when
``torch.cuda.is_available()`` is False. Each has a test in tests/test_compat.py.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


def _cpu_current_device() -> torch.device:
    """Stand-in for ``torch.cuda.current_device()``: the CPU device.

    megatron-core passes ``device=torch.cuda.current_device()`` to tensor factories in
    GlobalMemoryBuffer.get_tensor, the MoE router and experts, and MambaMixer's parameters.
    On a CPU-only torch that call raises; returning the CPU device makes all of them allocate
    where the model lives, without patching each call site.
    """
    return torch.device("cpu")


class CpuRNGStatesTracker:
    """megatron-core's RNG-states tracker with the CPU generator instead of the CUDA one.

    The stock ``CudaRNGStatesTracker`` saves and restores CUDA generator states to give each
    tensor-parallel rank its own stream for dropout and sharded initialisation. On CPU the same
    bookkeeping is done on the default CPU generator: ``fork`` swaps its state in and out.
    """

    def __init__(self, use_cudagraphable_rng: bool = False, is_inference_rng_tracker: bool = False):
        self.is_inference_rng_tracker = is_inference_rng_tracker
        self.reset()

    def is_initialized(self) -> bool:
        """Whether any state was added or set."""
        return self._is_initialized

    def reset(self) -> None:
        """Forget every named state."""
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        """Return a shallow copy of the name -> generator-state map."""
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace the name -> generator-state map (used when restoring checkpoints)."""
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        """Create the named state from ``seed``; raises if the name or seed is taken."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        """Run the body with the named state in the default CPU generator, then restore it."""
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Stand-in for tensor_parallel.random._get_cuda_rng_state: the CPU generator's state."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """Stand-in for tensor_parallel.random._set_cuda_rng_state: sets the CPU generator's state."""
    torch.set_rng_state(new_state)


def _router_gating_linear(inp, weight, bias, router_dtype):
    """Plain-torch router gating GEMM (replaces ``moe_utils.router_gating_linear``).

    Without Transformer Engine, megatron-core's ``RouterGatingLinearFunction`` refers to
    ``te_general_gemm``, which is never defined (NameError at the first MoE forward). Autograd
    through ``F.linear`` in the router dtype is the same computation.
    """
    out = torch.nn.functional.linear(
        inp.to(router_dtype), weight.to(router_dtype), None if bias is None else bias.to(router_dtype)
    )
    return out


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """Causal mask [sq, sq] (True = masked) on the CPU.

    megatron-core's ``get_default_causal_mask`` (used by the local softmax when no mask is
    passed) hard-codes ``device="cuda"``.
    """
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    """Sliding-window causal mask [sq, skv] (True = masked) on the CPU.

    Same as megatron-core's ``get_sliding_window_causal_mask``, which hard-codes ``"cuda"``:
    query i sees keys j with i - left <= j - (skv - sq) <= i + right.
    """
    visible = torch.ones(sq, skv, dtype=torch.bool)
    visible = torch.triu(visible, diagonal=skv - sq - window_size[0])
    visible = torch.tril(visible, diagonal=skv - sq + window_size[1])
    return ~visible


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaRequestsToCpu(TorchFunctionMode):
    """Torch-function mode that serves every request for a CUDA tensor on the CPU.

    megatron-core 0.16.1 hard-codes CUDA in ~70 places on the training path (the pipeline
    schedules' ``torch.zeros(..., device="cuda")`` token counters, p2p buffers, the grad buffers,
    clip_grads, the optimizer's overflow flags, dist_checkpointing, ``tensor.cuda()`` calls).
    Rather than patch each, this mode rewrites ``device=cuda`` arguments to the CPU and makes
    ``Tensor.cuda()`` / ``Tensor.to("cuda")`` return CPU tensors. It is the same mechanism as
    ``torch.set_default_device`` (a global TorchFunctionMode), entered only when CUDA is absent.
    ``tensor.type()`` (the query form) answers with the CUDA type name, because the optimizers
    accept only parameters that call themselves ``torch.cuda.*Tensor``. Requests for pinned
    host memory (staging for a host-to-GPU copy, as in the context-parallel RoPE slice) get
    ordinary memory: without an accelerator torch has no pinned allocator.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            kwargs.pop("device", None)
            kwargs.pop("non_blocking", None)
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron-core's optimizers validate parameters by their legacy type string
            # ("torch.cuda.FloatTensor"); report the CUDA name of the same dtype.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_CUDA_TO_CPU_MODE = CudaRequestsToCpu()


def _keep_adam_step_on_load(original):
    """Wrap DistributedOptimizer._set_main_param_and_optimizer_states for torch's Adam.

    Without TE/apex the inner optimizer is torch's Adam, whose per-parameter state also holds
    ``step``; the "fully_reshardable" checkpoint format carries only param/exp_avg/exp_avg_sq
    per parameter (``step`` travels in the common optimizer state), so megatron-core's copy
    loop raises KeyError('step'). The wrapper leaves ``step`` as it is for the copy; the common
    state restores it.
    """

    def wrapped(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        if "step" in state and "step" not in tensors:
            tensors = {**tensors, "step": state["step"].clone()}
        return original(self, model_param, tensors)

    return wrapped


def _unshare_adam_steps_after_load(original):
    """Wrap DistributedOptimizer.load_state_dict so each parameter gets its own ``step`` tensor.

    Without TE/apex megatron-core hands one ``step`` tensor object to every parameter's torch
    Adam state; Adam increments ``step`` in place per parameter, so after a resume the shared
    counter would advance once per parameter per step and corrupt the bias correction.
    """

    def wrapped(self, state_dict):
        result = original(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return result

    return wrapped


def apply_cpu_shims() -> None:
    """Install the CPU shims into torch and megatron-core; idempotent. Returns nothing."""
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.fusions import fused_softmax
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import utils as transformer_utils
    from megatron.core.transformer.moe import moe_utils, router

    torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]  # a device, not an index
    # Host and "device" are the same memory: synchronising is a no-op.
    torch.cuda.synchronize = lambda device=None: None
    _CUDA_TO_CPU_MODE.__enter__()
    # initialize_rng_tracker instantiates the module-level name, so this swaps the tracker class
    # for every later model_parallel_cuda_manual_seed / get_cuda_rng_tracker call.
    tp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    tp_random.initialize_rng_tracker(force_reset=True)
    # Activation recomputation (tensor_parallel.checkpoint) saves and restores "the device RNG"
    # around each recomputed region; on CPU that device generator is the CPU one.
    tp_random._get_cuda_rng_state = _cpu_rng_state
    tp_random._set_cuda_rng_state = _set_cpu_rng_state
    moe_utils.router_gating_linear = _router_gating_linear
    router.router_gating_linear = _router_gating_linear
    DistributedOptimizer._set_main_param_and_optimizer_states = _keep_adam_step_on_load(
        DistributedOptimizer._set_main_param_and_optimizer_states
    )
    DistributedOptimizer.load_state_dict = _unshare_adam_steps_after_load(
        DistributedOptimizer.load_state_dict
    )
    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = _cpu_default_causal_mask
        module.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask
    _APPLIED = True


def cpu_shims_applied() -> bool:
    """Return True once :func:`apply_cpu_shims` has run in this process."""
    return _APPLIED
