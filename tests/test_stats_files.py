"""``editlab stats``: compute → export → import into a fresh cache gives bit-identical statistics
that a method then reads without computing; files of another model, changed files, other settings
and a missing directory are refused with one line naming what is wrong."""

import json
import os
from pathlib import Path

import pytest
import torch

from editlab.cli import main
from editlab.commands.stats import ModelUnderStats, compute, export, import_, parse_stats_args
from editlab.editing import stats
from editlab.editing.context_templates import ContextTemplates
from editlab.editing.methods.base import EditContext
from editlab.editing.methods.ft import FT
from editlab.editing.methods.iterative import IterativeEditing
from editlab.editing.methods.memit import MEMIT
from editlab.editing.methods.rome import ROME
from editlab.editing.stats import CovarianceConfig, statistics_cache
from editlab.editing.stats_files import StatsFileError, read_stats_file
from editlab.errors import ConfigError
from editlab.keyed_cache import cache_root
from editlab.models.arch import ModelView
from editlab.models.fingerprint import model_fingerprint
from editlab.models.tiny import save_tiny, tiny_model

LAYERS = [0, 2]


def corpus(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"Sentence {i} is about the city of Paris and its people." for i in range(12)))
    return str(path)


def cov_cfg(tmp_path: Path, **kw) -> CovarianceConfig:
    return CovarianceConfig(corpus=corpus(tmp_path), **{"num_samples": 8, "batch_size": 4, "max_length": 32, **kw})


def under_stats(seed: int = 0, model_id: str = "tiny") -> ModelUnderStats:
    lm, tok = tiny_model("llama", seed=seed)
    return ModelUnderStats(lm, tok, ModelView.of(lm), model_id, model_fingerprint(lm), "float32", "cpu")


def use_cache(monkeypatch, path: Path) -> Path:
    monkeypatch.setenv("EDITLAB_CACHE", str(path))
    return path


def cache_entries(cache: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted((cache / "stats").glob("*.pt"))}


def exported(tmp_path, monkeypatch, model: ModelUnderStats, cfg: CovarianceConfig) -> Path:
    use_cache(monkeypatch, tmp_path / "cache_a")
    compute(model, LAYERS, cfg, statistics_cache(cache_root()))
    export(model, LAYERS, cfg, statistics_cache(cache_root()), tmp_path / "out", "editlab stats export out (test)")
    return tmp_path / "out"


def import_into_cache(model, layers, cfg, out):
    """``editlab stats import`` of the directory ``out`` into the test's cache, without replacing."""
    return import_(model, layers, cfg, statistics_cache(cache_root()), str(out), replace=False, repo_type="model")


def test_export_import_into_a_fresh_cache_is_bit_identical_and_read_without_computing(tmp_path, monkeypatch, capsys):
    model, cfg = under_stats(), cov_cfg(tmp_path)
    out = exported(tmp_path, monkeypatch, model, cfg)
    first = cache_entries(tmp_path / "cache_a")
    assert len(first) == len(LAYERS)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [name.replace(".pt", ".safetensors") for name in first] + ["README.md"]
    )
    readme = (out / "README.md").read_text()
    assert "editlab stats import DIR" in readme and model.fingerprint in readme

    use_cache(monkeypatch, tmp_path / "cache_b")
    import_into_cache(model, LAYERS, cfg, out)
    second = cache_entries(tmp_path / "cache_b")
    assert list(second) == list(first)  # the same keys, hence the same file names
    for name, blob in first.items():
        assert second[name]["key"] == blob["key"] and second[name]["count"] == blob["count"] > 0
        assert second[name]["sum"].dtype == torch.float64 and torch.equal(second[name]["sum"], blob["sum"])
        assert second[name]["made_with"] == blob["made_with"]  # how the imported sum was computed

    # A fit's method now reads them: setup computes nothing (any accumulation would raise here).
    def no_compute(*args, **kwargs):
        raise AssertionError("statistics were computed instead of read from the cache")

    monkeypatch.setattr(stats, "accumulate_second_moments", no_compute)
    method = MEMIT(LAYERS, covariance=cfg, context=ContextTemplates(count=0))
    method.setup(EditContext(model.lm, model.tok, model.view, model.model_id, model.fingerprint, progress=False))
    for layer, key in model.keys(LAYERS, cfg).items():
        blob = first[statistics_cache(cache_root()).path(key).name]
        assert torch.equal(method.cov[layer], blob["sum"] / blob["count"])

    # Importing again: the entries are there and identical, nothing rewritten.
    before = {p.name: p.stat().st_ino for p in (tmp_path / "cache_b" / "stats").glob("*.pt")}
    capsys.readouterr()
    import_into_cache(model, LAYERS, cfg, out)
    assert capsys.readouterr().out.count("identical") == len(LAYERS)
    assert {p.name: p.stat().st_ino for p in (tmp_path / "cache_b" / "stats").glob("*.pt")} == before


def test_compute_skips_what_the_cache_holds(tmp_path, monkeypatch, capsys):
    model, cfg = under_stats(), cov_cfg(tmp_path)
    use_cache(monkeypatch, tmp_path / "cache")
    compute(model, [0], cfg, statistics_cache(cache_root()))
    capsys.readouterr()
    compute(model, LAYERS, cfg, statistics_cache(cache_root()))
    out = capsys.readouterr().out
    assert "layer 0 (model.layers.0.mlp.down_proj): already in the cache, skipped" in out
    assert "layer 2 (model.layers.2.mlp.down_proj): computed" in out and "tokens/s" in out
    assert len(cache_entries(tmp_path / "cache")) == 2


def test_a_file_of_another_model_is_refused_naming_both(tmp_path, monkeypatch):
    cfg = cov_cfg(tmp_path)
    out = exported(tmp_path, monkeypatch, under_stats(seed=0, model_id="tiny-a"), cfg)
    other = under_stats(seed=1, model_id="tiny-b")
    use_cache(monkeypatch, tmp_path / "cache_b")
    with pytest.raises(StatsFileError) as err:
        import_into_cache(other, LAYERS, cfg, out)
    message = str(err.value)
    assert "\n" not in message
    assert "'tiny-a'" in message and "'tiny-b'" in message and other.fingerprint in message
    assert not (tmp_path / "cache_b" / "stats").exists()  # refused before anything was written


def test_another_lm_dtype_is_refused(tmp_path, monkeypatch):
    cfg = cov_cfg(tmp_path)
    out = exported(tmp_path, monkeypatch, under_stats(), cfg)
    bf16 = under_stats()
    bf16 = ModelUnderStats(bf16.lm, bf16.tok, bf16.view, "tiny", bf16.fingerprint, "bfloat16", "cpu")
    with pytest.raises(StatsFileError, match="in float32 cannot be imported for the model in bfloat16"):
        import_into_cache(bf16, LAYERS, cfg, out)


def test_other_settings_are_refused_naming_the_difference(tmp_path, monkeypatch):
    model, cfg = under_stats(), cov_cfg(tmp_path)
    out = exported(tmp_path, monkeypatch, model, cfg)
    use_cache(monkeypatch, tmp_path / "cache_b")
    with pytest.raises(StatsFileError, match="num_samples: file 8, this config 6"):
        import_into_cache(model, LAYERS, cov_cfg(tmp_path, num_samples=6), out)
    with pytest.raises(StatsFileError, match=r"layer 1 \(model.layers.1.mlp.down_proj\)"):
        import_into_cache(model, [1], cfg, out)
    # A subset of the exported layers is fine; the other file is named as not imported.
    import_into_cache(model, [2], cfg, out)
    assert [p.name.startswith("mom2_l2_") for p in (tmp_path / "cache_b" / "stats").glob("*.pt")] == [True]


def rewrite(path: Path, tensors=None, **metadata_changes) -> None:
    """Rewrite an exported file with changed metadata or tensors, keeping its old digest."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, old = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors or old, str(path), metadata={**meta, **metadata_changes})


def test_an_edited_or_damaged_file_is_refused(tmp_path, monkeypatch):
    model, cfg = under_stats(), cov_cfg(tmp_path)
    out = exported(tmp_path, monkeypatch, model, cfg)
    files = sorted(out.glob("*.safetensors"))
    key = read_stats_file(files[0]).key
    # A hand-edited key (here: another sample count) no longer matches the digest.
    rewrite(files[0], key=json.dumps({**key, "num_samples": 6}, sort_keys=True))
    use_cache(monkeypatch, tmp_path / "cache_b")
    with pytest.raises(StatsFileError, match="changed after export"):
        import_into_cache(model, LAYERS, cov_cfg(tmp_path, num_samples=6), out)
    # One flipped bit in the tensors too.
    sum_ = read_stats_file(files[1]).moment.sum.clone()
    sum_.view(torch.int64)[0, 0] ^= 1
    rewrite(files[1], tensors={"sum": sum_, "count": torch.tensor(read_stats_file(files[1]).moment.count)})
    with pytest.raises(StatsFileError, match=f"{files[1].name}: its metadata or tensors were changed"):
        read_stats_file(files[1])
    files[1].write_bytes(files[1].read_bytes()[:100])  # truncated
    with pytest.raises(StatsFileError, match="not a readable safetensors file"):
        read_stats_file(files[1])
    assert not (tmp_path / "cache_b" / "stats").exists()


def test_export_needs_the_statistics_in_the_cache(tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "empty")
    with pytest.raises(StatsFileError, match="run editlab stats compute with the same options first"):
        export(under_stats(), LAYERS, cov_cfg(tmp_path), statistics_cache(cache_root()), tmp_path / "out", "x")
    assert not (tmp_path / "out").exists()


def test_which_methods_read_statistics(tmp_path):
    cov = cov_cfg(tmp_path)
    memit = MEMIT([1, 2], covariance=cov)
    assert memit.covariance_statistics() == ([1, 2], cov)
    assert IterativeEditing(memit).covariance_statistics() == ([1, 2], cov)
    assert ROME(layer=1, covariance=cov).covariance_statistics() == ([1], cov)
    assert ROME(layer=1, mom2_adjustment=False).covariance_statistics() is None
    assert FT(layer=1).covariance_statistics() is None


def test_stats_arguments():
    args = parse_stats_args(["import", "some/dir", "--config", "c.yaml", "--replace", "true", "--threads", "1"])
    assert (args.action, args.target, args.replace, args.fit_args) == (
        "import",
        "some/dir",
        True,
        ["--config", "c.yaml", "--threads", "1"],
    )
    assert parse_stats_args(["--config", "c.yaml"]).action == "compute"
    with pytest.raises(ConfigError, match="editlab stats export needs a directory"):
        parse_stats_args(["export", "--config", "c.yaml"])
    with pytest.raises(ConfigError, match="--replace is for editlab stats import"):
        parse_stats_args(["compute", "--replace=true"])


def cli_options(tmp_path: Path, model_dir: Path) -> list[str]:
    return [
        "--model.model", str(model_dir),
        "--model.method", "editlab.editing.methods.memit.MEMIT",
        "--model.method.layers", "[0, 1]",
        "--model.method.covariance.corpus", corpus(tmp_path),
        "--model.method.covariance.num_samples", "8",
        "--threads", "1",
    ]  # fmt: skip


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_the_cli_round_trip_and_its_one_line_errors(tmp_path, monkeypatch, capsys):
    model_dir = save_tiny(tmp_path / "tiny", "gpt2")
    options = cli_options(tmp_path, model_dir)
    use_cache(monkeypatch, tmp_path / "cache_a")
    assert run_main(["stats", *options]) == 0
    assert run_main(["stats", "export", str(tmp_path / "out"), *options]) == 0
    assert "editlab stats export" in (tmp_path / "out" / "README.md").read_text()
    use_cache(monkeypatch, tmp_path / "cache_b")
    capsys.readouterr()
    assert run_main(["stats", "import", str(tmp_path / "out"), *options]) == 0
    assert capsys.readouterr().out.count("imported into") == 2
    a, b = cache_entries(tmp_path / "cache_a"), cache_entries(tmp_path / "cache_b")
    assert list(a) == list(b) and all(torch.equal(a[n]["sum"], b[n]["sum"]) for n in a)

    assert run_main(["stats", "import", str(tmp_path / "missing"), *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"editlab: error: statistics directory {tmp_path / 'missing'} does not exist"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_main(["stats", "import", "owner/stats", *options]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "editlab: error: statistics directory owner/stats does not exist, and HF_HUB_OFFLINE is set: "
        "not looked up on the hub"
    ]
    ft = [*options[:2], "--model.method", "editlab.editing.methods.ft.FT", "--model.method.layer", "0"]
    assert run_main(["stats", *ft]) == 2
    assert "method FT uses no covariance statistics" in capsys.readouterr().err


def inodes(cache: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (cache / "stats").glob("*.pt")}


@pytest.mark.slow
def test_a_fit_after_import_into_a_fresh_cache_reads_the_imported_statistics(tmp_path):
    """Subprocesses, as a user runs them: stats compute, export, import into a fresh cache, then
    editlab fit with that cache writes no statistics (a computed entry is always saved)."""
    import subprocess
    import sys

    from helpers import REPO, SHARED_DATA

    model_dir = save_tiny(tmp_path / "tiny", "gpt2")
    options = cli_options(tmp_path, model_dir)

    def editlab(cache: str, *argv: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "EDITLAB_CACHE": str(tmp_path / cache)}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        proc = subprocess.run(
            [sys.executable, "-m", "editlab.cli", *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    computed = editlab("cache_a", "stats", "compute", *options)
    assert "2 layers computed from 8 texts" in computed.stdout and "tokens/s" in computed.stdout
    assert "editlab: covariance 8/8 texts" in computed.stderr  # off a terminal: plain lines
    editlab("cache_a", "stats", "export", "out", *options)
    editlab("cache_b", "stats", "import", "out", *options)
    imported = inodes(tmp_path / "cache_b")
    assert len(imported) == 2
    fit = [
        *options,
        "--model.progress", "false",
        "--model.method.targets.steps", "2",
        "--model.method.context.count", "1",
        "--model.method.context.length", "3",
        "--model.evaluation.max_new_tokens", "4",
        "--data.path", str(SHARED_DATA / "multi_counterfact.json.gz"),
        "--data.num_edits", "2",
        "--data.edits_per_step", "2",
        "--trainer.default_root_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    editlab("cache_b", "fit", *fit)
    assert (tmp_path / "run" / "summary.json").is_file()
    assert inodes(tmp_path / "cache_b") == imported  # read, not computed and saved again
    a, b = cache_entries(tmp_path / "cache_a"), cache_entries(tmp_path / "cache_b")
    assert list(a) == list(b) and all(torch.equal(a[n]["sum"], b[n]["sum"]) for n in a)
