"""One local run of `cam`'s smoke DAG for the whole test session, shared by the files that
compare their own run with it (tests/test_slurm.py: a SLURM run must equal it;
tests/test_label_only.py: a tags-only run must train the same model). pytest-xdist runs those
files in different worker processes, so the run is made once under a file lock in the folder
the workers share, and read (never changed) by every user.

The run is the smoke preset on its generated toy dataset (`smoke`, kind toy), with
profiles/slurm-local/resources.yaml, to the targets the SLURM test asks for, with `--cores 2`
(the thread count of every job, which a model's bits depend on). Its Snakemake output is kept in
`snakemake.log` (the rules' `threads:` lines are read from it).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_e2e import smoke_config  # tests/ is on sys.path under pytest

REPO = Path(__file__).resolve().parent.parent
#: config `resources` that fit the single-node test cluster (no GPU, a few GB per job)
RESOURCES = REPO / "profiles" / "slurm-local" / "resources.yaml"
METHOD = "cam"
TARGETS = [f"results/smoke/{METHOD}/{f}"
           for f in ("seg_miou.txt", "mask_miou.txt", "seed_miou.txt", "mask_sweep.json")]


def shared_folder(tmp_path_factory, name: str, build) -> Path:
    """A folder `name` made by `build(folder)` once per test session and shared by all
    pytest-xdist workers: the first worker to ask builds it under an exclusive file lock, the
    others wait for the lock and reuse it. A failed build is recorded, so a second worker fails
    at once with the first one's message instead of running it again."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    folder, done, failed = base / name, base / f"{name}.done", base / f"{name}.failed"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if failed.exists():
                pytest.fail(f"the shared {name} run failed in another worker:\n{failed.read_text()}")
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                try:
                    build(folder)
                except BaseException as exc:
                    failed.write_text(str(exc)[-6000:])
                    raise
                done.write_text("")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


def workdir(path: Path, repo_root: Path = REPO) -> Path:
    """A working folder with config.yaml and the smoke config (`smoke.yaml`)."""
    path.mkdir(exist_ok=True)
    shutil.copy(repo_root / "config.yaml", path / "config.yaml")
    (path / "smoke.yaml").write_text(yaml.safe_dump(smoke_config(repo_root)))
    return path


def snakemake_cmd(wd: Path, *flags: str, targets: list[str] = TARGETS) -> list[str]:
    """The smoke workflow on `wd` with the node-sized resources; `flags` before the targets."""
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(wd),
            "--configfile", str(wd / "smoke.yaml"), str(RESOURCES), *flags, "--", *targets]


def _build(folder: Path, env: dict) -> None:
    wd = workdir(folder / "work")
    with (folder / "snakemake.log").open("w") as log:
        done = subprocess.run(snakemake_cmd(wd, "--cores", "2"), cwd=wd, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=900, check=False)
    assert done.returncode == 0, (folder / "snakemake.log").read_text()[-4000:]


def cam_smoke_reference(tmp_path_factory, cli_env) -> Path:
    """The shared run's working folder (results under `results/smoke/cam`, the generated toy
    photos under `results/smoke/data`, Snakemake's output in `../snakemake.log`)."""
    env = dict(cli_env, OMP_WAIT_POLICY="PASSIVE")
    return shared_folder(tmp_path_factory, "cam_smoke_reference", lambda f: _build(f, env)) / "work"
