"""One prepared GPU check of the `paper` presets: throughput, peak memory, FLOPs / MFU and
fp32-vs-bf16 of every stage that runs on the GPU, for every method of config.yaml, on real VOC
photos, in a bounded time (docs/gpu.md).

    python bench/gpu_check.py --out DIR [--data ../shared/voc_real/voc2012-seg632]
        [--methods cam,cobra,...] [--steps 6] [--images 8] [--precisions fp32,bf16]
        [--stage-timeout 120] [--budget 420] [--threads N] [--workers N] [--device cuda|cpu]
        [--tiny]

What runs: the package's own stage functions (`train_classifier`, `export_cams`, `train_irn`,
`propagate`, `make_masks`, `train_seg`, `eval_seg`, and for a single-stage method `eval_seg
--from-method`), each called as the workflow calls it, on the method's `paper` parameters
(`config.yaml`, dataset `voc`) with every `pretrained` switched off (random weights, no
download; IRN's frozen backbone `backbone_from: scratch`). Two things are changed so that the
run is bounded:
- a training stage trains one epoch over a train_aug list of `steps x batch_size` photos, i.e.
  exactly `--steps` optimizer steps of the preset's batch (fewer when the photos run out; the
  JSON says so); every step runs as a step of the preset's *last* epoch (the method sees a
  `StepContext` shifted there, so every loss term that switches on during the schedule is on:
  CoBra's auxiliary losses, SSC's ASM, SeCo's LiG/LiL/seg/energy terms);
- a per-image stage runs on `--images` photos (CAM export at the preset's scales + flip, the
  random walk, the mask rule (+ CRF where the preset has it), the segmentation evaluation at its
  scales + flip + CRF).
IRN and the segmentation network train on the ground-truth masks as their IR labels / pseudo
masks (a step's cost does not depend on the label values), and train / evaluate once per
distinct parameter block (IRN: cam, fbr, bnr, transcam and seco share IRN's ResNet-50 block,
cobra has ResNet-152, ssc batch 16; the segmentation network is the same for all).

Measured, per stage run (one JSON + one Markdown table in --out):
- images/s: training: `batch x (steps - 1)` over the time from the end of the first step to the
  end of the last (the first step, with the cuDNN search and the loader start, is left out;
  with one step that step is timed and noted); per-image stages: `(images - 1)` over the time
  from the first image's end to the last one's (read off the stage's own progress bar);
  make_masks (a process pool): images over the call's wall time;
- peak GPU memory (`torch.cuda.max_memory_allocated`, reset before each stage; null on CPU);
- training stages: model FLOPs of one step (forward + backward, `FlopCounterMode` around the
  first step), the achieved FLOP/s and the MFU against the card's dense peak for the run's
  precision (PEAKS; fp32 against the plain fp32 peak, beside it against the TF32 peak, since
  cuDNN runs fp32 convolutions on TF32 tensor cores by default); an unknown card gives MFU null;
- every loss term of every step is finite (a non-finite one fails the run);
- fp32 against bf16 autocast (the stages' `precision`): same seed, same batches; the speed-up
  and the difference of the total loss at the last step.

Bounded: `--stage-timeout` seconds per stage run (SIGALRM; a stage past it is recorded as
`timeout`, what needs it is skipped), `--budget` seconds for the whole check (stages that
would start later are recorded as `skipped (budget)`). Defaults for 8 minutes on one H100:
see docs/gpu.md ("Time").

`--tiny` (with `--device cpu`: the same code path on a CPU in under two minutes): 4 photos
(the first of --data resized to a long side of 112 px, or generated toy photos when --data is
absent), 1 step of batch 2, classifier crop 96 (scale range 96-128), IRN crop 96 (its radius-10
path index needs a 24-cell grid), segmentation crop 64, 2 images per per-image stage, CAM export
scales [1.0, 0.5], evaluation scale [1.0] (+ flip + CRF as the preset), loader workers 0, one
thread (no process pools), the runs' files in /dev/shm where it has room.

Exit status: 0 when every stage ran and every loss is finite, 1 otherwise (the files are
written either way).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from wsss_core.config import load_config, method_params, resolve_seg_params, stage_params
from wsss_core.data.index import build_index
from wsss_core.data.toy import generate_toy
from wsss_core.io import write_json
from wsss_core.methods import describe_method
from wsss_core.stages import (eval_seg, export_cams, make_masks, propagate, train_classifier,
                              train_irn, train_seg)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = "../shared/voc_real/voc2012-seg632"
#: train_aug of VOC 2012 + SBD: the length of the paper schedule the shifted steps sit at the end of
VOC_TRAIN_AUG = 10582
TRAINING = ("train_classifier", "train_irn", "train_seg")

#: dense peak TFLOP/s per card (NVIDIA datasheets; the sparse figures are twice these; fp16 as
#: bf16), matched on `torch.cuda.get_device_name()` by `card_of`
PEAKS: dict[str, dict[str, float]] = {
    "H100 SXM": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
}


def card_of(device_name: str) -> str | None:
    """The PEAKS key of a CUDA device name ("NVIDIA H100 80GB HBM3" is the SXM card,
    "NVIDIA H100 PCIe", "NVIDIA H200"), None for any other card (NVL variants included)."""
    name = device_name.upper()
    if "NVL" in name:
        return None
    if "H200" in name:
        return "H200"
    if "H100" in name:
        return "H100 PCIe" if "PCIE" in name else "H100 SXM" if ("HBM3" in name or "SXM" in name) else None
    return None


def rate(count: float, seconds: float) -> float | None:
    """`count / seconds` rounded to 0.01, or None when no measurable time passed.

    A stage can finish inside the clock's resolution (two photos of a tiny run on a fast
    machine); its rate is then unknown, not infinite, and the report shows "-".
    """
    if seconds <= 0 or not math.isfinite(seconds):
        return None
    return round(count / seconds, 2)


def say(*parts: Any) -> None:
    print("[gpu_check]", *parts, file=sys.stderr, flush=True)


# --- bounds -------------------------------------------------------------------------------------

class StageTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise StageTimeout in this (main) thread after `seconds`."""
    def fire(signum, frame):
        raise StageTimeout(f"past {seconds:g} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- probes into the stages' own loops ------------------------------------------------------------

class StepProbe:
    """Wraps the training loop's step and after-step callbacks (engine.fit, as the stage calls
    it): the method sees a StepContext shifted to the end of the paper schedule; records each
    step's end time and losses, and the FLOPs of the first step."""

    def __init__(self, device: torch.device, epochs: int, full_steps: int, steps: int) -> None:
        self.device, self.epochs, self.full_steps, self.steps = device, epochs, full_steps, steps
        self.begin: list[float] = []
        self.end: list[float] = []
        self.raw: list[dict[str, torch.Tensor]] = []  # each step's loss terms (detached)
        self.flops: int | None = None
        self._counter: FlopCounterMode | None = None
        self._ctx = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def shift(self, ctx):
        offset = self.full_steps - self.steps
        return dataclasses.replace(ctx, epoch=self.epochs - 1, epochs=self.epochs,
                                   step=offset + ctx.step, max_step=self.full_steps)

    def wrap(self, step_fn: Callable, after_step: Callable | None):
        def step(batch, ctx):
            self._sync()
            self.begin.append(time.perf_counter())
            if not self.end:  # the first step: count its FLOPs (left out of the timing)
                self._counter = FlopCounterMode(display=False)
                self._counter.__enter__()
            self._ctx = self.shift(ctx)
            losses = step_fn(batch, self._ctx)
            self.raw.append({k: v.detach() for k, v in losses.items() if torch.is_tensor(v)})
            return losses

        def after(ctx):
            if after_step is not None:
                after_step(self._ctx)
            if self._counter is not None:
                self._counter.__exit__(None, None, None)
                self.flops = int(self._counter.get_total_flops())
                self._counter = None
            self._sync()
            self.end.append(time.perf_counter())
        return step, after

    def losses(self) -> list[dict[str, float]]:
        """Each step's loss terms (a step that raised included: a diverged total is in it)."""
        return [{k: float(v.float().mean()) for k, v in s.items()} for s in self.raw]

    def close(self) -> None:
        if self._counter is not None:  # a step that failed between its forward and its end
            self._counter.__exit__(None, None, None)
            self._counter = None


@contextlib.contextmanager
def probed_fit(probe: StepProbe):
    """engine.fit, as the three training stages imported it, with `probe` around the step."""
    real = train_classifier.fit

    def fit(dataset, cfg, step_fn, *args, after_step=None, **kw):
        step, after = probe.wrap(step_fn, after_step)
        return real(dataset, cfg, step, *args, after_step=after, **kw)

    try:
        with patched((train_classifier, train_irn, train_seg), "fit", fit):
            yield
    finally:
        probe.close()


@contextlib.contextmanager
def ticking_bars(ticks: list[float]):
    """The per-image stages' progress bars (tqdm), each also noting when an image is done."""

    class Bar(export_cams.tqdm):  # type: ignore[misc, valid-type]
        def __iter__(self):
            for item in super().__iter__():
                yield item
                ticks.append(time.perf_counter())

        def update(self, n=1):
            ticks.append(time.perf_counter())
            return super().update(n)

    with patched((export_cams, propagate, eval_seg), "tqdm", Bar):
        yield


@contextlib.contextmanager
def patched(modules, name: str, value):
    """`module.name = value` in each of `modules` for the block; the originals afterwards."""
    real = {m: getattr(m, name) for m in modules}
    for m in modules:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, f in real.items():
            setattr(m, name, f)


# --- data -------------------------------------------------------------------------------------

def random_weights(block):
    """Every `pretrained` / `stem_pretrained` flag off, every `pretrained_file` None."""
    if isinstance(block, dict):
        for k in list(block):
            if k.endswith("pretrained"):
                block[k] = False
            elif k == "pretrained_file":
                block[k] = None
            else:
                random_weights(block[k])
    return block


def read_ids(root: Path, name: str) -> list[str]:
    path = root / "ImageSets" / "Segmentation" / f"{name}.txt"
    return [line.split()[0].rsplit("/", 1)[-1].removesuffix(".jpg")
            for line in path.read_text().splitlines() if line.strip()]


def tiny_copy(src: Path, out: Path, count: int, long_side: int) -> Path:
    """The first `count` photos of `src` (train then val) resized to `long_side`, VOC layout."""
    ids = (read_ids(src, "train") + read_ids(src, "val"))[:count]
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for i in ids:
        img = Image.open(src / "JPEGImages" / f"{i}.jpg").convert("RGB")
        mask = Image.open(src / "SegmentationClassAug" / f"{i}.png")
        f = long_side / max(img.size)
        size = (max(1, round(img.size[0] * f)), max(1, round(img.size[1] * f)))
        img.resize(size, Image.BILINEAR).save(out / "JPEGImages" / f"{i}.jpg", quality=95)
        mask.resize(size, Image.NEAREST).save(out / "SegmentationClassAug" / f"{i}.png")
    half = count // 2
    for name, part in (("train_aug", ids[:half]), ("train", ids[:half]), ("val", ids[half:])):
        (out / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in part))
    return out


def prepare_data(a: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """(dataset root in VOC layout, a description)."""
    data = Path(a.data)
    if not data.is_absolute():
        data = (REPO / data).resolve()
    voc = (data / "JPEGImages").is_dir() and (data / "ImageSets" / "Segmentation" / "val.txt").is_file()
    if a.tiny and voc:
        return tiny_copy(data, work / "photos", 4, 112), f"4 photos of {data} at 112 px"
    if voc:
        return data, str(data)
    if not a.tiny:
        raise SystemExit(f"gpu_check: {data}: no VOC folder (JPEGImages/, ImageSets/Segmentation/val.txt); "
                         f"--data names it, --tiny runs on generated toy photos")
    root = work / "toy"
    generate_toy(root, seed=0, image_size=112, num_train_aug=2, num_train_eval=2, num_val=2)
    return root, f"generated toy photos ({data} is absent)"


# --- the check --------------------------------------------------------------------------------

TINY = {
    "train_classifier": {"crop": 96, "scale_range": [96, 128], "batch_size": 2},
    "train_irn": {"crop": 96, "batch_size": 2},
    "train_seg": {"crop": 64, "batch_size": 2},
    "export_cams": {"scales": [1.0, 0.5]},
    "eval_seg": {"scales": [1.0]},
}


class Check:
    def __init__(self, a: argparse.Namespace, work: Path, root: Path) -> None:
        self.a, self.work, self.root = a, work, root
        self.device = torch.device(a.device)
        self.cfg = load_config(REPO / "config.yaml")
        self.cfg["datasets"]["voc"]["root"] = str(root)  # only its `paper` preset is read
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.cache: dict[tuple, Any] = {}  # (stage, params) → its output (IRN, seg network, eval)
        self.failed = False
        lists = {s: str(self._list(s, read_ids(root, s))) for s in ("train_aug", "train", "val")}
        self.index = build_index("gpu_check", "voc", root, lists, progress=False, allow_split_overlap=True)
        self.photos = list(dict.fromkeys(self.index["splits"]["train_aug"] + self.index["splits"]["val"]))
        self.images = self.index["splits"]["val"][:a.images] or self.photos[:a.images]
        self.masks = root / self.index["mask_dir"]
        self.image_index = self._index("images", train_aug=self.images, train=self.images, val=self.images)
        say(f"{len(self.photos)} photos in {root}; {len(self.images)} per per-image stage")

    def _list(self, name: str, ids: list[str]) -> Path:
        path = self.work / "lists" / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{i}\n" for i in ids))
        return path

    def _index(self, name: str, **splits: list[str]) -> Path:
        data = copy.deepcopy(self.index)
        data["splits"].update(splits)
        data["images"] = {i: v for i, v in data["images"].items()
                          if any(i in s for s in data["splits"].values())}
        path = self.work / f"index_{name}.json"
        write_json(path, data)
        return path

    # -- bookkeeping
    def left(self) -> float:
        return self.a.budget - (time.perf_counter() - self.start)

    def _memory(self, reset: bool) -> float | None:
        if self.device.type != "cuda":
            return None
        if reset:
            torch.cuda.reset_peak_memory_stats(self.device)
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)

    def params(self, method: str, stage: str) -> dict:
        p = copy.deepcopy(stage_params(self.cfg, "voc", method, stage))
        if stage == "train_seg":
            p = resolve_seg_params(p)
        if self.a.tiny:
            p.update(copy.deepcopy(TINY.get(stage, {})))
        if stage in TRAINING and self.a.workers is not None:
            p["num_workers"] = self.a.workers
        return p

    def run(self, row: dict, fn: Callable[[], Any], needs: list[Any] = ()) -> Any:
        """Run one stage call under the bounds; fill and record `row`; the call's value or None."""
        self.rows.append(row)
        if any(n is None for n in needs):
            row["status"] = "skipped (an input stage failed)"
            return None
        if self.left() <= 0:
            row["status"] = "skipped (budget)"
            return None
        say(f"{row['method']:9s} {row['stage']:16s} {row.get('precision', ''):5s} ...")
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._memory(reset=True)
        t0 = time.perf_counter()
        limit = min(self.a.stage_timeout, max(self.left(), 1.0))
        try:
            with time_limit(limit):
                value = fn()
            row["status"] = "ok"
        except StageTimeout as e:
            cut = "the budget's end" if limit < self.a.stage_timeout else "--stage-timeout"
            row["status"], value = f"timeout ({e}: {cut})", None
            self.failed = True
        except Exception as e:  # noqa: BLE001 (recorded, the check goes on)
            row["status"], value = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", None
            self.failed = True
        self.last_elapsed = time.perf_counter() - t0
        row["seconds"] = round(self.last_elapsed, 2)
        row["peak_gib"] = self._memory(reset=False)
        return value

    @staticmethod
    def done(row: dict) -> None:
        say(f"{row['method']:9s} {row['stage']:16s} {row.get('precision', ''):5s} {row['status']}, "
            f"{row.get('seconds', 0):.1f} s, {row.get('images_per_s', '-')} img/s, "
            f"peak {row.get('peak_gib', '-')} GiB")

    # -- training
    def train(self, method: str, stage: str, params: dict, precision: str,
              call: Callable[[Path, dict, Path], Any]) -> Path | None:
        batch = int(params["batch_size"])
        steps = max(1, min(self.a.steps, len(self.photos) // batch))
        n = min(steps * batch, len(self.photos))
        row = {"method": method, "stage": stage, "precision": precision, "batch": batch,
               "steps": steps, "crop": params.get("crop")}
        if steps < self.a.steps:
            row["note"] = f"{steps} steps: {len(self.photos)} photos hold {steps} batches of {batch}"
        full = int(params["epochs"]) * max(1, VOC_TRAIN_AUG // batch)
        probe = StepProbe(self.device, int(params["epochs"]), full, steps)
        run_params = dict(params, epochs=1, precision=precision)
        index = self._index(f"train_{n}", train_aug=self.photos[:n])
        # a method's own classifier beside its maps; IRN and segmentation networks apart (shared)
        folder = self.work / (method if stage == "train_classifier" else f"shared/{len(self.cache)}")
        out = folder / f"{stage}-{precision}" / "model.pt"
        out.parent.mkdir(parents=True, exist_ok=True)

        def go():
            with probed_fit(probe):
                call(index, run_params, out)
            return out

        value = self.run(row, go)
        self._fill_training(row, probe, batch, precision)
        if row["status"] == "ok" and not row["finite"]:
            row["status"] = "non-finite loss"
            self.failed = True
            value = None
        self.done(row)
        return value

    def _fill_training(self, row: dict, probe: StepProbe, batch: int, precision: str) -> None:
        end = probe.end
        row["steps_done"] = len(end)
        losses = probe.losses()
        row["finite"] = all(math.isfinite(v) for s in losses for v in s.values())
        if losses:
            row["loss_first"] = losses[0].get("total")
            row["loss_last"] = losses[-1].get("total")
            row["loss_terms"] = sorted(losses[-1])
        if len(end) >= 2:
            step_s = (end[-1] - end[0]) / (len(end) - 1)
        elif len(end) == 1:
            step_s = end[0] - probe.begin[0]
            row["note"] = (row.get("note", "") + "; " if row.get("note") else "") + \
                "one step: its time includes the warm-up and the FLOP count"
        else:
            return
        row["step_s"] = round(step_s, 4)
        row["images_per_s"] = rate(batch, step_s)
        row["gflop_per_step"] = None if probe.flops is None else round(probe.flops / 1e9, 1)
        if probe.flops is None or step_s <= 0:
            return
        achieved = probe.flops / step_s
        row["tflops_per_s"] = round(achieved / 1e12, 2)
        peaks = self.peaks
        row["mfu"] = None if peaks is None else round(achieved / (peaks[precision] * 1e12), 4)
        if precision == "fp32" and peaks is not None:
            row["mfu_tf32"] = round(achieved / (peaks["tf32"] * 1e12), 4)

    def train_once(self, name: str, stage: str, params: dict, run):
        """`train_all` once per distinct parameter block of `stage` (methods that share a block,
        e.g. the same IRN, share its run); the cached result otherwise."""
        key = (stage, json.dumps(params, sort_keys=True))
        if key not in self.cache:
            self.cache[key] = self.train_all(name, stage, params, run)
        return self.cache[key]

    def train_all(self, method: str, stage: str, params: dict,
                  call: Callable[[Path, dict, Path], Any]) -> Path | None:
        """`stage` in every precision; the first precision's model goes on downstream."""
        models = [self.train(method, stage, params, p, call) for p in self.a.precisions]
        return next((m for m in models if m is not None), None)

    # -- per-image stages
    def per_image(self, method: str, stage: str, fn: Callable[[], Any], needs: list[Any],
                  note: str = "", ticked: bool = True) -> Any:
        ticks: list[float] = []
        row = {"method": method, "stage": stage, "images": len(self.images)}
        if note:
            row["note"] = note

        def go():
            with ticking_bars(ticks) if ticked else contextlib.nullcontext():
                return fn()

        value = self.run(row, go, needs)
        if row["status"] == "ok":
            if len(ticks) >= 2:
                row["images_per_s"] = rate(len(ticks) - 1, ticks[-1] - ticks[0])
            else:
                row["images_per_s"] = rate(len(self.images), self.last_elapsed)
                row["note"] = (row.get("note", "") + "; " if row.get("note") else "") + "wall time of the call"
        self.done(row)
        return value

    # -- one method
    def method(self, name: str) -> None:
        mp = random_weights(copy.deepcopy(method_params(self.cfg, "voc", name)))
        sp = mp.get("ssc", {})
        if sp.get("superpixel_generator") == "icd" and not (self.root / sp["superpixel_dir"]).is_dir():
            sp["superpixel_generator"] = "fh_ss64"  # ICD's PNGs are a separate download: our rebuild
        threads = self.a.threads
        tc = self.params(name, "train_classifier")
        classifier = self.train_all(name, "train_classifier", tc, lambda index, p, out: (
            train_classifier.train_classifier(index, mp, p, out, threads=threads)))

        ex = self.params(name, "export_cams")
        cams = self.work / name / "cams.h5"
        cams_ok = self.per_image(name, "export_cams", lambda: export_cams.export_cams(
            self.image_index, classifier, ex, cams, split="train", threads=threads) and cams,
            [classifier], note=f"scales {ex['scales']} + flip")

        irn_p = random_weights(self.params(name, "train_irn"))
        if irn_p["backbone_from"] == "imagenet":
            irn_p["backbone_from"] = "scratch"
        cls = classifier if irn_p["backbone_from"] == "classifier" else None
        irn = self.train_once(name, "train_irn", irn_p, lambda index, p, out: (
            train_irn.train_irn(index, self.masks, p, out, classifier=cls, threads=threads)))

        pp = self.params(name, "propagate")
        rw = self.work / name / "rw.h5"
        rw_ok = self.per_image(name, "propagate", lambda: propagate.propagate(
            self.image_index, cams, irn, pp, rw, threads=threads) or rw, [cams_ok, irn],
            note=f"source {pp['source']}, upsample {pp['upsample']}")

        mm = self.params(name, "make_masks")
        self.per_image(name, "make_masks", lambda: make_masks.make_masks(
            self.image_index, rw, mm, self.work / name / "masks", threads=threads or 1) or True,
            [rw_ok], note=f"rule {mm['rule']}, crf {mm['crf']}, {threads} processes", ticked=False)

        sp = random_weights(self.params(name, "train_seg"))
        cls = classifier if sp["encoder_from"] == "classifier" else None
        seg = self.train_once(name, "train_seg", sp, lambda index, p, out: (
            train_seg.train_seg(index, self.masks, p, out, threads=threads, classifier=cls)))

        ev = self.params(name, "eval_seg")
        key = ("eval_seg", json.dumps([sp, ev], sort_keys=True))
        if key not in self.cache:
            self.cache[key] = self._eval(name, "eval_seg", seg, ev, False)
        if describe_method(mp["plugin"], mp.get("module"))["single_stage"]:
            self._eval(name, "eval_seg (own head)", classifier, ev, True)
        shutil.rmtree(self.work / name, ignore_errors=True)  # its models and maps: done with

    def _eval(self, name: str, stage: str, model: Path | None, ev: dict, from_method: bool) -> Any:
        out = self.work / name / stage.replace(" ", "_")
        return self.per_image(name, stage, lambda: eval_seg.eval_seg(
            self.image_index, model, ev, out / "seg_miou.txt", out / "pred", split="val",
            threads=self.a.threads, from_method=from_method), [model],
            note=f"scales {ev['scales']}, flip {ev['flip']}, crf {ev['crf']}")

    # -- the whole check
    def execute(self) -> dict:
        if self.device.type == "cuda":
            self.card_name = torch.cuda.get_device_name(self.device)
        else:
            self.card_name = "cpu"
        self.card = card_of(self.card_name) if self.device.type == "cuda" else None
        self.peaks = PEAKS.get(self.card) if self.card else None
        os.environ["WSSS_DEVICE"] = str(self.device)
        for name in self.a.methods:
            self.method(name)
        return self.report()

    def report(self) -> dict:
        mixed = []
        if len(self.a.precisions) >= 2:
            base, low = self.a.precisions[0], self.a.precisions[1]
            by = {(r["method"], r["stage"], r.get("precision")): r for r in self.rows}
            for (m, s, p), r in by.items():
                o = by.get((m, s, low))
                if p != base or o is None or not r.get("images_per_s") or o.get("images_per_s") is None:
                    continue
                entry = {"method": m, "stage": s, "speedup": round(o["images_per_s"] / r["images_per_s"], 3),
                         f"loss_{base}": r.get("loss_last"), f"loss_{low}": o.get("loss_last")}
                if r.get("loss_last") is not None and o.get("loss_last") is not None:
                    diff = o["loss_last"] - r["loss_last"]
                    entry["loss_diff"] = diff
                    entry["loss_rel_diff"] = abs(diff) / max(abs(r["loss_last"]), 1e-12)
                mixed.append(entry)
        note = None
        if self.device.type == "cuda" and self.peaks is None:
            note = f"no peak table entry for {self.card_name!r}: MFU is null (PEAKS in bench/gpu_check.py)"
        return {
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "device": str(self.device), "device_name": self.card_name, "card": self.card,
            "peaks_tflops": self.peaks, "peaks_note": note,
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn": torch.backends.cudnn.allow_tf32},
            "torch": torch.__version__, "data": self.data_note, "tiny": self.a.tiny,
            "steps": self.a.steps, "images": len(self.images), "precisions": self.a.precisions,
            "threads": self.a.threads, "budget_s": self.a.budget, "stage_timeout_s": self.a.stage_timeout,
            "seconds": round(time.perf_counter() - self.start, 1),
            "ok": not self.failed and all(r.get("status") == "ok" for r in self.rows),
            "all_finite": all(r.get("finite", True) for r in self.rows),
            "stages": self.rows, "mixed_precision": mixed,
        }


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and spec:
        return format(v, spec)
    return str(v)


def markdown(r: dict) -> str:
    lines = [f"# GPU check: {r['device_name']} ({r['device']}), {r['when']}", "",
             f"torch {r['torch']}; data: {r['data']}; {r['steps']} training steps per stage run, "
             f"{r['images']} images per per-image stage; {r['seconds']} s in all; "
             f"all losses finite: {r['all_finite']}; every stage ok: {r['ok']}.",
             f"Peaks (dense TFLOP/s): {r['peaks_tflops'] or r['peaks_note'] or 'none (CPU)'}.", "",
             "| method | stage | precision | batch x steps / images | img/s | peak GiB | GFLOP/step "
             "| TFLOP/s | MFU | loss first → last | s | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in r["stages"]:
        work = f"{s['batch']} x {s.get('steps_done', 0)}" if "batch" in s else str(s.get("images"))
        mfu = _fmt(s.get("mfu"), ".1%")
        if s.get("mfu_tf32") is not None:
            mfu += f" ({s['mfu_tf32']:.1%} of TF32)"
        loss = (f"{s['loss_first']:.4g} → {s['loss_last']:.4g}" if s.get("loss_first") is not None else "")
        status = s.get("status", "")
        if s.get("note"):
            status += f" ({s['note']})"
        lines.append(f"| {s['method']} | {s['stage']} | {s.get('precision', '')} | {work} | "
                     f"{_fmt(s.get('images_per_s'))} | {_fmt(s.get('peak_gib'))} | "
                     f"{_fmt(s.get('gflop_per_step'))} | {_fmt(s.get('tflops_per_s'))} | {mfu} | "
                     f"{loss} | {_fmt(s.get('seconds'))} | {status} |")
    if r["mixed_precision"]:
        lo, hi = r["precisions"][:2]
        lines += ["", f"Mixed precision ({hi} autocast against {lo}; same seed, same batches):", "",
                  f"| method | stage | speed-up | loss {lo} | loss {hi} | difference (relative) |",
                  "|---|---|---|---|---|---|"]
        for m in r["mixed_precision"]:
            diff = (f"{m['loss_diff']:+.3g} ({m['loss_rel_diff']:.2%})" if "loss_diff" in m else "–")
            lines.append(f"| {m['method']} | {m['stage']} | {m['speedup']:.2f}x | "
                         f"{_fmt(m.get(f'loss_{lo}'), '.5g')} | {_fmt(m.get(f'loss_{hi}'), '.5g')} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help=f"VOC-layout folder (relative paths: from the repository; default {DEFAULT_DATA})")
    p.add_argument("--methods", default=None, help="comma-separated (default: every method of config.yaml)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per training stage run")
    p.add_argument("--images", type=int, default=8, help="images per per-image stage")
    p.add_argument("--precisions", default="fp32,bf16", help="training precisions, the baseline first")
    p.add_argument("--stage-timeout", type=float, default=120.0, help="seconds per stage run")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check")
    p.add_argument("--threads", type=int, default=None,
                   help="the stages' threads (default: every core; 1 with --tiny)")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loader workers of the training stages (default: the preset's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a few photos, 1 step, small crops (CPU)")
    p.add_argument("--work", default=None,
                   help="folder for the runs' files, removed at the end (default: the system's "
                        "temporary folder; with --tiny /dev/shm where it has 4 GiB free)")
    a = p.parse_args(argv)
    cfg_methods = list(load_config(REPO / "config.yaml")["methods"])
    a.methods = a.methods.split(",") if a.methods else cfg_methods
    unknown = [m for m in a.methods if m not in cfg_methods]
    if unknown:
        p.error(f"--methods: {unknown} not in config.yaml ({', '.join(cfg_methods)})")
    a.precisions = a.precisions.split(",")
    if a.tiny:
        a.steps, a.images = 1, min(a.images, 2)
        a.workers = 0 if a.workers is None else a.workers
    if a.threads is None:
        a.threads = 1 if a.tiny else os.cpu_count() or 1
    if a.work is None and a.tiny and os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 4 * 2**30:
        a.work = "/dev/shm"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # the stages read the device from WSSS_DEVICE and set torch's threads: both are put back,
    # so that main() may run inside another process (tests/test_gpu_check.py)
    device_env, torch_threads = os.environ.get("WSSS_DEVICE"), torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check.", dir=a.work) as tmp:
            work = Path(tmp)
            root, data_note = prepare_data(a, work)
            check = Check(a, work, root)
            check.data_note = data_note
            report = check.execute()
    finally:
        if device_env is None:
            os.environ.pop("WSSS_DEVICE", None)
        else:
            os.environ["WSSS_DEVICE"] = device_env
        torch.set_num_threads(torch_threads)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "gpu_check.json", report)
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    say(f"done in {report['seconds']} s: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 0 if report["ok"] and report["all_finite"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
