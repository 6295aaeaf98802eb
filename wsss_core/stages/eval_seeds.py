"""Stage `eval_seeds`: seed mIoU on the evaluation split, background score swept over a grid.

Two protocols (docs/algorithms.md §seed-protocols), each scored in one pass over the images (one confusion matrix per
grid point) and reported at its arg-max:
  * constant: one background score for every image, swept over `thresholds` (IRN practice);
  * percentile: per image, the θ-th percentile of the method's class-agnostic map (numpy
    linear percentile), θ swept over `percentiles` (the whole grid, arg-max reported; the
    method page says which official script it reproduces).
The constant sweep always runs; the percentile sweep runs whenever cams.h5 holds a
class-agnostic map (`agnostic_map`: its name, or null for the only one there is).

`official` (null, or a block) adds the number the method's own evaluation script prints,
at its fixed setting (docs/algorithms.md §seed-protocols):
  * rule `constant`: one background score `threshold` (IRN eval_cam.py 0.15; other methods'
    scripts other values);
  * rule `sweep`: the arg-max over the official `grid` (a script that sweeps a fixed grid);
  * rule `percentile`: the percentile sweep above;
  `map: view` scores the method's fuse map exported at export_cams.seed_view (`<name>_view`
  in cams.h5) instead of the seed (the official evaluation view of a ViT method, e.g. a
  448 x 448 view, one scale + flip).
The method pages under docs/methods/ say which rule and setting each method's preset uses.

`background` says which protocol is `seed_miou.txt` (constant / percentile: the sweep's
arg-max; official: the official number); seed_metrics.json keeps every curve (`curve` /
`threshold`: constant; `percentile_curve` / `percentile`: per image; `official`: the
official block's number, its setting and, for a sweep, its curve).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.index import DatasetIndex
from ..errors import ConfigError, DataError
from ..map_store import MapReader, map_roles
from ..metrics import (ConfusionMatrix, check_ground_truth, check_scorable, mask_dir_of,
                       no_ground_truth_report,
                       threshold_grid, write_metrics)
from ..pseudo.seeds import percentile_seed_labels_sweep, seed_labels_sweep
from . import common

log = logging.getLogger("wsss")


def agnostic_map(cams: MapReader | None, params: dict) -> str | None:
    """The class-agnostic map the percentile protocol reads, or None when there is none.

    Raises ConfigError when `agnostic_map` names a map cams.h5 does not hold as class-agnostic,
    when it is null and there are several, or when `background: percentile` finds none."""
    wanted = params.get("agnostic_map")
    names = cams.agnostic_map_names() if cams is not None else []
    if wanted is not None and wanted not in names:
        raise ConfigError(f"config key eval_seeds.agnostic_map: {wanted!r} is not a class-agnostic "
                          f"map of {cams.path if cams else 'the method (no cams.h5 given)'} "
                          f"(it has {names}); set it to one of them or null")
    if wanted is None and len(names) > 1:
        raise ConfigError(f"config key eval_seeds.agnostic_map: {cams.path} holds several "
                          f"class-agnostic maps {names}; name the one to read")
    name = wanted or (names[0] if names else None)
    if name is None and params.get("background", "constant") == "percentile":
        raise ConfigError("config key eval_seeds.background: 'percentile' needs a class-agnostic map "
                          "of the method (an attention map), and it exports none; use constant")
    return name


def official_source(cams: MapReader | None, official: dict | None) -> str | None:
    """The cams.h5 map the official protocol reads instead of the seed (`map: view`: the one
    fuse map exported at export_cams.seed_view, `<name>_view`), or None for the seed.

    Raises ConfigError when the view is not there or the method fuses several maps (the view
    holds unfused maps; the recipe is fuse_seeds')."""
    if not official or official.get("map", "seed") == "seed":
        return None
    if official["rule"] == "percentile":
        raise ConfigError("config key eval_seeds.official.map: view goes with rule constant or "
                          "sweep, not percentile")
    fuse = map_roles(cams.attrs).fuse if cams is not None else ()
    if len(fuse) != 1:
        raise ConfigError(f"config key eval_seeds.official.map: view needs a method with one fuse "
                          f"map (it has {list(fuse)}); set it to seed")
    name = fuse[0] + "_view"
    if name not in cams.map_names:
        raise ConfigError(f"config key eval_seeds.official.map: view reads {name!r}, which "
                          f"{cams.path} does not hold; set export_cams.seed_view (the official "
                          f"view) and re-export, or set official.map: seed")
    return name


def official_thresholds(official: dict | None) -> list[float]:
    """The constant background scores the official rule scores: [threshold] (constant), the
    grid (sweep), none (percentile: the percentile sweep is the official number)."""
    if not official or official["rule"] == "percentile":
        return []
    if official["rule"] == "constant":
        return [round(float(official["threshold"]), 6)]
    return threshold_grid(official["grid"])


def eval_seeds(index: str | Path, seeds: str | Path, params: dict, out: str | Path,
               split: str = "train", cams: str | Path | None = None) -> dict:
    """Score seeds.h5 on `split` with both protocols and write seed_miou.txt (the arg-max of
    `params["background"]`) and seed_metrics.json beside it. `cams` (cams.h5) supplies the
    class-agnostic map of the percentile protocol; without it only the constant sweep runs.

    Only the images of `split` with a ground-truth mask are scored; when none has one, both
    files say `no ground truth` (metrics.no_ground_truth_report). Raises DataError when a scored
    image has no map, or when every ground-truth pixel of the split is 255 (ignore)."""
    background = params.get("background", "constant")  # its values: checked at the door (run_stage)
    official = params.get("official")
    if background == "official" and not official:
        raise ConfigError("config key eval_seeds.background: 'official' needs the method's "
                          "eval_seeds.official block (rule, threshold or grid); it is null")
    idx = DatasetIndex.load(index)
    ids = check_ground_truth(idx, split, f"the seeds {seeds}")
    if not ids:
        report = no_ground_truth_report(split, len(idx.ids(split)), protocol=background)
        write_metrics(out, report)
        log.warning("no ground truth: none of the %d images of %s has a mask; seeds not scored",
                    report["split_images"], split)
        return report
    thresholds = threshold_grid(params["thresholds"])
    cms = [ConfusionMatrix(idx.num_classes) for _ in thresholds]
    all_background = ConfusionMatrix(idx.num_classes)
    off_ts = official_thresholds(official)
    ocms = [ConfusionMatrix(idx.num_classes) for _ in off_ts]
    with MapReader(seeds) as reader, (MapReader(cams) if cams else nullcontext()) as maps:
        att_name = agnostic_map(maps, params)
        if official and official["rule"] == "percentile" and not att_name:
            raise ConfigError("config key eval_seeds.official.rule: 'percentile' needs a "
                              "class-agnostic map of the method, and it exports none")
        view = official_source(maps, official)
        percentiles = threshold_grid(params["percentiles"]) if att_name else []
        pcms = [ConfusionMatrix(idx.num_classes) for _ in percentiles]
        for image_id in tqdm(ids, desc="eval seeds", unit="img", mininterval=2.0):
            if image_id not in reader or ((att_name or view) and image_id not in maps):
                raise DataError(f"{seeds if image_id not in reader else cams}: no map for {image_id} "
                                f"of split {split}; re-run export_cams/fuse_seeds over a train_aug "
                                f"that contains {split}")
            seed, keys = reader.get(image_id, "seed"), reader.keys(image_id)
            gt = idx.mask(image_id)
            if view:
                preds = seed_labels_sweep(seed, keys, thresholds)
                preds += seed_labels_sweep(maps.get(image_id, view), maps.keys(image_id), off_ts)
            else:  # one arg-max for both grids
                preds = seed_labels_sweep(seed, keys, thresholds + off_ts)
            for pred, cm in zip(preds, cms + ocms):
                cm.update(pred, gt)
            if att_name:
                att = maps.get(image_id, att_name)
                for pred, cm in zip(percentile_seed_labels_sweep(seed, keys, att, percentiles), pcms):
                    cm.update(pred, gt)
            all_background.update(np.zeros_like(gt), gt)
    check_scorable(all_background, split, mask_dir_of(idx), f"the seeds {seeds}")
    curve = {f"{t:g}": cm.miou() * 100 for t, cm in zip(thresholds, cms)}
    best_t = int(np.nanargmax([cm.miou() for cm in cms]))
    extra = {"protocol": background, "threshold": thresholds[best_t], "curve": curve,
             "best": {"constant": cms[best_t].miou() * 100}}
    best = cms[best_t]
    if att_name:
        best_p = int(np.nanargmax([cm.miou() for cm in pcms]))
        extra.update(agnostic_map=att_name, percentile=percentiles[best_p],
                     percentile_curve={f"{p:g}": cm.miou() * 100 for p, cm in zip(percentiles, pcms)})
        extra["best"]["percentile"] = pcms[best_p].miou() * 100
        if background == "percentile":
            best = pcms[best_p]
    if official:
        block = {"name": official.get("name", ""), "rule": official["rule"],
                 "map": official.get("map", "seed")}
        if official["rule"] == "percentile":
            ocm = pcms[best_p]
            block.update(percentile=percentiles[best_p])
        else:
            best_o = int(np.nanargmax([cm.miou() for cm in ocms]))
            ocm = ocms[best_o]
            block.update(threshold=off_ts[best_o])
            if official["rule"] == "sweep":
                block.update(curve={f"{t:g}": cm.miou() * 100 for t, cm in zip(off_ts, ocms)})
        block["miou"] = extra["best"]["official"] = ocm.miou() * 100
        extra["official"] = block
        if background == "official":
            best = ocm
    report = best.report(idx.class_names, split=split, all_background_miou=all_background.miou() * 100,
                         split_images=len(idx.ids(split)), **extra)
    write_metrics(out, report)
    log.info("seed mIoU %.2f (%s protocol); constant sweep %.2f at %g%s%s (all-background %.2f)",
             report["miou"], background, extra["best"]["constant"], thresholds[best_t],
             f"; percentile sweep of {att_name} {extra['best']['percentile']:.2f} at "
             f"{extra['percentile']:g}" if att_name else "",
             f"; official ({official.get('name', official['rule'])}) "
             f"{extra['best']['official']:.2f}" if official else "", report["all_background_miou"])
    return report


def main(argv: list[str] | None = None) -> int:
    p = common.parser("eval-seeds", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--seeds", required=True)
    p.add_argument("--cams", help="cams.h5: the class-agnostic map of the percentile protocol")
    p.add_argument("--params", required=True, type=common.json_arg)
    p.add_argument("--out", required=True, help="seed_miou.txt (seed_metrics.json beside it)")
    p.add_argument("--split", default="train")
    a = p.parse_args(argv)
    return common.run_stage(a, eval_seeds, stage="eval_seeds",
                            index=a.index, seeds=a.seeds, params=a.params,
                            out=a.out, split=a.split, cams=a.cams)


if __name__ == "__main__":
    raise SystemExit(main())
