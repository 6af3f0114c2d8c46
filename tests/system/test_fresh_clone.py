"""The README's promise, checked as a new user meets it: a fresh ``git clone`` of HEAD, ``make run``
there (it creates its own virtualenv), then ``dvc repro`` twice, the second re-running nothing.

The clone gets a tiny ``params.yaml`` (the conftest's tiny world and tiny model), written as a user
would edit it, so ``make run``, DVC's params and the ``hap`` commands of the stages all read the
same values. Nothing of this checkout is shared but git's objects and uv's package cache, so a
missing install step or a file that git ignores but the job needs fails here (``dvc.lock`` once
was: DVC refuses to write an ignored lock, and every backfilled day failed).

The same clone then checks a failing day as the user sees it: a corrupted landing file prints one
paragraph naming the day, the step and the reason, no traceback, and exits non-zero.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_FLOW_RUN, write_tiny_params

from hap.core.config import REPO_ROOT

pytestmark = pytest.mark.slow

LAST_DAY = "2026-11-04"  # the tiny world simulates 2026-11-01..04; pipeline.date is 2026-11-02
MAX_CONSOLE_LINES = 80


def _env(tmp: Path) -> dict[str, str]:
    """A user's shell: no project variables, this checkout's virtualenv off the PATH."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env = {
        k: v
        for k, v in os.environ.items()
        # MAKE*: under `make test` the outer make's level would make the inner one say "Entering directory"
        if not k.startswith(("HAP", "PREFECT_", "MLFLOW_", "VIRTUAL_ENV", "PYTHONPATH", "MAKE", "MFLAGS"))
    }
    env.update(
        PATH=path,
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",  # a new database on 2 busy cores
        DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
    )
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("fresh")
    repo = tmp / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(repo)], check=True, timeout=120)
    write_tiny_params(repo, **TINY_FLOW_RUN)
    return repo, _env(tmp)


@pytest.fixture(scope="module")
def make_run(clone: tuple[Path, dict[str, str]]) -> subprocess.CompletedProcess:
    repo, env = clone
    return _run(["make", "run"], repo, env, timeout=1200)


def test_make_run_on_a_fresh_clone_reads_like_a_report(make_run: subprocess.CompletedProcess) -> None:
    out = make_run.stdout + make_run.stderr
    assert make_run.returncode == 0, out[-4000:]
    lines = make_run.stdout.splitlines()
    run_lines = lines[next(i for i, line in enumerate(lines) if line.startswith("full log: ")) :]
    assert all(line.startswith("installing") for line in lines[: len(lines) - len(run_lines)]), lines[:5]
    assert len(run_lines) <= MAX_CONSOLE_LINES, "\n".join(run_lines)
    for noise in ("Traceback", "WARNING", "Downloading artifacts", "INFO", "it/s]", "Finished in state"):
        assert noise not in out, f"{noise!r} reached the console:\n{out[-3000:]}"
    assert make_run.stderr.strip() == "", make_run.stderr[-2000:]
    steps = {(line.split()[0], line.split()[1]) for line in run_lines if line[:4] == "2026"}
    for step in ("validate", "ingest", "split", "train", "evaluate", "register", "gate", "monitor"):
        assert ("2026-11-02", step) in steps, f"no {step} line for 2026-11-02:\n" + "\n".join(run_lines)
    assert any(line.startswith("== summary") for line in run_lines)
    log = Path(run_lines[0].removeprefix("full log: "))
    assert "Finished in state" in log.read_text(), "the full log lacks Prefect's records"


def test_dvc_repro_after_make_run_then_nothing_to_rerun(
    clone: tuple[Path, dict[str, str]], make_run: subprocess.CompletedProcess
) -> None:
    assert make_run.returncode == 0
    repo, env = clone
    env = {**env, "PATH": f"{repo / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"}
    first = _run(["dvc", "repro"], repo, env, timeout=600)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    second = _run(["dvc", "repro"], repo, env, timeout=300)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "Data and pipelines are up to date" in second.stdout, second.stdout[-3000:]
    assert "Running stage" not in second.stdout, second.stdout[-3000:]
    status = _run(["git", "status", "--porcelain"], repo, env, timeout=60).stdout.splitlines()
    assert "?? dvc.lock" in status, status  # DVC's record, neither ignored nor committed (docs/operations.md)


REGISTERED_DATA_VERSIONS = """
import json
from hap.core.config import load_config
from hap.registry.listing import list_models
print(json.dumps({r.date: r.data_version for r in list_models(load_config())}))
"""


def test_dvc_repro_rebuilds_the_training_set_its_model_was_trained_on(
    clone: tuple[Path, dict[str, str]], make_run: subprocess.CompletedProcess
) -> None:
    """Later days have landed since the flow trained ``pipeline.date``'s model; a forced rebuild
    of that day's split still gives the data version the registered model carries."""
    import json

    import yaml

    assert make_run.returncode == 0
    repo, env = clone
    env = {**env, "PATH": f"{repo / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"}
    date = yaml.safe_load((repo / "params.yaml").read_text())["pipeline"]["date"]
    assert (repo / "data" / "validation" / f"dt={LAST_DAY}").is_dir()  # days after it are in
    rebuilt = _run(["dvc", "repro", "--force", "--single-item", "split"], repo, env, timeout=600)
    assert rebuilt.returncode == 0 and "Running stage 'split'" in rebuilt.stdout, rebuilt.stdout[-3000:]
    version = _run(["hap", "data-version", "--date", date], repo, env, timeout=120)
    registry = _run(["python", "-c", REGISTERED_DATA_VERSIONS], repo, env, timeout=120)
    assert registry.returncode == 0, registry.stderr[-2000:]
    registered = json.loads(registry.stdout.strip().splitlines()[-1])
    assert registered.get(date) and version.stdout.strip() == registered[date], (version.stdout, registered)


def test_a_corrupted_landing_file_prints_one_paragraph(
    clone: tuple[Path, dict[str, str]], make_run: subprocess.CompletedProcess
) -> None:
    assert make_run.returncode == 0
    repo, env = clone
    landing = repo / "data" / "landing" / f"dt={LAST_DAY}" / "ranking.parquet"
    landing.write_bytes(landing.read_bytes()[:2048])
    res = _run([str(repo / ".venv" / "bin" / "hap"), "run", "--date", LAST_DAY], repo, env, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "Traceback" not in out and "WARNING" not in out, out
    paragraphs = [p for p in res.stdout.split("\n\n") if p.startswith(LAST_DAY) and " failed at " in p]
    assert len(paragraphs) == 1, out
    paragraph = paragraphs[0]
    assert f"{LAST_DAY} failed at validate" in paragraph and "ranking.parquet" in paragraph, paragraph
    assert "quarantine" in paragraph and f"hap run --date {LAST_DAY}" in paragraph, paragraph
    assert (repo / "data" / "quarantine" / f"dt={LAST_DAY}").is_dir()
