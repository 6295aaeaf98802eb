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

import contextlib
import errno
import io
import json
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

from .errors import DataError
from .io import temporary_file

#: the stage that writes each store (named in the advice of read errors)
WRITTEN_BY = {"cams.h5": "export_cams", "seeds.h5": "fuse_seeds", "rw.h5": "propagate"}


def _reason(e: BaseException) -> str:
    """HDF5's own words for a failure: its 'error message' field when it has one (the OS error
    of a failed write), otherwise the first line of the exception."""
    text = str(e)
    m = re.search(r"error message = '([^']+)'", text)
    return m.group(1) if m else (text.splitlines() or [type(e).__name__])[0]


def _rerun(path: Path) -> str:
    stage = WRITTEN_BY.get(path.name)
    return f"re-run the {stage} stage" if stage else "re-run the stage that writes it"


def store_error(path: Path, e: BaseException, image_id: str | None = None) -> DataError:
    """One line for an HDF5 failure on `path`: a lock held by another process, a store that is
    missing, or one that is unreadable or damaged (naming the image whose data failed)."""
    text = str(e)
    if "unable to lock file" in text or getattr(e, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK):
        return DataError(
            f"{path}: locked by another process (an open HDF5 viewer or a job still writing it); "
            f"close it or wait, or set HDF5_USE_FILE_LOCKING=FALSE on file systems without locks")
    if isinstance(e, FileNotFoundError) or not path.exists():
        return DataError(f"{path}: map store not found; {_rerun(path)}")
    where = f" (image {image_id})" if image_id is not None else ""
    return DataError(f"{path}: unreadable or damaged map store{where}: {_reason(e)}; delete it "
                     f"and {_rerun(path)}")


def write_error(path: Path, e: BaseException) -> DataError:
    """One line for a failed write of `path` (disk full, quota, file size limit)."""
    return DataError(f"{path}: cannot write the map store ({_reason(e).lower()}); free space in "
                     f"{path.parent} and re-run the stage")


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
        self._broken = False

    def __enter__(self) -> "MapWriter":
        self._tmp = temporary_file(self.path)
        try:
            self._file = h5py.File(self._tmp, "w")
        except (OSError, RuntimeError) as e:
            self._tmp.unlink(missing_ok=True)
            raise write_error(self.path, e) from None
        return self

    def _failed(self, e: BaseException) -> DataError:
        """Close the broken file quietly, remove the temporary and say what failed. HDF5 holds
        written chunks in its cache: a write error not raised here would surface later, in
        object destructors, as a flood of tracebacks and then a segfault."""
        self._broken = True
        # HDF5 still holds chunks and metadata it could not write; closing the file retries
        # them, fails, and leaves the file open for HDF5's exit handler, which then crashes.
        # Pointing the file's descriptor at /dev/null lets those writes succeed and the file
        # close for good (the temporary is deleted anyway).
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._file.id.get_vfd_handle())
            os.close(null)
        except (OSError, RuntimeError, ValueError):
            pass
        # the failed call's frames still hold group and dataset objects of this file: freed
        # now, each would report the write error again through sys.unraisablehook
        hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # h5py prints them too
                traceback.clear_frames(e.__traceback__)
                self._file.close()
        except Exception:
            pass
        finally:
            sys.unraisablehook = hook
        self._tmp.unlink(missing_ok=True)
        return write_error(self.path, e)

    def add(self, image_id: str, keys: np.ndarray | list[int], size: tuple[int, int],
            maps: Mapping[str, np.ndarray], dtypes: Mapping[str, str] | None = None) -> None:
        assert self._file is not None, "use MapWriter as a context manager"
        try:
            self._write_group(image_id, keys, size, maps, dtypes)
        except (OSError, RuntimeError) as e:
            raise self._failed(e) from None

    def _write_group(self, image_id: str, keys, size, maps, dtypes) -> None:
        g = self._file.create_group(image_id)
        g.attrs["keys"] = np.asarray(keys, dtype=np.int64)
        g.attrs["size"] = np.asarray(size, dtype=np.int64)
        for name, arr in maps.items():
            arr = np.asarray(arr)
            dtype = np.dtype((dtypes or {}).get(name, self.dtype))
            chunks = arr.shape if arr.size else None
            ds = g.create_dataset(name, data=arr.astype(dtype), chunks=chunks,
                                  compression="gzip" if arr.size else None,
                                  compression_opts=4 if arr.size else None, shuffle=bool(arr.size))
            ds.flush()  # a failed write (disk full) raises here, not in a destructor
            self._map_names.add(name)

    def copy_image(self, source: MapReader, image_id: str) -> None:
        """Copy one image's group (maps, keys, size) from another store as stored: the same
        chunks, filters and bytes, nothing decoded."""
        assert self._file is not None, "use MapWriter as a context manager"
        with _reading(source.path, image_id):  # the source's own structure, before any write
            group = source._file[image_id]
            names = list(group.keys())
        try:
            source._file.copy(group, self._file, name=image_id)
            self._file.flush()
        except (OSError, RuntimeError) as e:
            if not source.path.is_file() or "read" in str(e).lower():
                raise store_error(source.path, e, image_id) from None
            raise self._failed(e) from None
        except Exception as e:  # noqa: BLE001 - a damaged source (KeyError, ValueError, ...)
            raise store_error(source.path, e, image_id) from None
        self._map_names.update(names)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None and self._tmp is not None
        if self._broken:  # closed by _failed
            return
        try:
            if exc_type is None:
                for k, v in self.attrs.items():
                    self._file.attrs[k] = v if isinstance(v, (str, int, float)) else json.dumps(v)
                self._file.attrs["maps"] = json.dumps(sorted(self._map_names))
                self._file.attrs["complete"] = True
                self._file.flush()
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        except (OSError, RuntimeError) as e:
            raise self._failed(e) from None
        finally:
            if self._tmp.exists():
                self._tmp.unlink()


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


@contextlib.contextmanager
def _reading(path: Path, image_id: str | None = None) -> Iterator[None]:
    """Every HDF5 read of a MapReader runs in here: damage anywhere in the file (a data chunk,
    a B-tree or heap of the group structure, an object header, an attribute) surfaces from
    h5py as OSError, RuntimeError, KeyError, ValueError, ... depending on what was hit; each
    becomes `store_error`'s one line naming the file (and the image)."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py raises many kinds for a damaged file
        raise store_error(path, e, image_id) from None


class MapReader:
    """Random access to a map store: `reader.keys(id)`, `reader.get(id, name)`.

    Every read raises DataError (one line naming the file and, where known, the image) for a
    missing, locked, incomplete or damaged store, whatever part of the file is damaged."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file = None
        try:
            # no lock: a store is never changed once renamed into place, and a reader must not
            # fail because a viewer or another job holds the file open
            self._file = h5py.File(self.path, "r", locking=False)
            complete = self._file.attrs.get("complete", False)
        except Exception as e:  # noqa: BLE001 - see _reading
            self.close()
            raise store_error(self.path, e) from None
        if not complete:
            self.close()
            raise DataError(f"{self.path}: incomplete map store; delete it and {_rerun(self.path)}")

    def __enter__(self) -> "MapReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file; a damaged file's close errors are dropped (the read that met the
        damage has raised already, and nothing was written)."""
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001
                pass

    @property
    def attrs(self) -> dict:
        """File attributes, JSON text decoded."""
        out = {}
        with _reading(self.path):
            items = list(self._file.attrs.items())
        for k, v in items:
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
        with _reading(self.path):
            return {k: v.item() if isinstance(v, np.generic) else v for k, v in self._file.attrs.items()}

    @property
    def map_names(self) -> list[str]:
        return list(self.attrs.get("maps", []))

    def ids(self) -> list[str]:
        """The image ids in file order."""
        with _reading(self.path):
            return list(self._file.keys())

    def agnostic_map_names(self) -> list[str]:
        """Names of the class-agnostic maps (stored as (H, W), not (K, H, W)), read from the
        first image; [] for an empty store."""
        names = self.map_names
        with _reading(self.path):
            first = next(iter(self._file.keys()), None)
            if first is None:
                return []
            group = self._file[first]
            return sorted(n for n in names if n in group and group[n].ndim == 2)

    def __contains__(self, image_id: str) -> bool:
        with _reading(self.path, image_id):
            return image_id in self._file

    def has(self, image_id: str, name: str) -> bool:
        """Whether `image_id` holds map `name` (`map_names` is the union over images: an image
        without a foreground class has no boundary map in rw.h5, for example)."""
        with _reading(self.path, image_id):
            return image_id in self._file and name in self._file[image_id]

    def keys(self, image_id: str) -> np.ndarray:
        """int64 [K]: the segmentation ids of the image's K class maps."""
        with _reading(self.path, image_id):
            return np.asarray(self._file[image_id].attrs["keys"], dtype=np.int64)

    def size(self, image_id: str) -> tuple[int, int]:
        """(H, W) of the image."""
        with _reading(self.path, image_id):
            h, w = self._file[image_id].attrs["size"]
            return int(h), int(w)

    def get(self, image_id: str, name: str, dtype=np.float32) -> np.ndarray:
        """One map of one image, decoded ((K, H, W) or (H, W), `dtype`); any damage raises a
        DataError naming the image."""
        with _reading(self.path, image_id):
            return np.asarray(self._file[image_id][name], dtype=dtype)

    def items(self, name: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(id, keys, map) for every image, one at a time."""
        for image_id in self.ids():
            yield image_id, self.keys(image_id), self.get(image_id, name)
