"""The package's layout as the README's Development section draws it: which room may import which.
Read from the code's own imports (module level and inside functions), so a new arrow that runs
up a floor, or a circle between rooms, fails here with the file and the import."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

# The bottom floor imports no other room of editlab.
BOTTOM = {"types", "numerics", "console", "rundir", "errors", "distributed", "memory"}
# room -> the rooms it may import besides the bottom floor (a room always imports itself).
MAY_IMPORT = {
    **{room: set() for room in BOTTOM},
    "files": set(),
    "runlock": set(),
    "keyed_cache": {"files"},
    "data": set(),
    "models": {"files", "keyed_cache"},
    "metrics": {"data", "models", "keyed_cache"},
    "editing": {"data", "models", "files", "keyed_cache"},
    "evaluation": {"data", "models", "metrics", "keyed_cache"},
    "plan": {"editing", "models"},
    "report": set(),
    "paired": {"files", "report"},
    "verdicts": {"paired"},
    "lightning": {"data", "models", "metrics", "editing", "evaluation", "plan", "report"}
    | {"files", "runlock", "keyed_cache"},
    "commands": {"data", "models", "metrics", "editing", "evaluation", "plan", "report", "paired"}
    | {"files", "runlock", "keyed_cache", "lightning"},
    "cli": {"commands", "lightning", "report"},
}


def room_of(path: Path) -> str:
    return path.relative_to(REPO / "editlab").with_suffix("").parts[0]


def imported_rooms(path: Path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found += [(n.split(".")[1], node.lineno) for n in names if n.startswith("editlab.")]
        if isinstance(node, ast.ImportFrom) and node.module == "editlab":  # from editlab import rundir
            found += [(a.name, node.lineno) for a in node.names]
    return found


def test_every_room_imports_only_the_rooms_below_it():
    files = sorted((REPO / "editlab").rglob("*.py"))
    rooms = {room_of(f) for f in files if room_of(f) != "__init__"}
    assert rooms == set(MAY_IMPORT), f"rooms without a rule or rules without a room: {rooms ^ set(MAY_IMPORT)}"
    wrong = []
    for path in files:
        room = room_of(path)
        allowed = MAY_IMPORT.get(room, set()) | {room} | (BOTTOM if room not in BOTTOM else set())
        wrong += [f"{path.relative_to(REPO)}:{line} imports editlab.{other}" for other, line in imported_rooms(path)
                  if other not in allowed]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_the_rule_table_has_no_circle():
    # Each room's allowed rooms, followed transitively, never lead back to it.
    def reach(room: str, seen: set[str]) -> set[str]:
        for other in MAY_IMPORT[room] | (BOTTOM if room not in BOTTOM else set()):
            if other not in seen:
                seen.add(other)
                reach(other, seen)
        return seen

    assert [room for room in MAY_IMPORT if room in reach(room, set())] == []
