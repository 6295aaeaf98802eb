"""Audit page, single panels, `wsss summary`, the method comparison and the Snakemake wiring,
on synthetic artifacts of a small toy dataset (maps derived from the ground truth with noise,
scored by the real evaluation stages), so no model is trained here."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from wsss_core.audit.artifacts import BENCHMARK_RULES, read_benchmark
from wsss_core.audit.page import choose_sample, cooccurring_pairs
from wsss_core.audit.panels import label_rgb
from wsss_core.data.palette import IGNORE, voc_palette
from wsss_core.io import save_label_png, write_json, write_text
from wsss_core.map_store import MapWriter
from wsss_core.pseudo.masks import pseudo_mask
from wsss_core.metrics import ConfusionMatrix, write_metrics
from wsss_core.pseudo.seeds import fuse, seed_labels
from wsss_core.stages.audit import audit
from wsss_core.stages.compare import compare
from wsss_core.stages.eval_masks import eval_masks
from wsss_core.stages.eval_seeds import eval_seeds
from wsss_core.stages.sweep_masks import sweep_masks

DATASET = "toysmall"
METHODS = {"cam": ("cam",), "cobra": ("cnn", "vit")}
MASK_PARAMS = {"rule": "per_class_alpha", "alpha": 0.3, "bg": 0.25, "crf": False, "crf_params": {},
               "sweep": {"start": 0.1, "stop": 0.5, "step": 0.1}}
AUDIT_PARAMS = {"worst": 1, "best": 1, "random": 1, "val": 2, "pairs": 3, "seed": 0}


def _class_maps(gt: np.ndarray, keys: list[int], rng: np.random.Generator, blur: int) -> np.ndarray:
    """(K, H, W) in [0, 1]: each class's GT region, box-blurred, plus noise."""
    from scipy.ndimage import uniform_filter
    maps = [uniform_filter((gt == k).astype(np.float32), size=blur) for k in keys]
    out = np.stack(maps) if maps else np.zeros((0,) + gt.shape, np.float32)
    out = np.clip(out + rng.uniform(0, 0.35, out.shape).astype(np.float32), 0, None)
    peak = out.reshape(len(keys), -1).max(axis=1) if keys else np.ones(0)
    return out / np.maximum(peak, 1e-5)[:, None, None]


def _benchmark(path: Path, seconds: float, rss: str) -> None:
    write_text(path, "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                     f"{seconds}\t0:00:01\t{rss}\t1.0\t1.0\t1.0\t0.0\t0.0\t0.0\t0.5\n")


def _make_run(results: Path, index, method: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    base = results / DATASET / method
    names = METHODS[method]
    train_aug = index.ids("train_aug")
    with MapWriter(base / "cams.h5", {"method": method}) as cams, \
            MapWriter(base / "seeds.h5", {"recipe": "max_mean_last" if method == "cobra" else "max"}) as seeds, \
            MapWriter(base / "rw.h5", {"source": names[0] + "_s4"}) as rw:
        for i in train_aug:
            gt, keys, size = index.mask(i), index.labels(i), index.size(i)
            maps = {n: _class_maps(gt, keys, rng, 9 + 4 * j) for j, n in enumerate(names)}
            maps.update({f"{n}_s4": m[:, ::4, ::4] for n, m in list(maps.items())})
            if method == "cobra":
                maps["attention"] = rng.random(size).astype(np.float32)
            cams.add(i, keys, size, maps)
            seed_map = fuse("max_mean_last", [maps["cnn"], maps["vit"]]) if method == "cobra" else maps["cam"]
            seeds.add(i, keys, size, {"seed": seed_map})
            propagated = _class_maps(gt, keys, rng, 5) * 3.0
            rw.add(i, keys, size, {"rw": propagated, "boundary": rng.random((size[0] // 4, size[1] // 4))})
            labels = seed_labels(seed_map, np.asarray(keys), 0.3)
            lenient = seed_labels(seed_map, np.asarray(keys), 0.05)
            save_label_png(base / "ir_labels" / f"{i}.png", np.where(labels == lenient, labels, IGNORE))
            save_label_png(base / "masks" / f"{i}.png",
                           pseudo_mask(None, propagated, np.asarray(keys), MASK_PARAMS, crf=False))
    index_path = results / DATASET / "index.json"
    eval_seeds(index_path, base / "seeds.h5", {"thresholds": {"start": 0.1, "stop": 0.6, "step": 0.1}},
               base / "seed_miou.txt")
    sweep_masks(index_path, base / "rw.h5", MASK_PARAMS, base / "mask_sweep.json")
    eval_masks(index_path, base / "masks", base / "ir_labels", base / "mask_miou.txt",
               base / "ir_label_metrics.json")
    cm = ConfusionMatrix(index.num_classes)
    for i in index.ids("val"):
        gt = index.mask(i)
        pred = np.where(rng.random(gt.shape) < 0.2, 0, np.where(gt == IGNORE, 0, gt)).astype(np.uint8)
        save_label_png(base / "seg" / "pred" / f"{i}.png", pred)
        cm.update(pred, gt)
    write_metrics(base / "seg_miou.txt", cm.report(index.class_names, split="val"))
    for k, rule in enumerate(BENCHMARK_RULES):
        _benchmark(base / "benchmarks" / f"{rule}.tsv", 1.25 + k + seed, "NA" if k == 3 else f"{100.5 + k:.2f}")
    return base


@pytest.fixture(scope="module")
def results(tmp_path_factory, toy_index) -> Path:
    results = tmp_path_factory.mktemp("audit") / "results"
    write_json(results / DATASET / "index.json", toy_index.data)
    for k, method in enumerate(METHODS):
        _make_run(results, toy_index, method, seed=k)
    return results


@pytest.fixture(scope="module")
def page(results) -> Path:
    return audit(results / DATASET / "cobra", AUDIT_PARAMS)


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def _img_srcs(page: Path) -> list[str]:
    parser = _Images()
    parser.feed(page.read_text())
    return parser.srcs


def test_page_exists_and_every_image_is_on_disk(page, toy_index):
    assert page.name == "index.html" and page.is_file()
    srcs = _img_srcs(page)
    panels = [s for s in srcs if s.startswith("panels/")]
    # worst + best + random of the 4 evaluated train images, 2 val images
    assert len(panels) == 5 and {"sweeps.png", "confusion.png"} <= set(srcs)
    for src in srcs:
        assert not Path(src).is_absolute() and (page.parent / src).is_file(), src
        with Image.open(page.parent / src) as img:
            assert img.size[0] > 100 and img.size[1] > 100
    val = set(toy_index.ids("val"))
    assert sum(Path(s).stem in val for s in panels) == 2
    text = page.read_text()
    for needle in ("Per-class IoU", "Co-occurring class pairs", "segmentation"):
        assert needle in text
    metrics = sorted(p.name for p in (page.parent / "metrics").iterdir())
    assert metrics == sorted(["seed_metrics.json", "ir_label_metrics.json", "mask_metrics.json",
                              "seg_metrics.json", "mask_sweep.json"])


def test_page_tables_show_the_metric_files(page, results):
    text = page.read_text()
    for name in ("seed", "mask", "seg"):
        assert f"<td>{(results / DATASET / 'cobra' / f'{name}_miou.txt').read_text().strip()}</td>" in text


def test_sample_is_worst_best_then_seeded_random():
    scores = {f"img{i:02d}": float(s) for i, s in enumerate([50, 10, 80, 30, 10, 95, 60, 70, 20, 40])}
    train = sorted(scores)
    val = [f"v{i}" for i in range(5)]
    params = {"worst": 2, "best": 2, "random": 3, "val": 2, "seed": 7}
    sample = choose_sample(scores, train, val, params)
    groups = {g: [s.image_id for s in sample if s.group == g] for g in ("worst", "best", "random", "val")}
    assert groups["worst"] == ["img01", "img04"]  # both 10: ties by id
    assert groups["best"] == ["img05", "img02"]
    assert len(groups["random"]) == 3 and not set(groups["random"]) & set(groups["worst"] + groups["best"])
    assert len(set(groups["val"])) == 2 and set(groups["val"]) <= set(val)
    assert choose_sample(scores, train, val, params) == sample  # deterministic
    assert [s.group for s in choose_sample({}, train, [], params)] == ["random"] * 3


def test_cooccurring_pairs_match_a_loop_count(toy_index):
    counts: dict[tuple[int, int], int] = {}
    for i in toy_index.ids("train_aug"):
        labels = sorted(toy_index.labels(i))
        for x in range(len(labels)):
            for y in range(x + 1, len(labels)):
                counts[(labels[x], labels[y])] = counts.get((labels[x], labels[y]), 0) + 1
    expected = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
    assert [((a, b), n) for a, b, n in cooccurring_pairs(toy_index, "train_aug", 4)] == expected


def test_ignore_is_drawn_unlike_any_class():
    labels = np.zeros((16, 16), np.uint8)
    labels[4:12, 4:12] = IGNORE
    labels[0, :] = 3
    rgb = label_rgb(labels)
    assert (rgb[0, 0] == voc_palette()[3]).all() and (rgb[15, 15] == voc_palette()[0]).all()
    ignore_colours = {tuple(c) for c in rgb[4:12, 4:12].reshape(-1, 3)}
    assert len(ignore_colours) == 2  # a checkerboard
    assert not ignore_colours & {tuple(c) for c in voc_palette()[:21]}


def _md_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| quantity"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_comparison_numbers_equal_the_metric_files(results):
    md_path = results / DATASET / "comparison.md"
    compare(results, DATASET, list(METHODS), md_path, md_path.with_suffix(".html"))
    rows = _md_rows(md_path.read_text())
    assert md_path.with_suffix(".html").read_text().count("<tr>") >= len(rows)
    for col, method in enumerate(METHODS):
        base = results / DATASET / method
        for key, label in (("seed", "seeds"), ("mask", "masks"), ("seg", "segmentation")):
            assert rows[f"{label} mIoU"][col] == (base / f"{key}_miou.txt").read_text().strip()
        reports = {"seeds": "seed_metrics.json", "IR labels": "ir_label_metrics.json",
                   "masks": "mask_metrics.json", "segmentation": "seg_metrics.json"}
        for label, name in reports.items():
            report = json.loads((base / name).read_text())
            assert abs(float(rows[f"{label} mIoU"][col]) - report["miou"]) <= 0.005
            for cls, iou in report["iou"].items():
                cell = rows[f"{label} IoU {cls}"][col]
                assert (cell == "–") if iou is None else abs(float(cell) - 100 * iou) <= 0.005, (label, cls)
        for rule in BENCHMARK_RULES:
            bench = read_benchmark(base / "benchmarks" / f"{rule}.tsv")
            assert abs(float(rows[f"time {rule} (s)"][col]) - bench.seconds) <= 0.005 + 1e-9
            rss = rows[f"peak memory {rule} (MB)"][col]
            assert (rss == "–") if bench.max_rss_mb is None else abs(float(rss) - bench.max_rss_mb) <= 0.05 + 1e-9


def _wsss(cli_env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsss_core.cli", *args], env=cli_env,
                          capture_output=True, text=True, timeout=120)


def test_cli_audit_id_writes_one_panel(results, cli_env, tmp_path, toy_index):
    image_id = toy_index.ids("val")[0]
    out = tmp_path / "one"
    result = _wsss(cli_env, "audit", str(results / DATASET / "cam"), "--id", image_id,
                   "--out", str(out / "panel.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in out.iterdir()] == ["panel.png"]
    with Image.open(out / "panel.png") as img:
        assert img.size[0] > 300
    bad = _wsss(cli_env, "audit", str(results / DATASET / "cam"), "--id", "no_such_image")
    assert bad.returncode == 2 and "no_such_image" in bad.stderr


def test_cli_summary_prints_the_numbers(results, cli_env):
    base = results / DATASET / "cobra"
    result = _wsss(cli_env, "summary", str(base))
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("seed", "mask", "seg"):
        assert (base / f"{name}_miou.txt").read_text().strip() in result.stdout
    ir = json.loads((base / "ir_label_metrics.json").read_text())["miou"]
    assert f"{ir:.2f}" in result.stdout and "train_classifier" in result.stdout


def test_rules_are_wired(repo_root, cli_env, tmp_path):
    """A dry run plans audit and compare jobs for every configured method."""
    from test_e2e import smoke_config
    shutil.copy(repo_root / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(smoke_config(repo_root)))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo_root / "Snakefile"), "-d", str(tmp_path),
           "--cores", "1", "--configfile", str(tmp_path / "smoke.yaml"), "-n", "--",
           "results/smoke/comparison.md", "results/smoke/cobra/audit/index.html"]
    result = subprocess.run(cmd, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    jobs = re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.M)
    counts = {rule: int(n) for rule, n in jobs}
    configured = yaml.safe_load((repo_root / "config.yaml").read_text())["methods"]
    assert counts.get("compare") == 1 and counts.get("audit") == 1
    # one segmentation evaluation per method of the merged config: the shared route's, or a
    # single-stage method's own head
    from wsss_core.methods import method_class
    single = sum(method_class(m["plugin"]).single_stage for m in configured.values())
    assert counts.get("eval_seg", 0) == len(configured) - single
    assert counts.get("eval_method_seg", 0) == single


# --- headless Chromium -------------------------------------------------------------------------
CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var out = document.createElement('pre');
  out.id = 'image-check';
  out.textContent = 'IMAGES ' + imgs.length + ' BROKEN ' + broken.length + ' ' +
                    broken.map(function (i) { return i.getAttribute('src'); }).join(',');
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get"):
        try:
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            pass
    path = shutil.which("chromium")
    if not path:
        pytest.skip("headless Chromium not available (`apt-get install -y chromium` failed or is not "
                    "allowed here); the on-disk image checks above still ran")
    return path


def _chromium_cmd(binary: str, profile: Path, *extra: str) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", *extra]


def test_page_in_headless_chromium(page, tmp_path):
    binary = _chromium()
    # a copy of the page beside it, with a script reporting images that failed to load
    probe = page.parent / "_image_check.html"
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    try:
        dom = subprocess.run(_chromium_cmd(binary, tmp_path / "p1", "--virtual-time-budget=10000",
                                           "--dump-dom", probe.as_uri()),
                             capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.skip("headless Chromium did not finish within 90 s on this machine")
    finally:
        probe.unlink()
    if dom.returncode != 0 and "image-check" not in dom.stdout:
        pytest.skip(f"headless Chromium cannot run here: {dom.stderr.strip().splitlines()[-1:]}")
    found = re.search(r"IMAGES (\d+) BROKEN (\d+) ?([^<]*)", dom.stdout)
    assert found, dom.stdout[-2000:]
    assert int(found.group(1)) == len(_img_srcs(page)) and found.group(2) == "0", found.group(0)

    shot = tmp_path / "page.png"
    subprocess.run(_chromium_cmd(binary, tmp_path / "p2", f"--screenshot={shot}", "--window-size=1200,2000",
                                 "--hide-scrollbars", page.as_uri()),
                   capture_output=True, text=True, timeout=90)
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2000, 1200) and pixels.std() > 10.0
