"""editlab.files.publish_dir: a directory built by several processes at once is published whole,
by whichever finishes first (the embedded model's conversion when two study runs start together)."""

from pathlib import Path

import pytest

from editlab.files import publish_dir


def _complete(path: Path) -> bool:
    return (path / "done").is_file()


def _writer(text: str):
    def write(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "payload").write_text(text)
        (tmp / "done").write_text("")

    return write


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".tmp"))


def test_publishes_the_written_directory_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "models" / "m"
    assert publish_dir(target, _writer("mine"), _complete) == target
    assert (target / "payload").read_text() == "mine"
    assert _leftovers(target.parent) == []


def test_a_process_that_loses_the_race_keeps_the_winners_directory(tmp_path):
    target = tmp_path / "m"

    def write_while_another_process_publishes(tmp: Path) -> None:
        _writer("winner")(tmp_path / "other.tmp")
        (tmp_path / "other.tmp").rename(target)  # the other process's rename lands during our write
        _writer("loser")(tmp)

    publish_dir(target, write_while_another_process_publishes, _complete)
    assert (target / "payload").read_text() == "winner"
    assert _leftovers(tmp_path) == []


def test_an_incomplete_directory_from_before_is_replaced(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "payload").write_text("half")
    publish_dir(target, _writer("mine"), _complete)
    assert (target / "payload").read_text() == "mine" and _complete(target)


def test_a_failed_write_removes_its_temporary_and_leaves_the_target_absent(tmp_path):
    target = tmp_path / "m"

    def write(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "payload").write_text("half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        publish_dir(target, write, _complete)
    assert not target.exists() and _leftovers(tmp_path) == []
