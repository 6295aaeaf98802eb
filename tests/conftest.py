"""Shared fixtures: the repository root, a small generated toy dataset, the real VOC sample."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from wsss_core.data.index import DatasetIndex, build_index
from wsss_core.data.toy import generate_toy

REPO_ROOT = Path(__file__).resolve().parent.parent
#: 48 real VOC 2012 images with SegmentationClassAug masks, kept beside the repository
VOC_SAMPLE = REPO_ROOT.parent / "shared" / "voc_real" / "voc2012-sample48"
#: a toy dataset small enough to generate in about a second
SMALL_TOY = dict(seed=5, image_size=64, num_train_aug=12, num_train_eval=4, num_val=6)


def pytest_configure(config) -> None:
    """One folder for what Snakemake starts learn about the code and the config (plug-in
    descriptions, import lists, configs that passed; keyed by content), shared by every test's
    working folder and every pytest-xdist worker (they inherit the environment): without it each
    test's first start in a new folder imports every plug-in, torch and timm (~4 s of CPU).

    OpenMP threads that wait passively: three workers share two CPUs, and a thread spinning
    after its parallel region takes the CPU another worker's test needs (the CPU time of the
    suite is its wall time)."""
    if os.environ.get("WSSS_CACHE_DIR") or hasattr(config, "workerinput"):
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import tempfile

    folder = tempfile.mkdtemp(prefix="wsss-test-cache-")
    os.environ["WSSS_CACHE_DIR"] = folder
    config.add_cleanup(lambda: (os.environ.pop("WSSS_CACHE_DIR", None),
                                shutil.rmtree(folder, ignore_errors=True)))


def copy_workflow(repo_root: Path, wd: Path) -> None:
    """A copy of the workflow in `wd`, so tests may edit its sources (the stages' code
    fingerprints are read beside the Snakefile; the commands themselves run the installed
    package)."""
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(repo_root / name, wd / name)
    for folder in ("rules", "wsss_core", "envs", "report"):
        shutil.copytree(repo_root / folder, wd / folder, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """Environment for subprocesses: the interpreter's bin folder (wsss, snakemake) first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("WSSS_DEBUG", None)
    return env


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """A small toy dataset in VOC layout (read-only for tests: copy it before changing it)."""
    out = tmp_path_factory.mktemp("toy_small") / "data"
    generate_toy(out, **SMALL_TOY)
    return out


@pytest.fixture(scope="session")
def toy_index(toy_root: Path) -> DatasetIndex:
    lists = {s: s for s in ("train_aug", "train", "val")}
    return DatasetIndex(build_index("toy_small", "toy", toy_root, lists, progress=False))


@pytest.fixture(scope="session")
def voc_sample_root() -> Path:
    """The real VOC sample folder; tests using it are skipped where it is absent."""
    if not (VOC_SAMPLE / "JPEGImages").is_dir():
        pytest.skip(f"real VOC sample not found at {VOC_SAMPLE}")
    return VOC_SAMPLE


#: Test files that run whole Snakemake DAGs, longest first (measured on the 2-core machine; the
#: SLURM test mostly waits for the executor's status polls). Under pytest-xdist (`-n`, see
#: pyproject.toml, `--no-loadscope-reorder` keeps this order) they start first, so the short
#: tests fill the other workers while they run instead of the suite ending on one of them alone.
LONGEST_FIRST = (*(("test_paper_smoke_cnn.py", "test_paper_smoke_vit.py")
                   if os.environ.get("WSSS_PAPER_SMOKE") == "1" else ()),
                 "test_slurm.py", "test_e2e.py", "test_label_only.py", "test_plugin_contract.py",
                 "test_incremental.py")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker more than the CPUs (at most four), since the SLURM test's worker
    spends most of its minutes waiting for status polls while its jobs are short."""
    return min((os.cpu_count() or 1) + 1, 4)


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
