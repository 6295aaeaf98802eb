"""Snakemake itself builds `results/{dataset}/index.json` for toy and VOC-layout datasets.

Every run uses the repository's Snakefile with a temporary working folder (holding a copy of
config.yaml), so results, logs and `.snakemake/` stay out of the repository.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wsss_core.data.index import DatasetIndex

SMALL_TOY = {"kind": "toy", "image_size": 48, "num_train_aug": 8, "num_train_eval": 3,
             "num_val": 4}
TOY2 = {"kind": "toy", "seed": 7, "num_train_aug": 12, "num_train_eval": 4, "num_val": 4,
        "image_size": 48}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, repo_root: Path) -> Path:
    wd = tmp_path_factory.mktemp("workflow")
    shutil.copy(repo_root / "config.yaml", wd / "config.yaml")
    (wd / "extra.yaml").write_text(yaml.safe_dump({"datasets": {"toy": SMALL_TOY}}))
    return wd


def snakemake(workdir: Path, repo_root: Path, env: dict, target: str, *flags: str,
              configfiles: tuple[str, ...] = ("extra.yaml",)) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo_root / "Snakefile"),
           "-d", str(workdir), "--cores", "2", *flags, "--configfile",
           *[str(workdir / c) for c in configfiles], "--", target]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def output_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def test_toy_index_from_nothing_then_nothing_to_do(workdir, repo_root, cli_env):
    index_path = workdir / "results" / "toy" / "index.json"
    first = snakemake(workdir, repo_root, cli_env, "results/toy/index.json")
    assert first.returncode == 0, output_of(first)
    index = DatasetIndex.load(index_path)
    assert len(index.ids("train_aug")) == 8 and len(index.ids("val")) == 4
    assert index.ids("train") == index.ids("train_aug")[:3]
    assert index.root == (workdir / "results" / "toy" / "data").resolve()
    assert len(list((workdir / "results" / "toy" / "data" / "JPEGImages").glob("*.jpg"))) == 12
    assert (workdir / "results" / "toy" / "logs" / "dataset_index.log").is_file()
    stamp = index_path.stat().st_mtime_ns

    dry = snakemake(workdir, repo_root, cli_env, "results/toy/index.json", "-n")
    assert dry.returncode == 0 and "Nothing to be done" in output_of(dry), output_of(dry)
    second = snakemake(workdir, repo_root, cli_env, "results/toy/index.json")
    assert second.returncode == 0 and "Nothing to be done" in output_of(second)
    assert index_path.stat().st_mtime_ns == stamp


def test_second_toy_dataset_from_an_extra_configfile(workdir, repo_root, cli_env):
    (workdir / "toy2.yaml").write_text(yaml.safe_dump({"datasets": {"toy2": TOY2}}))
    result = snakemake(workdir, repo_root, cli_env, "results/toy2/index.json",
                       configfiles=("extra.yaml", "toy2.yaml"))
    assert result.returncode == 0, output_of(result)
    toy2 = workdir / "results" / "toy2"
    index = json.loads((toy2 / "index.json").read_text())
    assert index["dataset"] == "toy2"
    assert {s: len(v) for s, v in index["splits"].items()} == {"train_aug": 12, "train": 4, "val": 4}
    assert len(list((toy2 / "data" / "JPEGImages").glob("*.jpg"))) == 16
    assert index["root"] == str((toy2 / "data").resolve())


def test_second_toy_dataset_with_defaults_only(workdir, repo_root, cli_env):
    """`toy3: {kind: toy, seed: 7}` is a complete entry: a dry run plans make_toy with the defaults."""
    (workdir / "toy3.yaml").write_text(yaml.safe_dump({"datasets": {"toy3": {"kind": "toy",
                                                                              "seed": 7}}}))
    result = snakemake(workdir, repo_root, cli_env, "results/toy3/index.json", "-n", "-p",
                       configfiles=("extra.yaml", "toy3.yaml"))
    assert result.returncode == 0, output_of(result)
    text = output_of(result)
    assert "make_toy" in text and "dataset_index" in text
    assert "--seed 7" in text and "--num-train-aug 320" in text and "--image-size 112" in text


def test_real_voc_sample(workdir, repo_root, cli_env, voc_sample_root):
    (workdir / "voc.yaml").write_text(yaml.safe_dump(
        {"datasets": {"vocsample": {"kind": "voc", "root": str(voc_sample_root)}}}))
    result = snakemake(workdir, repo_root, cli_env, "results/vocsample/index.json",
                       configfiles=("extra.yaml", "voc.yaml"))
    assert result.returncode == 0, output_of(result)
    index = DatasetIndex.load(workdir / "results" / "vocsample" / "index.json")
    assert len(index.data["images"]) == 48 and index.num_classes == 21
    assert len(index.ids("train")) == 26 and len(index.ids("val")) == 22
    assert not (workdir / "results" / "vocsample" / "data").exists()  # read in place


def test_adding_ids_to_a_list_reruns_the_index(workdir, repo_root, cli_env, voc_sample_root, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(voc_sample_root, root)
    lists = root / "ImageSets" / "Segmentation"
    train = (lists / "train.txt").read_text().split()
    (lists / "train_aug.txt").write_text("\n".join(train[:20]) + "\n")
    (workdir / "vocgrow.yaml").write_text(yaml.safe_dump(
        {"datasets": {"vocgrow": {"kind": "voc", "root": str(root)}}}))
    target = "results/vocgrow/index.json"
    first = snakemake(workdir, repo_root, cli_env, target, configfiles=("extra.yaml", "vocgrow.yaml"))
    assert first.returncode == 0, output_of(first)
    assert len(DatasetIndex.load(workdir / target).ids("train_aug")) == 20
    unchanged = snakemake(workdir, repo_root, cli_env, target, "-n", configfiles=("extra.yaml", "vocgrow.yaml"))
    assert "Nothing to be done" in output_of(unchanged)
    (lists / "train_aug.txt").write_text("\n".join(train) + "\n")  # six more images
    grown = snakemake(workdir, repo_root, cli_env, target, configfiles=("extra.yaml", "vocgrow.yaml"))
    assert grown.returncode == 0 and "dataset_index" in output_of(grown)
    assert len(DatasetIndex.load(workdir / target).ids("train_aug")) == 26


def test_voc_without_root_fails_at_once_with_advice(workdir, repo_root, cli_env):
    (workdir / "noroot.yaml").write_text(yaml.safe_dump(
        {"datasets": {"noroot": {"kind": "voc", "root": None}}}))
    result = snakemake(workdir, repo_root, cli_env, "results/noroot/index.json", "-n",
                       configfiles=("extra.yaml", "noroot.yaml"))
    assert result.returncode != 0
    text = output_of(result)
    assert "datasets.noroot.root is not set" in text and "config.yaml" in text, text
    assert not (workdir / "results" / "noroot").exists()


def test_bad_config_stops_before_any_job(workdir, repo_root, cli_env):
    (workdir / "bad.yaml").write_text(yaml.safe_dump(
        {"datasets": {"toy": {"image_size": 5}}}))
    result = snakemake(workdir, repo_root, cli_env, "results/toy/index.json", "-n",
                       configfiles=("extra.yaml", "bad.yaml"))
    assert result.returncode != 0
    assert "config key datasets.toy.image_size" in output_of(result), output_of(result)
