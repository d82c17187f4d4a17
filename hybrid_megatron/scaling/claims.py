"""The paper's design claims, checked against comparison tables (``scaling compare``'s
``compare.json``).

Each claim is data: which columns (kinds, or ``<kind>-<variant>`` for ablation variants) it
compares and the order of their final losses that the paper reports. :func:`check_claims` applies
every claim to every matched-budget row that holds all its columns and says, with the losses,
whether this scale agrees. A claim no table can test is reported as not run, so a missing run
shows as missing rather than as agreement.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hybrid_megatron.config.model import Kind
from hybrid_megatron.errors import InputError

AGREES, DISAGREES, NOT_RUN = "agrees", "does not hold at this scale", "not run"


class ClaimsError(InputError, ValueError):
    """A comparison table that cannot be read: the file and what is wrong with it."""


@dataclass(frozen=True)
class Claim:
    """One statement of the paper: ``better`` columns each reach a lower final loss than every
    ``worse`` column (``ordered``: instead, the columns' losses fall in the listed order, best
    first, each no higher than the next)."""

    name: str
    paper: str
    better: tuple[str, ...]
    worse: tuple[str, ...] = ()
    ordered: bool = False

    @property
    def columns(self) -> tuple[str, ...]:
        return self.better + self.worse

    def holds(self, losses: dict[str, float]) -> bool:
        if self.ordered:
            values = [losses[c] for c in self.better]
            return all(a <= b for a, b in zip(values, values[1:], strict=False))
        return max(losses[c] for c in self.better) < min(losses[c] for c in self.worse)


def _moe_claims() -> list[Claim]:
    return [
        Claim(f"MoE helps {kind}", "MoE improves every architecture", (f"{kind}-moe",), (f"{kind}-dense",))
        for kind in typing.get_args(Kind)
    ]


# What ../shared/PAPER.md states, as orders of final validation loss at one matched budget.
PAPER_CLAIMS: tuple[Claim, ...] = (
    Claim(
        "hybrids beat the Transformer",
        "inter and intra reach a lower loss than the Transformer (Table 2)",
        ("inter", "intra"),
        ("transformer",),
    ),
    Claim(
        "hybrids beat Mamba and SWA",
        "inter and intra reach a lower loss than Mamba and SWA (Table 2)",
        ("inter", "intra"),
        ("mamba", "swa"),
    ),
    Claim("intra ahead of inter", "intra 2.512 against inter 2.518 NLL (Table 2)", ("intra",), ("inter",)),
    Claim(
        "inter: more attention is better",
        "ratio 1:1 gives the best quality, then less attention is worse",
        ("inter-1:1-middle", "inter-3:7-middle", "inter-1:5-middle", "inter-1:9-middle"),
        ordered=True,
    ),
    Claim(
        "inter: attention in the middle",
        "the middle of the stack works best for the attention blocks",
        ("inter-1:5-middle",),
        ("inter-1:5-even",),
    ),
    Claim(
        "intra: per-branch norm is essential",
        "normalising each branch before fusion is essential",
        ("intra-rmsnorm-concat",),
        ("intra-none-concat",),
    ),
    Claim(
        "intra: subtract or concat beats add",
        "subtraction or concatenation fuse best; addition is the simple variant",
        ("intra-rmsnorm-subtract",),
        ("intra-rmsnorm-add",),
    ),
    Claim(
        "intra: concat beats add",
        "subtraction or concatenation fuse best; addition is the simple variant",
        ("intra-rmsnorm-concat",),
        ("intra-rmsnorm-add",),
    ),
    *_moe_claims(),
)


@dataclass(frozen=True)
class Finding:
    """One claim at one row of one table (or not run: ``table`` and ``row`` empty)."""

    claim: Claim
    table: str
    row: str
    losses: dict[str, float]
    verdict: str


def read_comparison(path: Path) -> dict:
    """A ``compare.json`` written by ``scaling compare``; raises ClaimsError naming the file."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ClaimsError(f"{path}: not a readable comparison table ({err})") from err
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
        raise ClaimsError(f"{path}: no 'rows' list: is this scaling compare's compare.json?")
    for row in table["rows"]:
        if not isinstance(row, dict) or not isinstance(row.get("losses"), dict) or "label" not in row:
            raise ClaimsError(f"{path}: a row without 'label' and 'losses': {row!r}")
    return table


def check_claims(tables: dict[str, dict], claims: Sequence[Claim] = PAPER_CLAIMS) -> list[Finding]:
    """Every claim at every row (of the named tables) that holds all its columns, in claim order;
    a claim that no row can test gives one Finding with verdict ``not run``."""
    findings = []
    for claim in claims:
        found = False
        for name, table in tables.items():
            for row in table["rows"]:
                losses = row["losses"]
                if all(c in losses for c in claim.columns):
                    picked = {c: float(losses[c]) for c in claim.columns}
                    verdict = AGREES if claim.holds(picked) else DISAGREES
                    findings.append(Finding(claim, name, row["label"], picked, verdict))
                    found = True
        if not found:
            findings.append(Finding(claim, "", "", {}, NOT_RUN))
    return findings


def _losses_text(losses: dict[str, float]) -> str:
    """The columns' losses, lowest first."""
    return ", ".join(f"{c} {v:.4f}" for c, v in sorted(losses.items(), key=lambda kv: kv[1])) or "-"


def format_findings(findings: Sequence[Finding]) -> str:
    """A markdown table: claim, what the paper says, table and budget, the losses (best first),
    the verdict; then the count of claims that agree."""
    lines = [
        "| claim | paper | table | budget | final validation loss (lowest first) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for f in findings:
        cells = [f.claim.name, f.claim.paper, f.table or "-", f.row or "-", _losses_text(f.losses), f.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    tested = [f for f in findings if f.verdict != NOT_RUN]
    agree = sum(f.verdict == AGREES for f in tested)
    lines.append("")
    lines.append(
        f"{agree} of {len(tested)} tested (claim, budget) pairs agree with the paper; "
        f"{len(findings) - len(tested)} claims not run."
    )
    return "\n".join(lines)
