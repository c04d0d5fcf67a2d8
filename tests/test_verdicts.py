"""editlab.verdicts: a claim judged from a study's committed results by the rule fixed beforehand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from editlab.paired import write_records
from editlab.verdicts import Claim, ClaimsError, Outcome, Part, judge, read_claims, verdict, verdict_lines


def run(root: Path, name: str, spec: list[float], fluency: list[float] | None = None, growth=None, sst2=None):
    """A results JSON and case file: case i's neighbourhood success spec[i] (and its fluency)."""
    summary = {"specificity_success": sum(spec) / len(spec)}
    if fluency is not None:
        summary["fluency"] = sum(fluency) / len(fluency)
    record = {
        "summary": summary,
        "weight_norms_end": {} if growth is None else {"weight_norm/l8/rel_l1_growth": growth},
    }
    (root / f"{name}.json").write_text(json.dumps(record))
    cases = []
    for i, value in enumerate(spec):
        post = {"specificity_success": value}
        if fluency is not None and i < len(fluency):
            post["fluency"] = fluency[i]
        cases.append({"case_id": str(i), "post": post})
    write_records(cases, root / f"{name}.cases.jsonl.gz")
    if sst2 is not None:
        examples = [{"case_id": f"sst2/{i}", "task": "sst2", "post": {"correct": c}} for i, c in enumerate(sst2)]
        write_records(examples, root / f"{name}.probes.jsonl.gz")


def test_the_verdict_rule():
    better, same, worse = (Outcome(Part("cases", "m", "b"), s, "") for s in ("better", "same", "worse"))
    kept = Outcome(Part("cases", "m", "b", want="not_worse"), "same", "")
    unjudged = Outcome(Part("cases", "fluency", "b"), "not judged", "")
    assert kept.met and not same.met and not unjudged.met
    assert verdict([better, kept]) == "holds"
    assert verdict([better, same]) == "holds partly" and verdict([better, unjudged]) == "holds partly"
    assert verdict([better, worse]) == "does not hold"  # a part on the wrong side sinks the claim
    assert verdict([same, unjudged]) == "does not hold"  # nothing it asks for is shown


def test_claims_are_judged_from_the_committed_files(tmp_path):
    n = 200
    run(tmp_path, "base", [0.0] * n, fluency=[6.0, 6.0], growth=0.40, sst2=[1] * 50 + [0] * 50)
    # new: every case kept (+1 on each): better beyond doubt; its fluency per case, equal on average
    run(tmp_path, "new", [1.0] * n, fluency=[6.5, 5.5], growth=0.30, sst2=[1] * 50 + [0] * 50)
    claim = Claim(
        "new keeps specificity and holds its norms",
        "new",
        [
            Part("cases", "specificity_success", "base"),
            Part("value", "weight_norm/l8/rel_l1_growth", "base", lower=True),
            Part("probe", "sst2", "base", want="not_worse"),
            Part("cases", "fluency", "base", want="not_worse"),
            Part("cases", "specificity_success", "norewind", optional=True),  # not run: left out
        ],
    )
    result, outcomes, _ = judge(tmp_path, claim)
    assert [o.status for o in outcomes] == ["better", "better", "same", "same"]
    assert result == "holds"
    assert "1.000 vs 0.000, +1.000 [+1.000, +1.000] over 200 cases" in outcomes[0].text
    assert outcomes[1].text == "+30.0% vs +40.0%"
    # the optional baseline once it has run, worse than the claim's run on every case
    run(tmp_path, "norewind", [1.0] * (n // 2) + [0.0] * (n // 2))
    worse = Claim("x", "norewind", [Part("cases", "specificity_success", "new")])
    assert judge(tmp_path, worse)[0] == "does not hold"
    # an older run without per-case fluency: its means are reported, the part is not judged
    run(tmp_path, "old", [1.0] * n, growth=0.5)
    (tmp_path / "old.json").write_text(json.dumps({"summary": {"fluency": 5.9}, "weight_norms_end": {}}))
    result, outcomes, _ = judge(tmp_path, Claim("y", "old", [Part("cases", "fluency", "base")]))
    assert outcomes[0].status == "not judged" and "means 5.900 vs 6.000" in outcomes[0].text
    assert result == "does not hold"
    assert judge(tmp_path, Claim("z", "later", [Part("cases", "fluency", "base")]))[0] == "waits for later"


def test_verdict_lines_and_the_claims_file(tmp_path):
    run(tmp_path, "base", [0.0, 1.0] * 50)
    run(tmp_path, "new", [1.0, 1.0] * 50)
    spec = {
        "claims": [
            {
                "name": "new keeps specificity",
                "run": "new",
                "parts": [{"kind": "cases", "metric": "specificity_success", "against": "base"}],
                "beside": ["new"],
            }
        ]
    }
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump(spec))
    lines = verdict_lines(tmp_path, read_claims(tmp_path / "claims.yaml"))
    assert lines[0].startswith("- **new keeps specificity**: holds. neighbourhood success new vs base: 1.000 vs 0.500")
    assert lines[1].startswith("  - beside new, not judged: neighbourhood success: 1.000 vs 1.000, +0.000")
    spec["claims"][0]["parts"][0]["kind"] = "guess"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(
        ClaimsError, match=r"bad.yaml: claims\[0\] \(new keeps specificity\): parts\[0\]: kind is one of"
    ):
        read_claims(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"claims": [{"name": "x", "run": "y"}]}))
    with pytest.raises(ClaimsError, match=r"claims\[0\] needs a name, a run and parts"):
        read_claims(tmp_path / "bad.yaml")


REPO = Path(__file__).parents[1]


@pytest.mark.parametrize("path", sorted(REPO.glob("studies/*/claims.yaml")), ids=lambda p: p.parent.name)
def test_committed_claims_files_name_runs_of_their_study(path, monkeypatch):
    from editlab.commands.study import read_study

    monkeypatch.chdir(REPO)  # study files name their configs relative to the repository
    studies = [read_study(f.relative_to(REPO)) for f in path.parent.glob("*.yaml") if f.name != "claims.yaml"]
    runs = {r.name for study in studies for r in study.runs}
    for claim in read_claims(path):
        names = {claim.run, *claim.beside, *(p.against for p in claim.parts)}
        assert names <= runs, f"{path}: {claim.name}: {sorted(names - runs)} are no runs of the study"
