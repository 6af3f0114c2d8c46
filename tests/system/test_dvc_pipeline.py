"""The DVC pipeline, for real: ``dvc repro`` up to split on a tiny window in a copy of the repo.

A copy of the working tree's pipeline files (``hap/``, ``expectations/``, ``dvc.yaml``, ``.dvc/config``,
``.dvcignore``) becomes its own git repo with a tiny ``params.yaml``; the real ``dvc`` and ``hap``
commands run in it (``PYTHONPATH`` points ``hap`` at the copy). Targets stop at ``split`` so no
model is trained. DVC operations run one at a time (the repo lock, STACK.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_tiny_params

from hap.core import layout
from hap.core.config import REPO_ROOT, load_config

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
DATE = "2026-11-02"
COPIED = ["hap", "expectations", "dvc.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", "pyproject.toml"]


def _env(repo: Path, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAP") and k != "PYTHONPATH"}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(repo),
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    return env


def _run(repo: Path, tmp: Path, *args: str) -> str:
    res = subprocess.run(
        list(args), cwd=repo, env=_env(repo, tmp), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def dvc(repo: Path, tmp: Path, *args: str) -> str:
    return _run(repo, tmp, str(VENV_BIN / "dvc"), *args)


def git(repo: Path, tmp: Path, *args: str) -> str:
    return _run(repo, tmp, "git", *args)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A repo copy after one ``dvc repro split``; returns (repo, tmp, repro output)."""
    tmp = tmp_path_factory.mktemp("dvc")
    repo = tmp / "repo"
    for rel in COPIED:
        src, dst = REPO_ROOT / rel, repo / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "uncommitted"))
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (repo / ".gitignore").write_text("/data/\n__pycache__/\n")
    write_tiny_params(repo)
    git(repo, tmp, "init", "-q")
    git(repo, tmp, "add", "-A")
    git(repo, tmp, "commit", "-q", "-m", "pipeline copy")
    out = dvc(repo, tmp, "repro", "split")
    return repo, tmp, out


def test_repro_runs_every_stage_up_to_split(pipeline_repo) -> None:
    repo, tmp, out = pipeline_repo
    for stage in ("simulate@2026-11-01", "validate@2026-11-02", "ingest", "split"):
        assert f"Running stage '{stage}'" in out, out
    assert "Running stage 'train'" not in out
    train = repo / "data" / "training" / f"dt={DATE}" / "train"
    assert sorted((train / "difficulty=hard").glob("part-*.parquet"))  # one file per (day, bucket) unit
    assert (repo / "data" / "training" / f"dt={DATE}" / "eval" / "part-0.parquet").exists()
    split_metrics = json.loads(
        (repo / "data" / "metrics" / f"dt={DATE}" / layout.SPLIT_REPORT_FILE).read_text()
    )
    # the eval day is the window's last (split.eval_day: last), whatever later days have landed
    assert split_metrics["eval_day"] == DATE and split_metrics["eval_held_out_day"] is False
    assert split_metrics["rows"] > 0
    assert set(_lock(repo)) >= {"simulate@2026-11-01", "validate@2026-11-03", "ingest", "split"}
    # the ingest stage owns each whole Delta table (its log is shared by every day), not day folders
    assert {o["path"] for o in _lock(repo)["ingest"]["outs"]} == {"data/lake/samples", "data/lake/fullflow"}
    assert (repo / "data" / "lake" / "samples" / "_delta_log").is_dir()
    shown = dvc(repo, tmp, "metrics", "show", "--json")
    assert '"rows"' in shown


def test_second_repro_does_nothing(pipeline_repo) -> None:
    repo, tmp, _ = pipeline_repo
    lock_before = (repo / "dvc.lock").read_text()
    stamp = (repo / "data" / "training" / f"dt={DATE}" / "train" / "_data_version.json").stat().st_mtime_ns
    out = dvc(repo, tmp, "repro", "split")
    assert "Running stage" not in out, out
    assert (repo / "dvc.lock").read_text() == lock_before
    assert (
        repo / "data" / "training" / f"dt={DATE}" / "train" / "_data_version.json"
    ).stat().st_mtime_ns == stamp


def test_split_param_change_reruns_split_only(pipeline_repo) -> None:
    repo, tmp, _ = pipeline_repo
    lock_before = _lock(repo)
    version_before = _run(repo, tmp, str(VENV_BIN / "hap"), "data-version", "--date", DATE).strip()
    write_tiny_params(repo, **{"split.sample_ratio.global_neg": 0.5})
    out = dvc(repo, tmp, "repro", "split")
    assert "Running stage 'split'" in out, out
    assert not any(f"Running stage '{s}" in out for s in ("simulate@", "ingest'", "validate@"))
    lock_after = _lock(repo)
    for name in lock_before:
        if name != "split":
            assert lock_after[name] == lock_before[name], name
    assert lock_after["split"]["outs"] != lock_before["split"]["outs"]
    # back to the original params: the run cache restores the first training set, same version
    write_tiny_params(repo)
    dvc(repo, tmp, "repro", "split")
    assert _run(repo, tmp, str(VENV_BIN / "hap"), "data-version", "--date", DATE).strip() == version_before
    assert _lock(repo)["split"] == lock_before["split"]


def test_push_then_pull_into_a_clean_clone(pipeline_repo) -> None:
    repo, tmp, _ = pipeline_repo
    dvc(repo, tmp, "push")
    git(repo, tmp, "add", "dvc.lock", "params.yaml")
    git(repo, tmp, "commit", "-q", "-m", "lock")
    clone = tmp / "clone"
    _run(tmp, tmp, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "data").exists()
    dvc(clone, tmp, "remote", "modify", "--local", "local", "url", str(repo / "data" / "dvc-remote"))
    dvc(clone, tmp, "pull", "--with-deps", "split")  # train has no outputs yet
    for rel in (f"training/dt={DATE}", "lake/samples", "lake/fullflow", "landing/dt=2026-11-03"):
        assert _files(clone / "data" / rel) == _files(repo / "data" / rel), rel
    assert "Running stage" not in dvc(clone, tmp, "repro", "split")


def test_two_clean_rebuilds_give_the_same_training_set_hash(pipeline_repo, tmp_path: Path) -> None:
    """An independent rebuild through the library (the Prefect path) matches the DVC build."""
    from hap.data.ingest import ingest_day
    from hap.data.split import build_training_set
    from hap.data.validate import validate_day
    from hap.data.versioning import data_version
    from hap.sources.simulator import simulate_day

    repo, tmp, _ = pipeline_repo
    dvc_version = _run(repo, tmp, str(VENV_BIN / "hap"), "data-version", "--date", DATE).strip()
    cfg = load_config(repo / "params.yaml", environ={"HAP_HOME": str(tmp_path / "rebuild")})
    for day in cfg.pipeline.dates:
        simulate_day(cfg, day, progress=False)
        validate_day(cfg, day)
        ingest_day(cfg, day)
    report = build_training_set(cfg, cfg.pipeline.date)
    assert report.data_version == data_version(cfg, cfg.pipeline.date)
    homes = (tmp_path / "rebuild", repo / "data")
    ours, theirs = (_files(home / "training" / f"dt={DATE}") for home in homes)
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    assert report.data_version == dvc_version, f"files that differ: {differ[:8]}"


def test_full_graph_through_evaluate(pipeline_repo) -> None:
    """split -> train -> evaluate with tiny training; a split param change re-runs split and after."""
    repo, tmp, _ = pipeline_repo
    tiny_train = {"train.epochs": 1}
    write_tiny_params(repo, **tiny_train)
    out = dvc(repo, tmp, "repro", "evaluate")
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out, out
    metrics = json.loads((repo / "data" / "metrics" / f"dt={DATE}" / layout.EVAL_FILE).read_text())
    assert "recall@50" in json.dumps(metrics)
    curve = json.loads((repo / "data" / "metrics" / f"dt={DATE}" / "recall_curve.json").read_text())
    assert [row["k"] for row in curve] == sorted(row["k"] for row in curve) and curve
    assert "recall" in dvc(repo, tmp, "plots", "show", "--json")
    assert "Running stage" not in dvc(repo, tmp, "repro", "evaluate")
    # a split param change re-runs split and everything after it, nothing before it
    write_tiny_params(repo, **tiny_train, **{"split.sample_ratio.rank_neg": 0.5})
    # (a dry run cannot show it: downstream stages only change once split's output has)
    out = dvc(repo, tmp, "repro", "evaluate")
    assert "Running stage 'split'" in out or "Stage 'split' is cached" in out, out
    for stage in ("train", "evaluate"):
        assert f"Running stage '{stage}'" in out, out
    assert not any(f"Running stage '{s}" in out for s in ("simulate@", "ingest'", "validate@"))
    write_tiny_params(repo, **tiny_train)


def _changed_stages(repo: Path, tmp: Path) -> set[str]:
    return set(json.loads(dvc(repo, tmp, "status", "--json")))


@pytest.mark.parametrize(
    ("module", "expect", "untouched"),
    [
        ("hap/model/losses.py", {"train", "evaluate"}, {"split", "validate@2026-11-02"}),
        ("hap/data/split.py", {"split", "train", "evaluate"}, {"simulate@2026-11-02"}),
        ("hap/core/schema.py", {"simulate@2026-11-01", "ingest", "split", "train"}, set()),
        ("hap/sources/simulator.py", {"simulate@2026-11-03"}, {"ingest", "train"}),
    ],
)
def test_touching_a_module_marks_the_stages_that_import_it(pipeline_repo, module, expect, untouched) -> None:
    """A code change is a dependency change: ``dvc status`` names every stage that can import it."""
    repo, tmp, _ = pipeline_repo
    write_tiny_params(repo, **{"train.epochs": 1})
    dvc(repo, tmp, "repro", "evaluate")  # a clean, complete graph (a no-op after the test above)
    assert _changed_stages(repo, tmp) == set()
    path = repo / module
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# touched\n")
        changed = _changed_stages(repo, tmp)
        assert expect <= changed, changed
        assert not (untouched & changed), changed
    finally:
        path.write_bytes(original)
    assert _changed_stages(repo, tmp) == set()


def test_dvc_failed_names_dvcs_own_reason(tmp_path: Path) -> None:
    """DVC's ERROR line reaches the message (``--quiet`` once hid it: the reason printed empty)."""
    from hap.data.dvc_repo import DvcFailed, commit_and_push

    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, tmp_path, "init", "--quiet")
    dvc(repo, tmp_path, "init", "--quiet")
    (repo / "dvc.yaml").write_text("stages:\n  a:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    (repo / "out.txt").write_text("hi\n")
    (repo / ".gitignore").write_text("/dvc.lock\n")
    cfg = load_config(overrides={"paths.dvc_remote": str(tmp_path / "remote")})
    with pytest.raises(DvcFailed) as failed:
        commit_and_push(cfg, ["a"], repo)
    message = str(failed.value)
    assert "dvc commit --force a" in message and "is git-ignored" in message, message
