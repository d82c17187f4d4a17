"""The paper's design claims (hybrid_megatron/scaling/claims.py) against comparison tables:
each order of losses judged per matched budget, untested claims reported as not run, and an
unreadable table refused with its path."""

from __future__ import annotations

import json

import pytest

from hybrid_megatron.scaling.claims import (
    AGREES,
    DISAGREES,
    NOT_RUN,
    PAPER_CLAIMS,
    ClaimsError,
    check_claims,
    read_comparison,
)


def _table(*rows: tuple[str, dict[str, float]]) -> dict:
    return {"match": "F", "rows": [{"label": label, "losses": losses} for label, losses in rows]}


def _verdicts(findings, name: str) -> list[tuple[str, str, str]]:
    return [(f.table, f.row, f.verdict) for f in findings if f.claim.name == name]


TABLES = {
    "main": _table(
        ("2.5e15", {"transformer": 3.0, "swa": 2.95, "mamba": 2.97, "inter": 2.90, "intra": 2.88}),
        ("7.5e15", {"transformer": 2.60, "swa": 2.55, "mamba": 2.50, "inter": 2.52, "intra": 2.49}),
    ),
    "inter": _table(
        (
            "7.5e15",
            {
                "inter-1:1-middle": 2.40,
                "inter-3:7-middle": 2.41,
                "inter-1:5-middle": 2.45,
                "inter-1:9-middle": 2.44,
                "inter-1:5-even": 2.47,
            },
        )
    ),
    "intra": _table(
        (
            "7.5e15",
            {
                "intra-rmsnorm-concat": 2.50,
                "intra-none-concat": 2.49,
                "intra-rmsnorm-add": 2.52,
                "intra-rmsnorm-subtract": 2.51,
            },
        )
    ),
    "moe": _table(("7.5e15", {"mamba-dense": 2.6, "mamba-moe": 2.5, "inter-dense": 2.5, "inter-moe": 2.55})),
}


def test_each_claim_is_judged_at_every_budget_that_holds_its_columns():
    findings = check_claims(TABLES)
    assert _verdicts(findings, "hybrids beat the Transformer") == [
        ("main", "2.5e15", AGREES),
        ("main", "7.5e15", AGREES),
    ]
    # at 7.5e15 Mamba (2.50) beats inter (2.52)
    assert _verdicts(findings, "hybrids beat Mamba and SWA") == [
        ("main", "2.5e15", AGREES),
        ("main", "7.5e15", DISAGREES),
    ]
    assert _verdicts(findings, "intra ahead of inter")[1] == ("main", "7.5e15", AGREES)
    # 1:9 (2.44) below 1:5 (2.45): the order breaks once
    assert _verdicts(findings, "inter: more attention is better") == [("inter", "7.5e15", DISAGREES)]
    assert _verdicts(findings, "inter: attention in the middle") == [("inter", "7.5e15", AGREES)]
    assert _verdicts(findings, "intra: per-branch norm is essential") == [("intra", "7.5e15", DISAGREES)]
    assert _verdicts(findings, "intra: subtract or concat beats add") == [("intra", "7.5e15", AGREES)]
    assert _verdicts(findings, "MoE helps mamba") == [("moe", "7.5e15", AGREES)]
    assert _verdicts(findings, "MoE helps inter") == [("moe", "7.5e15", DISAGREES)]
    assert _verdicts(findings, "MoE helps swa") == [("", "", NOT_RUN)]
    # every claim appears, in the paper's order
    names = list(dict.fromkeys(f.claim.name for f in findings))
    assert names == [c.name for c in PAPER_CLAIMS]


def test_an_ordered_claim_allows_ties_and_a_set_claim_does_not():
    ratio = next(c for c in PAPER_CLAIMS if c.ordered)
    tied = dict.fromkeys(ratio.columns, 2.5)
    assert ratio.holds(tied)
    middle = next(c for c in PAPER_CLAIMS if c.name == "inter: attention in the middle")
    assert not middle.holds({"inter-1:5-middle": 2.5, "inter-1:5-even": 2.5})


def test_a_table_that_is_not_a_comparison_is_refused_with_its_path(tmp_path):
    bad = tmp_path / "compare.json"
    bad.write_text("{not json")
    with pytest.raises(ClaimsError, match=f"{bad}: not a readable comparison table"):
        read_comparison(bad)
    bad.write_text(json.dumps({"fits": []}))
    with pytest.raises(ClaimsError, match="no 'rows' list"):
        read_comparison(bad)
    bad.write_text(json.dumps({"rows": [{"label": "1e15"}]}))
    with pytest.raises(ClaimsError, match="a row without 'label' and 'losses'"):
        read_comparison(bad)


def test_the_command_exits_2_naming_an_unreadable_table(tmp_path, capsys):
    from hybrid_megatron.scaling.__main__ import main

    missing = tmp_path / "nowhere" / "compare.json"
    assert main(["claims", str(missing)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {missing}: not a readable comparison table")


def test_two_tables_of_one_group_are_both_judged(tmp_path, capsys):
    from hybrid_megatron.scaling.__main__ import main

    paths = []
    for name, losses in (
        ("a", {"transformer": 3.0, "inter": 2.9, "intra": 2.8}),
        ("b", {"transformer": 2.0, "inter": 2.1, "intra": 2.2}),
    ):
        path = tmp_path / name / "compare.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"group": "study", **_table(("1e15", losses))}))
        paths.append(str(path))
    assert main(["claims", *paths]) == 0
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| hybrids beat the Transformer")
    ]
    assert [row.split(" | ")[2] for row in rows] == ["study", f"study ({paths[1]})"]
    assert rows[0].endswith("| agrees |") and rows[1].endswith("| does not hold at this scale |")
