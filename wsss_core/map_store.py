"""HDF5 store of dense per-image maps (CAMs, seeds, propagated maps).

Layout: one group per image id holding float maps of shape (K, H, W) (or (H, W) for
class-agnostic maps) for the K classes present, with attributes `keys` (the segmentation ids of
those K classes, 1..C-1) and `size` ((H, W) of the image). File attributes record the method,
the map names and the config that produced the file. Datasets are chunked and compressed;
readers open one image at a time and never load the whole file.

Writers stream into a temporary file beside the target and rename it into place on close, so
a killed job leaves no file that looks complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

from .io import atomic_path


class MapWriter:
    """Context manager: `with MapWriter(path, attrs) as w: w.add(id, keys, size, maps)`."""

    def __init__(self, path: str | os.PathLike, attrs: Mapping[str, Any] | None = None,
                 dtype: str = "float16") -> None:
        self.path = Path(path)
        self.attrs = dict(attrs or {})
        self.dtype = np.dtype(dtype)
        self._file: h5py.File | None = None
        self._tmp: Path | None = None
        self._map_names: set[str] = set()

    def __enter__(self) -> "MapWriter":
        # io.atomic_path: a temporary file beside the target, renamed into place on success
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._file = h5py.File(self._tmp, "w")
        return self

    def add(self, image_id: str, keys: np.ndarray | list[int], size: tuple[int, int],
            maps: Mapping[str, np.ndarray], dtypes: Mapping[str, str] | None = None) -> None:
        assert self._file is not None, "use MapWriter as a context manager"
        g = self._file.create_group(image_id)
        g.attrs["keys"] = np.asarray(keys, dtype=np.int64)
        g.attrs["size"] = np.asarray(size, dtype=np.int64)
        for name, arr in maps.items():
            arr = np.asarray(arr)
            dtype = np.dtype((dtypes or {}).get(name, self.dtype))
            chunks = arr.shape if arr.size else None
            g.create_dataset(name, data=arr.astype(dtype), chunks=chunks,
                             compression="gzip" if arr.size else None, compression_opts=4 if arr.size else None,
                             shuffle=bool(arr.size))
            self._map_names.add(name)

    def copy_image(self, source: MapReader, image_id: str) -> None:
        """Copy one image's group (maps, keys, size) from another store as stored: the same
        chunks, filters and bytes, nothing decoded."""
        assert self._file is not None, "use MapWriter as a context manager"
        group = source._file[image_id]
        source._file.copy(group, self._file, name=image_id)
        self._map_names.update(group.keys())

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None and self._tmp is not None
        try:
            if exc_type is None:
                for k, v in self.attrs.items():
                    self._file.attrs[k] = v if isinstance(v, (str, int, float)) else json.dumps(v)
                self._file.attrs["maps"] = json.dumps(sorted(self._map_names))
                self._file.attrs["complete"] = True
            self._file.close()
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise
        self._atomic.__exit__(exc_type, exc, tb)


@dataclass(frozen=True)
class MapRoles:
    """Which exported map plays which part downstream (names as in `Method.maps`).

    walk: the class map whose stride-4 copy the random walk propagates ("" = none);
    fuse: the class maps seed fusion combines, in the order its recipes read them;
    agnostic: the class-agnostic map per-image IR-label thresholds are read from ("" = none).
    """
    walk: str = ""
    fuse: tuple[str, ...] = ()
    agnostic: str = ""


def map_roles(attrs: Mapping[str, Any]) -> MapRoles:
    """The MapRoles recorded in a cams.h5's attributes (`roles`, written by export_cams);
    stores without it name only the walk map (`propagate_map`, stride-4 name)."""
    roles = attrs.get("roles")
    if isinstance(roles, dict):
        return MapRoles(walk=roles.get("walk", ""), fuse=tuple(roles.get("fuse", ())),
                        agnostic=roles.get("agnostic", ""))
    walk = str(attrs.get("propagate_map", ""))
    return MapRoles(walk=walk[:-3] if walk.endswith("_s4") else walk)


class MapReader:
    """Random access to a map store: `reader.keys(id)`, `reader.get(id, name)`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except (OSError, FileNotFoundError) as e:
            from .errors import DataError
            raise DataError(f"{self.path}: cannot open map store ({e}); re-run the stage that writes it") from None
        if not self._file.attrs.get("complete", False):
            from .errors import DataError
            raise DataError(f"{self.path}: incomplete map store; delete it and re-run its stage")

    def __enter__(self) -> "MapReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def attrs(self) -> dict:
        out = {}
        for k, v in self._file.attrs.items():
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    pass
            out[k] = v
        return out

    @property
    def stored_attrs(self) -> dict:
        """File attributes as written (JSON text left undecoded), numbers as Python numbers:
        what a MapWriter needs to write the same attributes again."""
        return {k: v.item() if isinstance(v, np.generic) else v for k, v in self._file.attrs.items()}

    @property
    def map_names(self) -> list[str]:
        return list(self.attrs.get("maps", []))

    def ids(self) -> list[str]:
        return list(self._file.keys())

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._file

    def keys(self, image_id: str) -> np.ndarray:
        return np.asarray(self._file[image_id].attrs["keys"], dtype=np.int64)

    def size(self, image_id: str) -> tuple[int, int]:
        h, w = self._file[image_id].attrs["size"]
        return int(h), int(w)

    def get(self, image_id: str, name: str, dtype=np.float32) -> np.ndarray:
        return np.asarray(self._file[image_id][name], dtype=dtype)

    def items(self, name: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(id, keys, map) for every image, one at a time."""
        for image_id in self.ids():
            yield image_id, self.keys(image_id), self.get(image_id, name)
