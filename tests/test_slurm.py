"""The smoke DAG of one method on a real single-node SLURM (`scripts/slurm_local.py`) with
`--executor slurm` and `profiles/slurm-local`: every rule runs as a SLURM job, and the results
equal those of a local run of the same config.

Needs root, a writable /etc and apt-get (or SLURM already installed); skipped otherwise.
`pytest -s tests/test_slurm.py` prints the number of SLURM jobs and the wall time, which are
also written to `slurm_run.json` in the test's tmp dir.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
# tests/ is on sys.path under pytest; cam (the cheapest method: the DAG is the same shape for
# every method) on the smoke preset, with the node-sized resources
from smoke_reference import METHOD, RESOURCES, cam_smoke_reference, snakemake_cmd, workdir

from wsss_core.io import read_label_png

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "slurm_local.py"
PROFILE = REPO / "profiles" / "slurm-local"
#: what the SLURM run may take before `timeout` interrupts it (165 s on a quiet 2-core
#: machine: 15 jobs, each starting Snakemake twice, and the executor's status polls)
SLURM_LIMIT_S = 600
#: rules whose jobs must appear: the whole DAG of one method
RULES = {"make_toy", "dataset_index", "train_classifier", "export_cams", "fuse_seeds", "eval_seeds",
         "ir_labels", "train_irn", "propagate", "make_masks", "sweep_masks", "eval_masks",
         "train_seg", "eval_seg"}
#: jobs per rule: one each, but the dataset index is built in two parts (train, val)
JOBS = Counter({rule: 2 if rule == "dataset_index" else 1 for rule in RULES})
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root"
    if not os.access("/etc", os.W_OK):
        return "the local SLURM cluster needs a writable /etc (slurm.conf is /etc/slurm/slurm.conf)"
    if not (shutil.which("apt-get") or shutil.which("sinfo")):
        return "neither SLURM nor apt-get to install it is available"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A single-node SLURM for this module, stopped by pid afterwards."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("slurm_cluster")
    cmd = [sys.executable, str(SCRIPT), "--base", str(base)]
    try:
        started = subprocess.run([*cmd, "start"], check=False, capture_output=True, text=True,
                                 timeout=900)
        if started.returncode == 77:
            pytest.skip(started.stderr.strip())
        assert started.returncode == 0, started.stderr
        yield json.loads(started.stdout)
    finally:
        stopped = subprocess.run([*cmd, "stop"], check=False, capture_output=True, text=True,
                                 timeout=120)
        assert stopped.returncode == 0, stopped.stderr


def untimed(path: Path):
    """A metrics JSON without its wall-time entries (`seconds`), which differ between runs."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "seconds"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return strip(json.loads(path.read_text()))


def h5_differences(a: Path, b: Path) -> list[str]:
    """Names of datasets (and attributes) that differ between two HDF5 files."""
    out: list[str] = []
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names: list[str] = []
        fa.visit(names.append)
        other: list[str] = []
        fb.visit(other.append)
        if sorted(names) != sorted(other):
            return ["<different members>"]
        for name in names:
            x, y = fa[name], fb[name]
            if isinstance(x, h5py.Dataset) and not np.array_equal(np.asarray(x), np.asarray(y)):
                out.append(name)
            for key in x.attrs:
                if not np.array_equal(np.asarray(x.attrs[key]), np.asarray(y.attrs.get(key))):
                    out.append(f"{name}@{key}")
    return out


def test_node_resources_cover_every_rule_of_config(repo_root):
    """A rule left out of resources.yaml keeps config.yaml's 32 GB and GPU: sbatch rejects it."""
    big = yaml.safe_load((repo_root / "config.yaml").read_text())["resources"]
    small = yaml.safe_load(RESOURCES.read_text())["resources"]
    assert small["gpus"] == 0 and set(big["rules"]) <= set(small["rules"])
    for spec in [small["default"], *small["rules"].values()]:
        assert spec["mem_mb"] <= 4000 and not spec.get("gpu"), spec


@pytest.mark.slow
def test_smoke_dag_runs_as_slurm_jobs_and_equals_a_local_run(cluster, tmp_path_factory, tmp_path,
                                                             repo_root, cli_env):
    slurm_wd = workdir(tmp_path / "slurm", repo_root)
    # sbatch exports the submitting environment (--export=ALL): the jobs find this venv's
    # `wsss` and `python` through cli_env's PATH
    env = dict(cli_env, OMP_WAIT_POLICY="PASSIVE")
    slurm_log_path = tmp_path / "slurm.log"
    start = time.monotonic()
    with slurm_log_path.open("w") as slurm_log:
        # SIGINT, not SIGTERM: on SIGTERM the executor waits for running jobs; a stuck
        # status loop would otherwise eat the CI budget
        slurm = subprocess.run(
            ["timeout", "-s", "INT", "-k", "30", str(SLURM_LIMIT_S),
             *snakemake_cmd(slurm_wd, "--profile", str(PROFILE))],
            check=False, cwd=slurm_wd, env=env, stdout=slurm_log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    # the reference: the same config run locally, once per session (tests/smoke_reference.py;
    # made while this run waited on status polls when another file asked for it first)
    local_wd = cam_smoke_reference(tmp_path_factory, cli_env)
    slurm_text = slurm_log_path.read_text()
    assert slurm.returncode == 0, f"SLURM run exited {slurm.returncode}:\n{slurm_text[-4000:]}"
    local_text = (local_wd.parent / "snakemake.log").read_text()

    # (a) every rule of the DAG ran as a SLURM job, none on the submitting host
    local_rules = re.findall(r"^localrule (\w+):", local_text, flags=re.MULTILINE)
    assert Counter(local_rules) == JOBS, sorted(local_rules)
    assert not re.search(r"^localrule ", slurm_text, flags=re.MULTILINE), "a rule ran outside SLURM"
    submitted = {int(job): Path(log) for job, log in SUBMITTED.findall(slurm_text)}
    by_rule = {log.parts[log.parts.index("slurm_logs") + 1].removeprefix("rule_"): job
               for job, log in submitted.items()}
    assert set(by_rule) == RULES and len(submitted) == sum(JOBS.values()), sorted(by_rule)
    for rule, job in by_rule.items():
        log = submitted[job]
        assert log.is_file() and log.parent.parent.parent.name == "slurm_logs", log
        text = log.read_text()
        assert f"rule {rule}:" in text and "1 of 1 steps (100%) done" in text, text[-2000:]
    queue = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i|%T|%C|%m"],
                           check=False, capture_output=True, text=True, timeout=30)
    assert queue.returncode == 0, queue.stderr
    states = {int(i): rest for i, *rest in (line.split("|") for line in queue.stdout.split())}
    small = yaml.safe_load(RESOURCES.read_text())["resources"]
    for rule, job in by_rule.items():
        # the rule's threads (as the local run reports them) became --cpus-per-task, and
        # resources.yaml's mem_mb its --mem
        block = re.search(rf"^localrule {rule}:\n((?:    .*\n)+)", local_text, flags=re.MULTILINE)
        threads = re.search(r"^    threads: (\d+)$", block.group(1), flags=re.MULTILINE)
        mem_mb = small["rules"].get(rule, small["default"])["mem_mb"]
        cpus = threads.group(1) if threads else "1"
        assert states[job] == ["COMPLETED", cpus, f"{mem_mb}M"], (rule, states[job])

    # (b) the same numbers and the same artifacts as the local run
    slurm_res, local_res = (wd / "results" / "smoke" / METHOD for wd in (slurm_wd, local_wd))
    for name in ("seed_miou.txt", "mask_miou.txt", "seg_miou.txt"):
        assert (slurm_res / name).read_text() == (local_res / name).read_text(), name
    for name in ("seed_metrics.json", "mask_metrics.json", "ir_label_metrics.json",
                 "seg_metrics.json", "mask_sweep.json"):
        assert untimed(slurm_res / name) == untimed(local_res / name), name
    for store in ("cams.h5", "seeds.h5", "rw.h5"):
        assert h5_differences(slurm_res / store, local_res / store) == [], store
    masks = sorted(p.name for p in (local_res / "masks").glob("*.png"))
    assert masks and masks == sorted(p.name for p in (slurm_res / "masks").glob("*.png"))
    for name in masks:
        assert np.array_equal(read_label_png(slurm_res / "masks" / name),
                              read_label_png(local_res / "masks" / name)), name

    # (c) what it cost
    record = {"slurm_jobs": len(submitted), "slurm_wall_s": round(wall, 1), "method": METHOD,
              "job_ids": {r: by_rule[r] for r in sorted(by_rule)}}
    (tmp_path / "slurm_run.json").write_text(json.dumps(record, indent=1))
    print(f"\nSLURM smoke run ({METHOD}): {record['slurm_jobs']} SLURM jobs in "
          f"{record['slurm_wall_s']} s wall; record in {tmp_path / 'slurm_run.json'}")
