"""Stage `fuse_seeds`: fuse the exported maps into one seed map per image (seeds.h5).

The maps a recipe reads are the ones the method declared for fusion (`roles` in cams.h5,
written by export_cams), so recipes stay generic over map names."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from ..errors import ConfigError
from ..map_store import MapReader, MapWriter, map_roles
from ..pseudo.seeds import fuse, recipe_inputs
from . import common

log = logging.getLogger("wsss")


def fuse_seeds(cams: str | Path, params: dict, out: str | Path) -> None:
    recipe = params["recipe"]
    with MapReader(cams) as reader:
        needs = recipe_inputs(recipe, map_roles(reader.attrs).fuse)
        if not needs:
            raise ConfigError(f"config key fuse_seeds.recipe: {recipe!r} fuses the method's fuse "
                              f"maps, but {cams} declares none; name one of {reader.map_names}")
        missing = [n for n in needs if n not in reader.map_names]
        if missing:
            raise ConfigError(f"config key fuse_seeds.recipe: {recipe!r} needs map(s) {missing}, but "
                              f"{cams} holds {reader.map_names}; choose a recipe this method exports")
        # the stride-4 maps fused the same way, for `propagate.source: fused` (docs/algorithms.md §walk)
        strided = all(n + "_s4" in reader.map_names for n in needs)
        attrs = {"recipe": recipe, "source": str(cams), "method": reader.attrs.get("method", ""),
                 "params": json.dumps(params, sort_keys=True), "strided": int(strided)}
        with MapWriter(out, attrs) as writer:
            for image_id in tqdm(reader.ids(), desc=f"fuse {recipe}", unit="img", mininterval=2.0):
                seeds = {"seed": fuse(recipe, [reader.get(image_id, n) for n in needs])}
                if strided:
                    seeds["seed_s4"] = fuse(recipe, [reader.get(image_id, n + "_s4") for n in needs])
                writer.add(image_id, reader.keys(image_id), reader.size(image_id), seeds)
    log.info("fused seeds with recipe %s", recipe)


def main(argv: list[str] | None = None) -> int:
    p = common.parser("fuse-seeds", __doc__)
    p.add_argument("--cams", required=True)
    p.add_argument("--params", required=True, type=common.json_arg)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    return common.run_stage(a, fuse_seeds, stage="fuse_seeds",
                            cams=a.cams, params=a.params, out=a.out)


if __name__ == "__main__":
    raise SystemExit(main())
