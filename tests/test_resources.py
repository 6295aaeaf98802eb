"""Cluster resources: every rule declares memory and run time from config `resources`; GPU
stages ask for GPUs on the GPU partition, CPU-only stages (CRF, evaluation, fusion) ask for
none; the profiles name the SLURM executor and a local set-up."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

GPU_RULES = {"train_classifier", "export_cams", "train_irn", "propagate", "train_seg", "eval_seg"}


def _dry_run_resources(repo_root: Path, tmp_path: Path, env: dict, rules: dict | None = None,
                       shell: list[str] | None = None) -> dict[str, str]:
    """Resources of each rule in a dry run; `shell` collects the printed shell commands."""
    extra = tmp_path / "cluster.yaml"
    extra.write_text(yaml.safe_dump({"results": str(tmp_path / "results"),
                                     "resources": {"partition": "cpu", "gpu_partition": "a100", "gpus": 2,
                                                   "rules": rules or {}}}))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo_root / "Snakefile"), "-d", str(repo_root),
           "-n", "-p", "--configfile", str(extra), "--",
           f"{tmp_path}/results/toy/cobra/seg_miou.txt", f"{tmp_path}/results/toy/cobra/mask_miou.txt",
           f"{tmp_path}/results/toy/cobra/seed_miou.txt"]
    out = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    found = {}
    for block in re.split(r"\n(?=\S*rule \w+:)", out.stdout):
        m = re.match(r"\S*rule (\w+):", block)
        r = re.search(r"resources: (.*)", block)
        if m and r:
            found[m.group(1)] = r.group(1)
        if m and shell is not None:
            shell += [line for line in block.splitlines() if " wsss " in f" {line}"]
    return found


def test_rules_declare_resources_from_config(repo_root, tmp_path, cli_env):
    found = _dry_run_resources(repo_root, tmp_path, cli_env)
    assert {"train_classifier", "export_cams", "fuse_seeds", "eval_seeds", "ir_labels", "train_irn",
            "propagate", "make_masks", "eval_masks", "train_seg", "eval_seg"} <= set(found)
    for rule, text in found.items():
        assert "mem_mb=" in text and "runtime=" in text, (rule, text)
        if rule in GPU_RULES:
            assert "gpu=2" in text and "slurm_partition=a100" in text, (rule, text)
        else:
            assert "gpu=" not in text and "slurm_partition=cpu" in text, (rule, text)


def test_profiles(repo_root):
    slurm = yaml.safe_load((repo_root / "profiles" / "slurm" / "config.yaml").read_text())
    local = yaml.safe_load((repo_root / "profiles" / "local" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm" and slurm["jobs"] > 0
    assert local["cores"] == "all" and local["resources"]["gpu"] >= 1


def test_training_processes_run_torchrun_with_a_gpu_per_process(repo_root, tmp_path, cli_env):
    """processes: 4 on train_irn → torchrun with 4 processes asking for gpus x 4 GPUs; the
    other training rules keep one process and plain `wsss`. (4: the toy batch of 16 must
    split over them, or the config check refuses it.)"""
    shell: list[str] = []
    found = _dry_run_resources(repo_root, tmp_path, cli_env, shell=shell, rules={
        "train_irn": {"mem_mb": 32000, "runtime": 360, "gpu": True, "processes": 4}})
    assert "gpu=8" in found["train_irn"] and "gpu=2" in found["train_classifier"]
    by_stage = {re.search(r"wsss ([\w-]+)", line).group(1): line for line in shell}
    assert "torchrun --standalone --nproc_per_node 4 --no-python -- wsss train-irn " in by_stage["train-irn"]
    for stage in ("train-classifier", "train-seg", "export-cams"):
        assert "torchrun" not in by_stage[stage] and f"wsss {stage} " in by_stage[stage]
