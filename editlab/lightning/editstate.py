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
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from editlab.errors import UserError
from editlab.files import save_torch_atomic
from editlab.lightning.recorder import RunRecorder
from editlab.models.delta import DeltaMismatchError, apply_weight_deltas, weight_deltas
from editlab.models.fingerprint import model_fingerprint
from editlab.numerics import numerics, numerics_differences
from editlab.rundir import edit_state_path
from editlab.types import EditRequest

EDIT_STATE_VERSION = 1
# Options that may differ between the interrupted run and its resumption (they change neither the
# edits nor the results).
RESUME_FREE_OPTIONS = ("model.checkpoint_every", "model.progress", "model.export", "model.cache_dir", "model.journal")


class EditStateError(UserError, RuntimeError):
    """An edit-state checkpoint that cannot be used for this run."""


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


# -- the edit state of a run, and resuming from it --------------------------------------------------


@dataclass(frozen=True)
class RunIdentity:
    """What makes an edit state this run's: the original weights, dtype, method and stream."""

    model: str
    fingerprint: str  # of the unedited weights
    dtype: str
    method: str  # the method's class name
    requests: str  # requests_digest of the stream


def capture_edit_state(
    run: RunIdentity, recorder: RunRecorder, lm: torch.nn.Module, initial: dict, method, final: bool
) -> dict:
    """Everything a resumed run needs, right after ``recorder.steps_done`` steps (``final``: the
    stream is over, only the final evaluation remains). ``initial``: W_0 of the edited parameters."""
    return {
        "model": run.model,
        "fingerprint": run.fingerprint,
        "dtype": run.dtype,
        "method": run.method,
        "requests": run.requests,
        "steps_done": recorder.steps_done,
        "edits_done": recorder.edits_done,
        "final": final,
        "deltas": weight_deltas(lm, initial),
        # Of the whole edited model: a resumed run checks it got back exactly this model.
        "edited_fingerprint": model_fingerprint(lm),
        "method_state": method.state_dict(),
        "rng": rng_state(),
        # torch version and thread count: a resumed run compares them (the bits depend on them).
        "numerics": numerics(),
        # JSON (what the result files hold): plain strings for the weights_only loader.
        "results": recorder.results_json(),
    }


class Resume:
    """An edit state read for ``--ckpt_path``, and the two moments of a fit that use it:
    :meth:`first_step` (fit start: where the data module starts the stream) and :meth:`restore`
    (after method.setup on the unedited model: weights, method state, records, RNG states)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.state = load_edit_state(self.path)

    @property
    def steps_done(self) -> int:
        return int(self.state["steps_done"])

    @property
    def final(self) -> bool:
        """The stream was over: only the final evaluation and the results remain."""
        return bool(self.state["final"])

    def first_step(self, steps: list[list], edits_per_step: int) -> int:
        """The index of the data module's first step: after the steps done (``steps``: the
        stream's batches), or past the end when only the final evaluation remains."""
        done, edits = self.steps_done, int(self.state["edits_done"])
        if done > len(steps) or sum(len(b) for b in steps[:done]) != edits:
            raise EditStateError(
                f"{self.path}: {done} steps with {edits} edits done do not match this "
                f"data ({len(steps)} steps of up to {edits_per_step} edits)"
            )
        return len(steps) if self.final else done

    def restore(self, run: RunIdentity, lm: torch.nn.Module, initial: dict, method, recorder: RunRecorder) -> None:
        """Continue on the freshly loaded (unedited) model, after method.setup."""
        state = self.state
        check_resumable(state, run.model, run.fingerprint, run.dtype, run.method, run.requests)
        missing = set(initial) ^ set(state["deltas"])
        if missing:
            raise EditStateError(f"{self.path}: edited parameters differ from this method's: {sorted(missing)}")
        method.load_state_dict(state["method_state"])
        apply_weight_deltas(lm, state["deltas"], initial)
        if model_fingerprint(lm) != state["edited_fingerprint"]:
            raise EditStateError(
                f"{self.path}: the restored model differs from the checkpointed one (a parameter outside "
                f"{run.method}.edited_parameters() was changed?)"
            )
        recorder.restore(state["results"], self.steps_done, int(state["edits_done"]))
        set_rng_state(state["rng"])
        changed = numerics_differences(state.get("numerics"), numerics())
        if changed:
            print(
                f"[editlab] warning: resuming with other numerics than the interrupted run ({'; '.join(changed)}): "
                "its results will not be bit-identical to an uninterrupted run's",
                file=sys.stderr,
            )
        print(f"[editlab] resumed from {self.path} after step {self.steps_done}", file=sys.stderr)


def resume_fit(path: str | Path | None, ranks, run_dir: str | Path, datamodule) -> Resume | None:
    """At fit start, before the train dataloader is made: the edit state of ``--ckpt_path``
    (``path``; None: a first run), every rank checked to continue from the same point (``ranks``:
    editlab.distributed.Ranks), and the data module set to start where the stream stopped."""
    resume = None if path is None else Resume(path)
    # Every rank reads the edit state from its own view of the run directory (several machines).
    points = ranks.all_gather_object(resume_point(resume.state if resume is not None else None))
    check_same_resume_point(points, edit_state_path(run_dir))
    if resume is None:
        return None
    if datamodule is None or not hasattr(datamodule, "first_step"):
        raise ValueError("resuming needs an EditDataModule (option data)")
    datamodule.first_step = resume.first_step(datamodule.steps(), datamodule.edits_per_step)
    return resume


def save_run_state(run_dir: str | Path, state: dict) -> Path:
    """Write ``state`` as the run directory's edit state (``--ckpt_path last`` finds it there)."""
    return save_edit_state(edit_state_path(run_dir), state)
