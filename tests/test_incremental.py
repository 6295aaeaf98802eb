"""A job killed midway (SIGKILL to Snakemake and everything it started) leaves no output that
looks complete, and the next invocation redoes only that job and what depends on it.

The victim is `export_cams` of the smoke workflow, killed while its HDF5 store is being
written: the store is the artifact that could pass for finished if it were written in place.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml
from test_e2e import _jobs, smoke_config  # tests/ is on sys.path under pytest

METHOD = "cam"
TARGET = f"results/smoke/{METHOD}/seed_miou.txt"
VICTIM = "export_cams"
DOWNSTREAM = {"fuse_seeds", "eval_seeds"}  # what TARGET needs after the victim
#: more scales than the smoke preset's two, so the export lasts seconds, not a blink: the kill
#: must land while the store is being written
SCALES = [1.0, 0.5, 1.5, 2.0, 2.5, 3.0]


def live_members(pgid: int) -> list[str]:
    """Command lines of the group's processes that are not zombies (PID 1 of a container may
    never reap the orphans of a killed Snakemake)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(cmdline.strip())
    return found


def snakemake_cmd(repo_root: Path, wd: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(repo_root / "Snakefile"), "-d", str(wd),
            "--cores", "2", "--configfile", str(wd / "smoke.yaml"), *flags, "--", TARGET]


@pytest.mark.slow
def test_sigkill_midway_leaves_no_complete_output_and_reruns_only_that_job(tmp_path, repo_root,
                                                                            cli_env):
    started = time.monotonic()
    wd = tmp_path / "wf"
    wd.mkdir()
    shutil.copy(repo_root / "config.yaml", wd / "config.yaml")
    cfg = smoke_config(repo_root)
    cfg["presets"]["smoke"]["export_cams"]["scales"] = SCALES
    (wd / "smoke.yaml").write_text(yaml.safe_dump(cfg))
    base = wd / "results" / "smoke" / METHOD
    store = base / "cams.h5"
    env = dict(cli_env, OMP_WAIT_POLICY="PASSIVE")

    # Output to a file, never an unread pipe: a full pipe blocks Snakemake and the job stalls
    # before it gets anywhere near the point where the test wants to kill it.
    with (tmp_path / "killed.log").open("w") as log:
        # a session of its own, so killpg reaches Snakemake, the job's shell and `wsss`, and
        # nothing else
        proc = subprocess.Popen(snakemake_cmd(repo_root, wd), cwd=wd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            partial: list[Path] = []
            while time.monotonic() < deadline and proc.poll() is None and not partial:
                partial = list(base.glob(".cams.h5.*.tmp")) if base.is_dir() else []
                time.sleep(0.01)
            members = live_members(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    killed_at = time.monotonic()
    text = (tmp_path / "killed.log").read_text()
    assert partial, f"the export never began writing (deadline or end of run):\n{text[-3000:]}"
    assert any("wsss export-cams" in m for m in members), members  # killed while running
    time.sleep(0.5)  # SIGKILL is delivered asynchronously
    assert not live_members(proc.pid), live_members(proc.pid)

    # nothing at the output path: the half-written store only exists under its temporary name
    assert not store.exists()
    assert all(p.name.startswith(".cams.h5.") and p.name.endswith(".tmp") for p in partial)
    assert (base / "classifier" / "model.pt").is_file()  # upstream work is kept

    def snakemake(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(snakemake_cmd(repo_root, wd, *flags), check=False, cwd=wd, env=env,
                              capture_output=True, text=True, timeout=300)

    # The missing store alone makes Snakemake plan the job again: no --rerun-incomplete is
    # needed, because the killed job left no output file for its incomplete marker to flag.
    dry = snakemake("-n")
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert _jobs(dry) == {VICTIM, *DOWNSTREAM}, dry.stdout[-3000:]
    # The killed Snakemake could not release its lock on the working directory; a real run
    # refuses until `--unlock` (a dry run takes no lock).
    locked = snakemake()
    assert locked.returncode != 0 and "cannot be locked" in locked.stdout + locked.stderr
    assert snakemake("--unlock").returncode == 0

    rerun = snakemake()
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-4000:]
    assert sorted(re.findall(r"^localrule (\w+):", out, flags=re.MULTILINE)) == sorted(
        {VICTIM, *DOWNSTREAM}), out[-4000:]
    with h5py.File(store, "r") as f:
        assert f.attrs["complete"]
    assert (base / "seed_miou.txt").is_file()
    assert not list(base.glob(".cams.h5.*.tmp"))  # the re-run removed the killed job's temporary
    now = time.monotonic()
    print(f"\nSIGKILL scenario: {VICTIM} killed midway after {killed_at - started:.1f} s; dry run, "
          f"unlock and the rerun of {len(DOWNSTREAM) + 1} jobs {now - killed_at:.1f} s")
