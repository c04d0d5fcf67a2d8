"""Every committed study file parses, and each of its runs resolves and builds as `editlab fit`
would build it: a typo in a study's options fails here, not hours into a study."""

import pytest
from test_configs import instantiate, resolved

from editlab.commands.study import read_study, run_command
from editlab.editing.methods.base import EditMethod

from helpers import REPO

CLAIMS = "claims.yaml"  # editlab.verdicts' claims beside a study: not a study file
STUDY_FILES = sorted(p for p in (REPO / "studies").glob("*/*.yaml") if p.name != CLAIMS)
RUNS = [(path, run) for path in STUDY_FILES for run in read_study(path.relative_to(REPO)).runs]


def test_there_are_study_files():
    assert {"lifelong_p1/study.yaml", "lifelong_p1/extra.yaml"} <= {
        str(p.relative_to(REPO / "studies")) for p in STUDY_FILES
    }


@pytest.mark.parametrize(("path", "run"), RUNS, ids=[f"{p.parent.name}/{p.stem}:{r.name}" for p, r in RUNS])
def test_every_study_run_resolves_and_builds(path, run, monkeypatch):
    monkeypatch.chdir(REPO)  # study files name configs and data relative to the repository
    study = read_study(path.relative_to(REPO))
    command = run_command(study, run)
    assert command[:2] == ["editlab", "fit"]
    printed = resolved(command[2:])
    module, data = instantiate(printed)
    assert isinstance(module.method, EditMethod)
    assert printed["trainer"]["default_root_dir"] == str(study.runs_dir / run.name)
    option = {command[i]: command[i + 1] for i in range(2, len(command) - 1) if command[i].startswith("--data.")}
    assert str(data.num_edits) == option.get("--data.num_edits", str(data.num_edits))


def study_data(path) -> dict[str, tuple]:
    """Each run's resolved data options (path, records, edits per step, offset, seed) of a study file."""
    study = read_study(path.relative_to(REPO))
    out = {}
    for run in study.runs:
        data = resolved(run_command(study, run)[2:])["data"]
        out[run.name] = tuple(data.get(k) for k in ("path", "num_edits", "edits_per_step", "offset", "seed"))
    return out


PROTOCOLS = sorted(p.parent for p in STUDY_FILES if p.parent.name.startswith("lifelong_"))


@pytest.mark.parametrize("directory", sorted(set(PROTOCOLS)), ids=lambda d: d.name)
def test_the_runs_of_a_protocol_edit_the_same_records(directory, monkeypatch):
    # A lifelong protocol compares methods on one slice of one data set (its study and extra
    # files alike): a run whose config brings another default data set (the EAC configs load zsRE,
    # as the EAC paper evaluates) must name the protocol's. (The parity studies hold several tables.)
    monkeypatch.chdir(REPO)
    runs = {name: data for path in STUDY_FILES if path.parent == directory for name, data in study_data(path).items()}
    assert len(set(runs.values())) == 1, "\n".join(f"{name}: {data}" for name, data in runs.items())


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shared_pre_names_a_run_of_the_same_results_that_evaluates_the_unedited_model(path, monkeypatch):
    monkeypatch.chdir(REPO)
    study = read_study(path.relative_to(REPO))
    skipping = [run.name for run in study.runs if pre_skipped(run.args)]
    if study.shared_pre is None:
        return
    siblings = [read_study(p.relative_to(REPO)) for p in STUDY_FILES]
    carriers = [run for s in siblings if s.out == study.out for run in s.runs if run.name == study.shared_pre]
    assert len(carriers) == 1, f"{path}: shared_pre {study.shared_pre} is no run with out {study.out}"
    assert not pre_skipped(carriers[0].args), f"{study.shared_pre} skips the pre-edit evaluation it should share"
    assert skipping, f"{path}: shared_pre set, but every run evaluates the unedited model itself"


def pre_skipped(args: list[str]) -> bool:
    return any(a == "--model.evaluation.pre" and b == "false" for a, b in zip(args, args[1:], strict=False))
