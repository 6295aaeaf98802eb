"""Source fingerprints: a stage's module and every wsss_core module it imports, transitively.

Each rule passes its stage's fingerprint as a param, so editing a stage's code (or code it
uses) re-runs that stage and what follows, while editing an unrelated module re-runs nothing.
Comments and formatting count as changes: the hash is over the source bytes.

Snakemake parses the workflow at every start (and twice per cluster job), so what each file
imports can be kept on disk (`keep_import_cache`): a file is parsed only when its bytes are new
to the cache.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

PACKAGE = "wsss_core"
#: a package's registry module (methods/_registry.py): it depends on every module beside it
REGISTRY = "_registry.py"
#: the on-disk import cache: its file, and the entries read from it or added this process
_DISK: dict = {"path": None, "entries": None, "dirty": False}
CACHE_FILE = "codehash-imports.json"


def keep_import_cache(folder: str | Path | None) -> None:
    """Keep what each source file imports in `folder` (`codehash-imports.json`), under its module's
    dotted name and a digest of its bytes, so a later process parses only files it has not seen. The
    Snakefile calls it; None keeps the cache in memory only. A damaged cache file is ignored
    and rewritten."""
    _DISK.update(path=None if folder is None else Path(folder) / CACHE_FILE, entries=None,
                 dirty=False)


def _disk_entries() -> dict:
    if _DISK["entries"] is None:
        entries = {}
        if _DISK["path"] is not None:
            try:
                loaded = json.loads(_DISK["path"].read_text())
                entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                pass
        _DISK["entries"] = entries
    return _DISK["entries"]


def _save_disk_entries() -> None:
    """Write the cache (temporary name, then renamed: a concurrent start reads a whole file or
    none; the last writer's entries win, and a lost entry is parsed again)."""
    path = _DISK["path"]
    if path is None or not _DISK["dirty"]:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_DISK["entries"], sort_keys=True))
        os.replace(tmp, path)
        _DISK["dirty"] = False
    except OSError:
        pass  # a read-only folder: the cache stays in memory


def _module_file(root: Path, dotted: str) -> Path | None:
    base = root.joinpath(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _dotted_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(root: Path, path: Path) -> set[Path]:
    """Files of the wsss_core modules `path` imports (absolute or relative).

    Each file is parsed once per process and version: the result is cached under its path,
    size and modification time (a workflow start hashes ~20 stages that share most modules)."""
    st = path.stat()
    return set(_imports_of(root, path, st.st_size, st.st_mtime_ns))


@lru_cache(maxsize=None)
def _imports_of(root: Path, path: Path, size: int, mtime_ns: int) -> frozenset[Path]:
    """`_imports` of one version (size, mtime_ns) of `path`."""
    name = _dotted_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[Path] = set()
    for target in _import_targets(path.read_bytes(), name, package):
        # a package import also runs the package's __init__
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            f = _module_file(root, ".".join(parts[:i]))
            if f is not None:
                found.add(f)
    if path.name == REGISTRY:
        # a registry imports the modules of its package by discovery, not by name: they are
        # its dependencies all the same (editing a method re-runs the stages that run it)
        found.update(f for f in path.parent.glob("*.py") if not f.name.startswith("_"))
    return frozenset(found)


def _import_targets(source: bytes, name: str, package: str) -> list[str]:
    """The wsss_core modules a source imports, as dotted names with relative imports resolved
    (`from .x import y` gives both `pkg.x` and `pkg.x.y`: either may be the module); read from
    the on-disk cache when it holds the same bytes of the same module."""
    key = f"{name}:{hashlib.blake2b(source, digest_size=16).hexdigest()}"
    entries = _disk_entries()
    if isinstance(entries.get(key), list):
        return entries[key]
    targets: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        targets.extend(t for t in found if t.split(".")[0] == PACKAGE and t not in targets)
    entries[key] = targets
    _DISK["dirty"] = True
    return targets


@lru_cache(maxsize=None)
def source_hash(root: str, module: str) -> str:
    """SHA-256 over the sources of `module` (e.g. 'wsss_core.stages.fuse_seeds') and its
    transitive wsss_core imports; `root` is the folder that holds the wsss_core package."""
    base = Path(root)
    start = _module_file(base, module)
    if start is None:
        raise FileNotFoundError(f"{module}: no such module under {base}")
    seen: set[Path] = set()
    todo = [start]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(_imports(base, f) - seen)
    _save_disk_entries()
    digest = hashlib.sha256()
    for f in sorted(seen):
        digest.update(str(f.relative_to(base)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
