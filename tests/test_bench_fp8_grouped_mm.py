"""The FP8 grouped-GEMM micro-benchmark runs on a CPU and records what it measured."""

import json

from bench import fp8_grouped_mm


def test_tiny_layers_are_timed_in_both_precisions(tmp_path):
    out = tmp_path / "fp8.json"
    assert fp8_grouped_mm.main(["--scale", "tiny", "--repeat", "1", "--profile", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    shapes = result["shapes"]
    # tiny MoE: 64 tokens x 2 micro-batch samples, top-2 of 8 experts, each group padded to 16 rows
    assert shapes["rows"] == 64 * 2 * 2 and shapes["experts"] == 8
    assert shapes["buffer_rows"] % 16 == 0
    # the grouped experts' fixed buffer: a block of 16 rows per expert beyond the routed rows
    assert shapes["buffer_rows"] == -(-(shapes["rows"] + 16 * shapes["experts"]) // 16) * 16
    assert result["bf16_ms"] > 0 and result["fp8_ms"] > 0 and result["fp8_cached_weights_ms"] > 0
    assert result["fp8_speedup"] == result["bf16_ms"] / result["fp8_ms"]
    assert "_FP8GroupedLinearBackward" in result["fp8_kernels"]
    # TE's quantiser runs on a GPU only: its keys are there, empty
    assert result["fp8_te_cached_weights_ms"] is None and result["transformer_engine"] is None
    assert result["fp8_te_cached_weights_speedup"] is None
    assert "fp8_te_cached_weights_kernels" not in result
