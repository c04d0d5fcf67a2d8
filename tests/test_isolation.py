"""The test harness itself: no test reads or writes the user's editlab cache."""

import os
from pathlib import Path

from editlab.keyed_cache import cache_root
from editlab.models.load import EMBEDDED_DEFAULT


def test_tests_cache_under_a_temporary_root_not_the_users(tmp_path_factory):
    users = [Path.home() / ".cache" / "editlab"]
    root = cache_root()
    assert root == Path(os.environ["EDITLAB_CACHE"])
    assert Path(tmp_path_factory.getbasetemp()) in root.parents
    for real in users:
        assert root.resolve() != real.resolve() and real.resolve() not in root.resolve().parents


def test_the_converted_model_copy_is_the_tests_own(tmp_path_factory):
    # The one directory shared between sessions (the ~20 s SmolLM2 conversion) is not in the user's cache.
    models = (cache_root() / "models" / EMBEDDED_DEFAULT).resolve()
    real = (Path.home() / ".cache" / "editlab").resolve()
    assert real not in models.parents
