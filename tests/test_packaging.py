"""Packaging: pyproject and the conda environment agree; `wsss --help` lists what exists."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from wsss_core import cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
#: conda package name → the PyPI distribution it provides
CONDA_TO_PYPI = {"pytorch": "torch", "snakemake-minimal": "snakemake"}
#: conda-only entries that are the environment itself, not a dependency of wsss
CONDA_TOOLING = {"python", "pip"}


def normalise(name: str) -> str:
    """PEP 503 normalisation: case-insensitive, runs of - _ . are one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def pyproject_requirements() -> dict[str, SpecifierSet]:
    project = pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project.get("optional-dependencies", {}).get("test", [])]
    return {normalise(r.name): r.specifier for r in reqs}


def conda_requirements() -> dict[str, SpecifierSet]:
    env = yaml.safe_load((REPO / "envs" / "wsss.yaml").read_text())
    out: dict[str, SpecifierSet] = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):  # the pip: section holds PyPI requirements and wsss itself
            for r in map(Requirement, (p for p in dep["pip"] if not p.startswith("-e "))):
                out[normalise(r.name)] = r.specifier
            continue
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*([<>=!~].*)?", dep)
        assert m, f"unparsable conda dependency {dep!r}"
        name = normalise(m.group(1))
        if name in CONDA_TOOLING:
            continue
        out[normalise(CONDA_TO_PYPI.get(name, name))] = SpecifierSet(
            (m.group(2) or "").replace(" ", ""))
    return out


def test_conda_env_names_the_same_packages_as_pyproject():
    pip, conda = pyproject_requirements(), conda_requirements()
    assert sorted(conda) == sorted(pip), (
        f"only in pyproject: {sorted(set(pip) - set(conda))}; "
        f"only in envs/wsss.yaml: {sorted(set(conda) - set(pip))}")


def test_conda_env_has_the_same_version_bounds():
    pip, conda = pyproject_requirements(), conda_requirements()
    for name in pip:
        assert str(conda.get(name)) == str(pip[name]), name


def test_conda_env_python_matches_requires_python():
    env = yaml.safe_load((REPO / "envs" / "wsss.yaml").read_text())
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert python == [f"python{pyproject()['project']['requires-python']}"]
    assert "conda-forge" in env["channels"]


def test_conda_env_installs_this_checkout():
    """Under `snakemake --sdm conda` the rules' `wsss` is the environment's: its pip section
    installs the repository from ${WSSS_ROOT} (pip expands it), which the Snakefile sets to the
    workflow's folder. A path relative to the env file would not do: Snakemake creates the
    environment from a copy of the file under .snakemake/conda/."""
    env = yaml.safe_load((REPO / "envs" / "wsss.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ${WSSS_ROOT}" in pip
    assert 'os.environ["WSSS_ROOT"] = workflow.basedir' in (REPO / "Snakefile").read_text()


def test_one_snakemake_minimum():
    """Snakefile min_version, pyproject and the conda environment name the same minimum."""
    version = re.search(r'^min_version\("([\d.]+)"\)', (REPO / "Snakefile").read_text(), re.M)[1]
    assert str(pyproject_requirements()["snakemake"]) == f">={version}"
    assert str(conda_requirements()["snakemake"]) == f">={version}"


def test_normalise():
    assert normalise("Segmentation_Models.PyTorch") == normalise("segmentation-models-pytorch")


def test_console_script_points_at_the_cli():
    assert pyproject()["project"]["scripts"]["wsss"] == "wsss_core.cli:main"


def test_help_lists_exactly_the_commands_whose_modules_exist():
    result = subprocess.run([sys.executable, "-m", "wsss_core.cli", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    expected = {cmd for cmd, (module, _) in cli.COMMANDS.items()
                if importlib.util.find_spec(module) is not None}
    assert listed == expected
    assert {"make-toy", "dataset-index"} <= listed


def test_help_of_the_installed_command(cli_env):
    result = subprocess.run(["wsss", "--help"], capture_output=True, text=True, env=cli_env,
                            timeout=60)
    assert result.returncode == 0 and "dataset-index" in result.stdout


def test_unknown_command_fails_with_usage(capsys):
    assert cli.main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert "unknown command" in err and "dataset-index" in err


def test_every_listed_module_has_a_main():
    for cmd, (module, _) in cli.available().items():
        spec = importlib.util.find_spec(module)
        source = Path(spec.origin).read_text()
        assert re.search(r"^def main\(", source, re.M), f"{module} ({cmd}) has no main()"


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", quick, flags=re.S)]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    main_job, tests = commands
    assert main_job.endswith("snakemake --cores 2") and "pip install" in main_job
    assert tests.endswith("pytest -q")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "the README's test command must appear verbatim in .ci/run"
