"""Start-up cost of noticing an edited dataset: the file digest of the index parts on VOC- and
COCO-sized trees, against the whole Snakemake start (dry run) that computes it.

    python bench/bench_index_fingerprint.py [--train-aug 10582 --val 1449] [--coco]

Builds a VOC-layout tree of empty-content placeholder files (one JPEG name and one PNG name per
id: the digest stats files, it never decodes them) in a temporary folder, then reports the
median of `--repeats` timings of `data.index.files_fingerprint` for each index part (the
workflow computes both at every start), the time of a `snakemake -n` of the index target with
the digests (a warm start, after one run of the index), and the digests' share of it.
`--coco` repeats the digest timing on a 120k-id tree (COCO 2014 train + val). Run on a quiet
machine; the file system's stat cache is warm after the first repeat, as at a real start.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from wsss_core.data.index import PARTS, files_fingerprint

LISTS = {"train_aug": "train_aug", "train": "train", "val": "val"}


def make_tree(root: Path, train_aug: int, val: int) -> None:
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(train_aug + val)]
    for i in ids:
        (root / "JPEGImages" / f"{i}.jpg").write_bytes(b"x")
        (root / "SegmentationClassAug" / f"{i}.png").write_bytes(b"x")
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train_aug.txt").write_text("\n".join(ids[:train_aug]) + "\n")
    (lists / "train.txt").write_text("\n".join(ids[:min(1464, train_aug)]) + "\n")
    (lists / "val.txt").write_text("\n".join(ids[train_aug:]) + "\n")


def time_digests(root: Path, repeats: int) -> dict[str, float]:
    out = {}
    for part, splits in PARTS.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            files_fingerprint(root, LISTS, splits)
            times.append(time.perf_counter() - t0)
        out[part] = statistics.median(times)
    return out


def dry_run_seconds(root: Path, repo: Path, work: Path) -> float:
    """A warm `snakemake -n` of both index parts: the start-up a user pays at every call. The
    index jobs are not run (placeholder files are not images): the dry run schedules them."""
    (work / "bench.yaml").write_text(yaml.safe_dump({
        "results": str(work / "results"), "datasets": {"big": {"kind": "voc", "root": str(root)}}}))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(work), "-n",
           "--cores", "1", "--configfile", str(repo / "config.yaml"), str(work / "bench.yaml"), "--",
           str(work / "results/big/index/train.json"), str(work / "results/big/index/val.json")]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-aug", type=int, default=10582)
    p.add_argument("--val", type=int, default=1449)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--coco", action="store_true", help="also a 120k-id tree (digest only)")
    a = p.parse_args()
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "voc"
        make_tree(root, a.train_aug, a.val)
        files = 2 * (a.train_aug + a.val)
        d = time_digests(root, a.repeats)
        small = Path(tmp) / "small"
        make_tree(small, 8, 2)
        work, work_small = Path(tmp) / "work", Path(tmp) / "work_small"
        work.mkdir()
        work_small.mkdir()
        # interleaved, medians: the machine's load moves both alike
        dry, dry_small = [], []
        for _ in range(3):
            dry.append(dry_run_seconds(root, repo, work))
            dry_small.append(dry_run_seconds(small, repo, work_small))
        dry, dry_small = statistics.median(dry), statistics.median(dry_small)
        both = sum(d.values())
        print(f"VOC-sized tree: {a.train_aug} + {a.val} ids, {files} image/mask files")
        print(f"  digest train part {d['train'] * 1000:.1f} ms, val part {d['val'] * 1000:.1f} ms, "
              f"both {both * 1000:.1f} ms ({both / files * 1e6:.2f} us per file)")
        print(f"  snakemake -n of the index: {dry:.2f} s against {dry_small:.2f} s on a 10-id tree "
              f"(ratio {dry / dry_small:.2f}); the digests are {both / dry:.1%} of it")
        if a.coco:
            croot = Path(tmp) / "coco"
            make_tree(croot, 82081, 40137)
            c = time_digests(croot, max(1, a.repeats // 2))
            print(f"COCO-sized tree: 82081 + 40137 ids: digest both parts {sum(c.values()):.2f} s")


if __name__ == "__main__":
    main()
