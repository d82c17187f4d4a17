"""The grouped experts' two GEMM layers alone, forward + backward: BF16 ``torch._grouped_mm``
against the FP8 grouped linear (``hybrid_megatron.ops.fp8_grouped_mm``), and where FP8's time goes.

Shapes come from the benchmark's MoE model at ``--scale`` (hidden size, experts, expert FFN,
top-k, one micro-batch of tokens); tokens are routed uniformly at random, and each group is
padded to 16 rows as the grouped experts pad it. Times are medians of ``--repeat`` runs
(CUDA events on a GPU). FP8 is timed with the torch quantiser for activations and gradients
(``fp8_*`` keys), its weights quantised in the call and quantised beforehand (as the experts
reuse them across a step's micro-batches), and, where Transformer Engine runs (a GPU with TE
installed), with TE's fused quantiser and weights quantised beforehand (``fp8_te_*`` keys; null
elsewhere). ``--profile`` adds each FP8 side's kernels by device time, which is how a slow
quantisation step (rather than the GEMMs) shows up.

    python3 -m bench.fp8_grouped_mm --scale 1b --out OUT.json [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime

import torch

from hybrid_megatron.models.moe import grouped_linear, padded_group_layout
from hybrid_megatron.ops.fp8_grouped_mm import (
    TEQuantiser,
    TorchQuantiser,
    fp8_grouped_linear,
    have_transformer_engine,
    quantise_weight,
)

ALIGNMENT = 16


def layer_shapes(scale: str) -> dict[str, int]:
    """Rows, experts and the two layers' sizes of the benchmark's MoE model at ``scale``."""
    from bench.train_throughput import SCALES, model_config

    cfg = model_config(scale, "inter", True, "bf16")
    moe = cfg.moe
    assert moe is not None
    tokens = SCALES[scale]["seq"] * SCALES[scale]["mbs"]
    ffn = moe.expert_ffn_hidden_size or cfg.ffn_size
    return {
        "rows": tokens * moe.top_k,
        "experts": moe.num_experts,
        "hidden": cfg.hidden_size,
        "ffn": ffn,
        "fc1_out": 2 * ffn if cfg.gated_ffn else ffn,
    }


def padded_offsets(rows: int, experts: int, generator: torch.Generator) -> tuple[int, torch.Tensor]:
    """Random group sizes summing to ``rows`` in the grouped experts' padded layout: (buffer rows,
    int32 ends)."""
    group = torch.randint(0, experts, (rows,), generator=generator)
    counts = torch.bincount(group, minlength=experts)
    _, ends, buffer_rows = padded_group_layout(counts, rows, ALIGNMENT)
    return buffer_rows, ends


def time_forward_backward(fn, x, weights, offsets, repeat: int) -> float:
    """Median milliseconds of the two layers' forward and backward (fc1 then fc2, as the experts run)."""
    w1, w2 = weights

    def once():
        h = fn(x, w1, offsets)
        out = fn(h[:, : w2.shape[2]].contiguous(), w2, offsets)
        out.float().sum().backward()

    once()  # warm-up: kernels compiled and selected
    times = []
    for _ in range(repeat):
        x.grad = w1.grad = w2.grad = None
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            once()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_table(fn, x, weights, offsets, rows: int = 15) -> str:
    """The FP8 side's kernels by device time (CPU ops on a CPU), one forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    w1, w2 = weights
    with profile(activities=activities) as prof:
        h = fn(x, w1, offsets)
        fn(h[:, : w2.shape[2]].contiguous(), w2, offsets).float().sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if x.is_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def _te_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformer_engine")
    except PackageNotFoundError:
        import transformer_engine

        return str(getattr(transformer_engine, "__version__", "unknown"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="1b", choices=["350m", "1b", "tiny"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="print the FP8 side's kernels")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = layer_shapes(args.scale)
    generator = torch.Generator().manual_seed(0)
    buffer_rows, offsets = padded_offsets(shapes["rows"], shapes["experts"], generator)
    offsets = offsets.to(device)
    x = torch.randn(buffer_rows, shapes["hidden"], generator=generator).to(device, torch.bfloat16)
    w1 = torch.randn(shapes["experts"], shapes["fc1_out"], shapes["hidden"], generator=generator) * 0.02
    w2 = torch.randn(shapes["experts"], shapes["hidden"], shapes["ffn"], generator=generator) * 0.02
    x.requires_grad_(True)
    weights = [w.to(device, torch.bfloat16).requires_grad_(True) for w in (w1, w2)]

    torch_quantiser = TorchQuantiser()

    # the padded layout gives every group rows, and the experts tell the FP8 path so
    def fp8(a, w, o):
        return fp8_grouped_linear(a, w, o, quantiser=torch_quantiser, every_group_has_rows=True)

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "date": datetime.now(UTC).date().isoformat(),
        "torch": torch.__version__,
        "command": "python3 -m bench.fp8_grouped_mm " + " ".join(sys.argv[1:] if argv is None else argv),
        "shapes": {**shapes, "buffer_rows": buffer_rows},
        "bf16_ms": time_forward_backward(grouped_linear, x, weights, offsets, args.repeat),
        "fp8_ms": time_forward_backward(fp8, x, weights, offsets, args.repeat),
    }
    # the weights' FP8 copies made beforehand, as the experts reuse them across a step's micro-batches
    cached = {id(w): quantise_weight(w) for w in weights}

    def fp8_cached(a, w, o):
        return fp8_grouped_linear(
            a, w, o, cached[id(w)], quantiser=torch_quantiser, every_group_has_rows=True
        )

    te_quantiser = TEQuantiser()

    def fp8_te_cached(a, w, o):
        return fp8_grouped_linear(a, w, o, cached[id(w)], quantiser=te_quantiser, every_group_has_rows=True)

    te = device.type == "cuda" and have_transformer_engine()
    result["fp8_cached_weights_ms"] = time_forward_backward(fp8_cached, x, weights, offsets, args.repeat)
    result["fp8_te_cached_weights_ms"] = (
        time_forward_backward(fp8_te_cached, x, weights, offsets, args.repeat) if te else None
    )
    result["transformer_engine"] = _te_version() if te else None
    result["fp8_speedup"] = result["bf16_ms"] / result["fp8_ms"]
    result["fp8_cached_weights_speedup"] = result["bf16_ms"] / result["fp8_cached_weights_ms"]
    result["fp8_te_cached_weights_speedup"] = (
        result["bf16_ms"] / result["fp8_te_cached_weights_ms"] if te else None
    )
    print(json.dumps(result, indent=1))
    if args.profile:
        result["fp8_kernels"] = kernel_table(fp8, x, weights, offsets)
        print(result["fp8_kernels"])
        if te:
            result["fp8_te_cached_weights_kernels"] = kernel_table(fp8_te_cached, x, weights, offsets)
            print(result["fp8_te_cached_weights_kernels"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
