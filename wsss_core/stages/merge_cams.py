"""Stage `merge_cams`: join the shard files of a sharded CAM export into one cams.h5.

The shards (`export-cams --shard i/n`) must be 1/n .. n/n of one export: the same attributes
apart from `shard`, disjoint image ids that together are the split's. Each image's group is
copied as stored (same chunks, compression and bytes) and the file attributes are the
shards' without `shard`, so the result is the file an unsharded export writes and MapReader
reads it unchanged. Written under a temporary name and renamed into place.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..data.index import DatasetIndex
from ..errors import DataError
from ..map_store import MapReader, MapWriter
from . import common

log = logging.getLogger("wsss")

#: attributes that are the shard's own or that the writer recomputes
_SHARD_ONLY = ("shard", "maps", "complete")


def merge_cams(index: str | Path, shards: list[str | Path], out: str | Path) -> dict:
    idx = DatasetIndex.load(index)
    t0 = time.perf_counter()
    readers = [MapReader(p) for p in shards]
    try:
        attrs = _common_attrs(readers)
        expected = idx.ids(attrs["split"])
        owner: dict[str, MapReader] = {}
        for r in readers:
            for image_id in r.ids():
                if image_id in owner:
                    raise DataError(f"{r.path}: image {image_id} is also in {owner[image_id].path}; "
                                    f"re-run the export of every shard")
                owner[image_id] = r
        missing = [i for i in expected if i not in owner]
        extra = sorted(set(owner) - set(expected))
        if missing or extra:
            which = f"{len(missing)} of the split's images missing (e.g. {missing[0]})" if missing \
                else f"{len(extra)} images not in the split (e.g. {extra[0]})"
            raise DataError(f"merge-cams: the shards do not cover split {attrs['split']} of "
                            f"{index}: {which}; re-run the export of every shard")
        with MapWriter(out, attrs) as writer:
            for image_id in expected:
                writer.copy_image(owner[image_id], image_id)
    finally:
        for r in readers:
            r.close()
    seconds = time.perf_counter() - t0
    log.info("merged %d shards (%d images) into %s in %.1f s", len(readers), len(expected), out,
             seconds)
    return {"images": len(expected), "seconds": seconds}


def _common_attrs(readers: list[MapReader]) -> dict:
    """The attributes every shard shares, once each of shards 1/n .. n/n is present."""
    if not readers:
        raise DataError("merge-cams: no shard files given")
    seen: dict[int, Path] = {}
    total = None
    reference = None
    for r in readers:
        attrs = r.stored_attrs
        try:
            i, n = (int(v) for v in str(attrs["shard"]).split("/"))
        except (KeyError, ValueError):
            raise DataError(f"{r.path}: not a shard of a CAM export (no `shard` attribute); "
                            f"write it with export-cams --shard i/n") from None
        if total is None:
            total = n
        if n != total or i in seen:
            raise DataError(f"{r.path}: shard {i}/{n} does not fit the other shards "
                            f"({sorted(seen)} of {total}); pass each of 1/{total} .. "
                            f"{total}/{total} once")
        seen[i] = r.path
        shared = {k: v for k, v in attrs.items() if k not in _SHARD_ONLY}
        if reference is None:
            reference = (shared, r.path)
        elif shared != reference[0]:
            key = next(k for k in sorted(set(shared) | set(reference[0]))
                       if shared.get(k) != reference[0].get(k))
            raise DataError(f"{r.path}: attribute {key!r} differs from {reference[1]}'s; the "
                            f"shards come from different exports, re-run every shard")
    if len(seen) != total:
        absent = [i for i in range(1, total + 1) if i not in seen]
        raise DataError(f"merge-cams: shard {absent[0]}/{total} missing; pass all {total} shards")
    return reference[0]


def main(argv: list[str] | None = None) -> int:
    p = common.parser("merge-cams", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--out", required=True, help="cams.h5")
    p.add_argument("shards", nargs="+", help="the shard files, cams_shards/<i>-of-<n>.h5")
    a = p.parse_args(argv)
    return common.run_stage(a, merge_cams, index=a.index, shards=a.shards, out=a.out)


if __name__ == "__main__":
    raise SystemExit(main())
