"""CPU cost of one Snakemake start (a warm dry run of the toy DAG) with this checkout's code
against another revision's, measured side by side: the test suite and every cluster job start
Snakemake (the suite ~130 times), so its start-up is paid over and over.

    python bench/bench_workflow_start.py [--base HEAD~1] [--repeats 7]

`--base` is checked out into a temporary git worktree. Both run on the same working folder (the
default toy config, nothing built: the dry run plans the whole DAG) with their own code first on
PYTHONPATH, alternating base / this checkout `--repeats` times after one warm-up each (which
fills the `.snakemake/` caches as a user's first call does). Prints the median user + system
seconds of each and their ratio. Run on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def start_cpu_seconds(code: Path, work: Path) -> float:
    """User + system CPU seconds of one `snakemake -n` of the default target with `code`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, PYTHONPATH=str(code))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(code / "Snakefile"), "-d", str(work),
           "--configfile", str(code / "config.yaml"), "-n", "-q", "--cores", "2"]
    subprocess.run(cmd, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare with (HEAD)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base),
                        args.base], check=True)
        try:
            runs = {"base": (base, Path(tmp) / "work-base"), "this": (REPO, Path(tmp) / "work-this")}
            times: dict[str, list[float]] = {name: [] for name in runs}
            for code, work in runs.values():
                work.mkdir()
                start_cpu_seconds(code, work)  # warm-up: file cache and .snakemake/ caches
            for _ in range(args.repeats):
                for name, (code, work) in runs.items():
                    times[name].append(start_cpu_seconds(code, work))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)],
                           check=False)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"snakemake -n, CPU seconds (median of {args.repeats}): {args.base} {med['base']:.2f}, "
          f"this checkout {med['this']:.2f}, ratio this/base {med['this'] / med['base']:.2f}")


if __name__ == "__main__":
    main()
