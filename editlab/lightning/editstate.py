"""Edit-state checkpoints: what a run needs to continue after a crash, without the LM itself.

``<run dir>/checkpoints/edit_state.pt`` holds the float64 deltas of the edited matrices (not the
model), the method's state_dict (sequential Σ KKᵀ, templates, any cache it carries across steps),
the RNG states, the data position (steps and edits done) and every result so far. It is written
every ``checkpoint_every`` steps and once after the last step, atomically (temporary file, fsync,
rename): a crash while writing leaves the previous checkpoint intact. Tensors, dicts, lists and
strings only, read back with ``torch.load(weights_only=True)``; the results travel as one JSON
string (exactly what the result files hold).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path

import torch

from editlab.files import save_torch_atomic
from editlab.models.delta import DeltaMismatchError
from editlab.types import EditRequest

EDIT_STATE_VERSION = 1
# Options that may differ between the interrupted run and its resumption (they change neither the
# edits nor the results).
RESUME_FREE_OPTIONS = ("model.checkpoint_every", "model.progress", "model.export")


class EditStateError(RuntimeError):
    """An edit-state checkpoint that cannot be used for this run."""


def edit_state_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "edit_state.pt"


def requests_digest(requests: list[EditRequest]) -> str:
    """Identity of the stream (every field of every request, in order)."""
    blob = json.dumps([asdict(r) for r in requests], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def rng_state() -> dict:
    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_edit_state(path: str | Path, state: dict) -> Path:
    return save_torch_atomic({"version": EDIT_STATE_VERSION, **state}, path)


def load_edit_state(path: str | Path) -> dict:
    path = Path(path)
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated or foreign file: unpickling errors of many kinds
        raise EditStateError(f"{path} is not a readable editlab edit state ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("version") != EDIT_STATE_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise EditStateError(
            f"{path} is not an editlab edit state of version {EDIT_STATE_VERSION} (found version {version!r}); "
            "a Lightning .ckpt cannot resume an editlab run"
        )
    return state


def check_resumable(state: dict, model_id: str, fingerprint: str, dtype: str, method: str, digest: str) -> None:
    """The checkpoint was made by this run: same original weights, dtype, method and stream."""
    wanted = {"model": model_id, "fingerprint": fingerprint, "dtype": dtype, "method": method, "requests": digest}
    diff = {k: (state.get(k), v) for k, v in wanted.items() if state.get(k) != v}
    if diff:
        names = {"requests": "the data (requests and their order)", "fingerprint": "the original weights"}
        what = ", ".join(names.get(k, k) for k in diff)
        raise DeltaMismatchError(
            f"the edit state was made by another run: {what} differ (stored, this run): {diff}; "
            "start over with --overwrite true or use the original settings"
        )


def resume_point(state: dict | None) -> tuple[int, int, bool] | None:
    """Where a run continues: (steps done, edits done, final) of its edit state; None: from the start."""
    if state is None:
        return None
    return int(state["steps_done"]), int(state["edits_done"]), bool(state["final"])


def _describe_point(point: tuple[int, int, bool] | None) -> str:
    if point is None:
        return "found no edit state and starts from the first step"
    steps, edits, final = point
    return f"continues after step {steps} ({edits} edits{', finished' if final else ''})"


def check_same_resume_point(points: list, state_path: str | Path) -> None:
    """Every rank of a multi-process run continues from rank 0's point (``points[r]``: rank r's
    :func:`resume_point`). A node that does not see the run directory would start the stream over
    while the others continue it: the ranks would share out different batches and gather rows of
    different requests into one edit. Called with the same list on every rank: all raise or none."""
    differing = [r for r, point in enumerate(points) if point != points[0]]
    if differing:
        r = differing[0]
        raise EditStateError(
            f"{state_path}: rank 0 {_describe_point(points[0])}, rank {r} {_describe_point(points[r])}; every "
            "process must read the same edit state: put --trainer.default_root_dir on a file system all nodes share"
        )


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted option names whose values differ between two resolved configs (model and data only:
    the trainer, logging and checkpoint options may change on resume)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if not prefix and key not in ("model", "data"):
            continue
        if name in RESUME_FREE_OPTIONS:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
