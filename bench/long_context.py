"""The longest sequence each kind trains at on one GPU, and its tokens/s at each length.

Every (kind, length) is one bench/train_throughput row (dense FFN, bf16, micro-batch 1, full
recompute unless told otherwise) in a process of its own, so that one length's out-of-memory
leaves nothing behind for the next. Lengths double from ``--start`` (8K) to ``--max-length``;
all kinds run at one length before any runs at the next, so a sweep cut short by its time
budget still has the curve up to some length. A kind stops at its first length that runs out of
memory (recorded as ``"oom": true``) or fails. The JSON is rewritten after every length; a run
with the same ``--out`` and settings skips the lengths it already holds (measured, or out of
memory), so a sweep longer than one time budget continues in the next call.

    python3 -m bench.long_context run --out OUT.json [--scale 1b] [--kinds transformer mamba]
        [--start 8192 --max-length 262144 | --lengths 8192 65536] [--time-budget 540]
    python3 -m bench.long_context report OUT.json [--markdown OUT.md]

RoPE has no length limit of its own; the recipe's ``model.max_position_embeddings`` is raised to
each length (train_throughput's ``--seq-length``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from bench.train_throughput import KINDS, SCALES, RunOptions, measure_in_subprocess
from hybrid_megatron.atomic_output import write_json_atomically as write_json

# The settings every length of one JSON file shares; a re-run with other settings is refused.
SETTINGS = ("scale", "ffn", "precision", "micro_batch", "recompute", "warmup", "steps", "max_memory_gib")
# What a length keeps of its train_throughput row.
ROW_KEYS = (
    "kind",
    "seq_length",
    "device",
    "tokens_per_s",
    "step_s",
    "peak_memory_gib",
    "flops_per_token",
    "num_parameters",
    "losses",
    "oom",
    "error",
)


def doubling_lengths(start: int, stop: int) -> list[int]:
    """``start``, 2 x ``start``, ... up to and including ``stop``."""
    lengths = []
    length = start
    while length <= stop:
        lengths.append(length)
        length *= 2
    return lengths


def is_settled(row: dict) -> bool:
    """Whether a length needs no re-run: it was measured or ran out of memory (an error or a
    kill is tried again by the next call)."""
    return row.get("tokens_per_s") is not None or bool(row.get("oom"))


def stops_kind(row: dict) -> bool:
    """Whether a kind goes no longer after this length: it ran out of memory or failed."""
    return bool(row.get("oom") or row.get("error"))


@dataclasses.dataclass
class Sweep:
    """One sweep's JSON record: its settings and a row per (kind, length) tried."""

    settings: dict
    rows: list = dataclasses.field(default_factory=list)

    def row(self, kind: str, length: int) -> dict | None:
        return next((r for r in self.rows if r["kind"] == kind and r["seq_length"] == length), None)

    def stopped_at(self, kind: str, length: int) -> dict | None:
        """The shorter (or same) length at which ``kind`` ran out of memory or failed, if any."""
        return next(
            (r for r in self.rows if r["kind"] == kind and r["seq_length"] <= length and stops_kind(r)),
            None,
        )

    def last_wall_s(self, kind: str) -> float | None:
        """Wall seconds of the longest length measured for ``kind`` (its process included)."""
        done = [r for r in self.rows if r["kind"] == kind and r.get("wall_s") is not None]
        return max(done, key=lambda r: r["seq_length"])["wall_s"] if done else None

    def record(self, row: dict) -> None:
        """Add a length's row, replacing an earlier try of the same (kind, length)."""
        self.rows = [r for r in self.rows if (r["kind"], r["seq_length"]) != (row["kind"], row["seq_length"])]
        self.rows.append(row)
        self.rows.sort(key=lambda r: (r["seq_length"], r["kind"]))

    def as_json(self) -> dict:
        return {**self.settings, "rows": self.rows}


def load_sweep(path: Path, settings: dict) -> Sweep:
    """The sweep in ``path`` to continue (a new one if there is none). Raises ValueError naming
    the settings that differ from the file's."""
    if not path.exists():
        return Sweep(settings)
    old = json.loads(path.read_text())
    differ = [
        f"{k} {old.get(k)!r} there, {settings[k]!r} here" for k in SETTINGS if old.get(k) != settings[k]
    ]
    if differ:
        raise ValueError(
            f"{path}: holds a sweep with other settings ({'; '.join(differ)}); "
            "continue it with the same ones or write another --out"
        )
    return Sweep(settings, old.get("rows", []))


def describe(row: dict) -> str:
    """One line for a length's result."""
    head = f"{row['kind']} {row['seq_length']}:"
    if row.get("oom"):
        return f"{head} out of memory"
    if row.get("error"):
        return f"{head} error: {' '.join(row['error'].split())[:200]}"
    memory = f", {row['peak_memory_gib']:.1f} GiB" if row.get("peak_memory_gib") is not None else ""
    return (
        f"{head} {row['tokens_per_s']:,.0f} tokens/s, {row['step_s']:.2f} s/step{memory} "
        f"({row['wall_s']:.0f} s with start-up)"
    )


def run_sweep(sweep: Sweep, kinds: list[str], lengths: list[int], deadline: float, measure, save) -> None:
    """Try every (length, kind) not yet settled, shortest lengths first, until ``deadline``
    (time.monotonic()).

    ``measure(kind, length, timeout)`` returns a train_throughput row; ``save(sweep)`` is called
    after every length. A kind stops after its first out-of-memory or error; a length whose
    predicted wall time (twice the kind's previous length's) does not fit in the time left, or
    that is killed at the deadline, is left for the next call."""
    for length in lengths:
        for kind in kinds:
            done = sweep.row(kind, length)
            if done is not None and is_settled(done):
                continue
            stop = sweep.stopped_at(kind, length)
            if stop is not None and stop["seq_length"] < length:
                continue
            left = deadline - time.monotonic()
            previous = sweep.last_wall_s(kind)
            if left <= 0 or (previous is not None and 2 * previous > left):
                print(
                    f"{kind} {length}: left for the next call ({left:.0f} s of the budget left)", flush=True
                )
                continue
            start = time.monotonic()
            row = measure(kind, length, left)
            if row.get("timed_out"):
                print(f"{kind} {length}: killed at the time budget, left for the next call", flush=True)
                continue
            kept = {k: row[k] for k in ROW_KEYS if k in row}
            kept.update(kind=kind, seq_length=length, wall_s=round(time.monotonic() - start, 1))
            sweep.record(kept)
            save(sweep)
            print(describe(kept), flush=True)


def cmd_run(args, parser) -> None:
    """Sweep the lengths of every kind; the JSON is rewritten after each."""
    lengths = sorted(set(args.lengths or doubling_lengths(args.start, args.max_length)))
    if not lengths or lengths[0] <= 0:
        parser.error("the lengths must be positive (--lengths, or --start up to --max-length)")
    options = RunOptions(
        micro_batch=args.mbs,
        recompute=args.recompute,
        max_memory_gib=args.max_memory_gib,
    )
    settings = {
        "scale": args.scale,
        "ffn": "dense",
        "precision": "bf16",
        "micro_batch": args.mbs,
        "recompute": args.recompute,
        "warmup": args.warmup,
        "steps": args.steps,
        "max_memory_gib": args.max_memory_gib,
    }
    out = Path(args.out)
    try:
        sweep = load_sweep(out, settings)
    except ValueError as err:
        parser.error(str(err))

    def measure(kind: str, length: int, timeout: float) -> dict:
        with_length = dataclasses.replace(options, seq_length=length)
        return measure_in_subprocess(
            args.scale, kind, False, "bf16", args.warmup, args.steps, with_length, timeout=timeout
        )

    def save(sweep: Sweep) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, sweep.as_json())

    run_sweep(sweep, args.kinds, lengths, time.monotonic() + args.time_budget, measure, save)
    save(sweep)


def markdown(record: dict) -> str:
    """The sweep as a markdown table: a row per kind, a column per length; each cell tokens/s,
    its ratio to the transformer's at that length, and peak GiB, or OOM."""
    rows = record.get("rows", [])
    lengths = sorted({r["seq_length"] for r in rows})
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    kinds += sorted({r["kind"] for r in rows} - set(kinds))
    index = {(r["kind"], r["seq_length"]): r for r in rows}
    devices = sorted({r["device"] for r in rows if r.get("device")})

    def cell(kind: str, length: int) -> str:
        r = index.get((kind, length))
        if r is None:
            return "-"
        if r.get("oom"):
            return "OOM"
        if r.get("error"):
            return "error"
        base = index.get(("transformer", length))
        ratio = (
            f" ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x)"
            if kind != "transformer" and base and base.get("tokens_per_s")
            else ""
        )
        memory = f", {r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") is not None else ""
        return f"{r['tokens_per_s']:,.0f}{ratio}{memory}"

    lines = [
        f"{record.get('scale')} scale, {record.get('ffn')} FFN, {record.get('precision')}, micro-batch "
        f"{record.get('micro_batch')}, recompute {record.get('recompute')}, warmup "
        f"{record.get('warmup')} + {record.get('steps')} timed steps; "
        f"device: {', '.join(devices) or '-'}. Cells: tokens/s (x the transformer's at that length), "
        "peak GiB; OOM: out of memory.",
        "",
        "| kind | " + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(cell(kind, n) for n in lengths) + " |")
    return "\n".join(lines) + "\n"


def cmd_report(args) -> None:
    """Print the sweep's markdown table (and write it to --markdown)."""
    text = markdown(json.loads(Path(args.input).read_text()))
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text, end="")


def main(argv=None) -> None:
    """Parse the command line and run one subcommand."""
    parser = argparse.ArgumentParser(prog="python3 -m bench.long_context", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="sweep the sequence lengths of every kind")
    run.add_argument("--scale", default="1b", choices=list(SCALES))
    run.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    run.add_argument("--start", type=int, default=8192, help="shortest length; doubled up to --max-length")
    run.add_argument("--max-length", type=int, default=262144)
    run.add_argument("--lengths", type=int, nargs="+", help="these lengths instead of the doubling")
    run.add_argument("--recompute", default="full", choices=["none", "selective", "full"])
    run.add_argument("--mbs", type=int, default=1, help="samples per micro-batch")
    run.add_argument("--warmup", type=int, default=1)
    run.add_argument("--steps", type=int, default=2)
    run.add_argument(
        "--max-memory-gib", type=float, help="cap on each length's memory (train_throughput's flag)"
    )
    run.add_argument(
        "--time-budget", type=float, default=540.0, help="seconds; lengths after it are left for a re-run"
    )
    run.add_argument("--out", required=True, help="the sweep's JSON (continued when it exists)")
    rep = sub.add_parser("report", help="the sweep as a markdown table")
    rep.add_argument("input")
    rep.add_argument("--markdown")
    args = parser.parse_args(argv)
    if args.cmd == "report":
        cmd_report(args)
    else:
        cmd_run(args, run)


if __name__ == "__main__":
    main()
