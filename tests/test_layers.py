"""The layers of wsss_core: nothing imports upward, and no method plug-in imports another.

Every import of every module counts (top-level, inside functions, under TYPE_CHECKING), read
with `ast` (nothing is imported). A module may import its own floor and the floors below it.

| floor | what                          | modules                                                        |
|-------|-------------------------------|----------------------------------------------------------------|
| 4     | stages                        | stages/*, cli.py, config.py (checks a whole config: the plug-ins' blocks, the seed recipes) |
| 3     | methods / audit               | methods/* (registry, contract, kit, plug-ins), audit/*         |
| 2     | models / metrics / engine     | models/*, metrics.py, engine.py (the training loop and its `StepContext`), checkpoint.py (model files, training checkpoints), optim.py, precision.py, seg_inference.py (segmentation inference), pseudo/* (seed rules `pseudo/seeds.py`, mask rules `pseudo/masks.py`) |
| 1     | data / stores                 | data/* (datasets, index, transforms, the segmentation training augmentation in data/seg_dataset.py, COCO conversion), map_store.py |
| 0     | ops / io / errors             | ops/* (CRF, the process pool `ops/pool.py`, refinement, random walk), io.py, errors.py, codehash.py (reads sources, imports nothing), param_schema.py (the stage parameter schemas), data/palette.py (class names and colours: constants that io.py and ops/refine.py need) |

Method plug-ins: a module of wsss_core/methods/ is shared (`__init__`, `_registry`, `base`,
`common` — the plug-in kit —, `settings`) or belongs to one plug-in (`<name>.py` and its
`<name>_*.py` companions, e.g. `fbr_losses.py`). A plug-in module imports shared modules and
its own plug-in's modules only; a shared module imports no plug-in (the registry finds them by
discovery, not by name).
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wsss_core"

#: module or package (dotted, under wsss_core) → floor; the longest matching prefix wins
FLOORS = {
    "stages": 4, "cli": 4, "config": 4,
    "methods": 3, "audit": 3,
    "models": 2, "metrics": 2, "engine": 2, "checkpoint": 2, "optim": 2, "precision": 2,
    "seg_inference": 2, "pseudo": 2,
    "data": 1, "map_store": 1,
    "ops": 0, "io": 0, "errors": 0, "codehash": 0, "param_schema": 0, "data.palette": 0,
    "": 0,  # wsss_core/__init__.py
}
FLOOR_NAMES = {4: "stages", 3: "methods / audit", 2: "models / metrics / engine",
               1: "data / stores", 0: "ops / io / errors"}
SHARED_METHOD_MODULES = {"", "_registry", "base", "common", "settings"}


def _modules() -> dict[str, Path]:
    """Dotted name relative to wsss_core ('' for the package, 'data.voc', ...) → file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str, path: Path) -> set[str]:
    """The wsss_core modules `name` imports (dotted, relative to wsss_core)."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = ["wsss_core", *package.split(".")] if package else ["wsss_core"]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [(base, [a.name for a in node.names])]
        else:
            continue
        for base, names in targets:
            if base.split(".")[0] != "wsss_core":
                continue
            rel = base[len("wsss_core"):].lstrip(".")
            subs = [f"{rel}.{n}".lstrip(".") for n in names or ()]
            modules = [s for s in subs if s in MODULES]  # `from . import common` imports a module
            if not modules or len(modules) < len(subs):
                modules.append(rel)  # names defined in `rel` itself
            found.update(modules)
    return found


def floor_of(name: str) -> int:
    parts = name.split(".") if name else []
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in FLOORS:
            return FLOORS[key]
    raise KeyError(name)


def plugin_of(name: str) -> str | None:
    """The plug-in a module of wsss_core/methods belongs to; None for a shared module."""
    short = name.removeprefix("methods").lstrip(".")
    if short in SHARED_METHOD_MODULES:
        return None
    return short.split("_")[0]


def test_every_module_has_a_floor():
    unplaced = [m for m in MODULES if not any(m == k or m.startswith(k + ".") for k in FLOORS if k)
                and m != ""]
    assert not unplaced, f"place these modules on a floor in tests/test_layers.py: {unplaced}"


def test_no_module_imports_a_higher_floor():
    upward = []
    for name, path in MODULES.items():
        mine = floor_of(name)
        for target in sorted(_imports(name, path)):
            if floor_of(target) > mine:
                upward.append(f"wsss_core.{name} ({FLOOR_NAMES[mine]}) imports wsss_core.{target} "
                              f"({FLOOR_NAMES[floor_of(target)]})")
    assert not upward, "imports from a higher floor:\n" + "\n".join(upward)


def test_no_plugin_imports_another_plugin():
    crossed = []
    for name, path in MODULES.items():
        if not (name == "methods" or name.startswith("methods.")):
            continue
        mine = plugin_of(name)
        for target in sorted(_imports(name, path)):
            if not target.startswith("methods.") or target == "methods":
                continue
            theirs = plugin_of(target)
            if theirs is not None and theirs != mine:
                who = f"plug-in {mine!r}" if mine else "shared module"
                crossed.append(f"wsss_core.{name} ({who}) imports wsss_core.{target} "
                               f"(plug-in {theirs!r})")
    assert not crossed, ("a plug-in imports another (move the shared part to "
                         "wsss_core/methods/common.py):\n" + "\n".join(crossed))


def test_the_checker_sees_lazy_relative_and_package_imports():
    """The import reader itself: relative imports at any depth, imports inside functions, and
    `from . import module` resolve to the module imported."""
    imports = _imports("stages.make_masks", MODULES["stages.make_masks"])
    assert {"pseudo.masks", "ops.pool", "stages.common", "map_store"} <= imports
    assert "methods._registry" in _imports("methods", MODULES["methods"])
    assert "checkpoint" in _imports("methods._registry", MODULES["methods._registry"])  # lazy
    assert floor_of("data.palette") == 0 and floor_of("data.voc") == 1
    assert plugin_of("methods.fbr_losses") == "fbr" and plugin_of("methods.common") is None


@pytest.mark.parametrize("edited, changes, keeps", [
    ("pseudo/masks.py", ["stages.make_masks", "stages.sweep_masks"],
     ["stages.train_classifier", "stages.export_cams", "stages.fuse_seeds"]),
    ("ops/crf.py", ["stages.ir_labels", "stages.make_masks", "stages.eval_seg"],
     ["stages.train_classifier", "stages.fuse_seeds", "stages.convert_coco"]),
    ("ops/pool.py", ["stages.make_masks", "stages.convert_coco", "stages.fuse_seeds"], []),
    ("methods/fbr_losses.py", ["stages.train_classifier", "stages.export_cams"],
     ["stages.make_masks", "stages.propagate"]),
])
def test_source_fingerprints_follow_the_moved_modules(tmp_path, edited, changes, keeps):
    """codehash follows the new homes: editing a moved module re-fingerprints its users only."""
    from wsss_core.codehash import source_hash

    shutil.copytree(PACKAGE, tmp_path / "wsss_core", ignore=shutil.ignore_patterns("__pycache__"))
    before = {m: source_hash.__wrapped__(str(tmp_path), f"wsss_core.{m}") for m in changes + keeps}
    path = tmp_path / "wsss_core" / edited
    path.write_text(path.read_text() + "\n# an edit\n")
    after = {m: source_hash.__wrapped__(str(tmp_path), f"wsss_core.{m}") for m in before}
    assert [m for m in changes if before[m] == after[m]] == []
    assert [m for m in keeps if before[m] != after[m]] == []


def test_fingerprinting_every_stage_parses_each_module_once(tmp_path, monkeypatch):
    """A workflow start fingerprints ~20 stages that share most modules; each file is parsed
    once (it was parsed once per stage that reaches it: ~580 parses, ~2.5 s of every
    `snakemake` call), and an edited file is parsed again."""
    import ast

    from wsss_core import codehash

    shutil.copytree(PACKAGE, tmp_path / "wsss_core", ignore=shutil.ignore_patterns("__pycache__"))
    parsed: list[str] = []
    real_parse = ast.parse
    monkeypatch.setattr(codehash.ast, "parse", lambda src, *a, **k: parsed.append(src) or real_parse(src, *a, **k))
    stages = sorted(p.stem for p in (tmp_path / "wsss_core" / "stages").glob("*.py") if p.stem != "__init__")
    first = {s: codehash.source_hash.__wrapped__(str(tmp_path), f"wsss_core.stages.{s}") for s in stages}
    files = len(list((tmp_path / "wsss_core").rglob("*.py")))
    assert len(stages) > 15 and 0 < len(parsed) <= files
    edited = tmp_path / "wsss_core" / "stages" / "fuse_seeds.py"
    edited.write_text(edited.read_text() + "\nfrom ..ops import refine  # an edit\n")
    count = len(parsed)
    again = codehash.source_hash.__wrapped__(str(tmp_path), "wsss_core.stages.fuse_seeds")
    assert len(parsed) == count + 1 and again != first["fuse_seeds"]


def test_a_later_process_reads_the_import_cache_and_parses_only_edited_files(tmp_path, monkeypatch):
    """With `keep_import_cache` (the Snakefile's), what each file imports is kept on disk by
    content: a new process (the in-memory caches cleared) parses no file, an edited file is
    parsed again, and a damaged cache file is rebuilt."""
    import ast

    from wsss_core import codehash

    shutil.copytree(PACKAGE, tmp_path / "wsss_core", ignore=shutil.ignore_patterns("__pycache__"))
    parsed: list[bytes] = []
    real_parse = ast.parse
    monkeypatch.setattr(codehash.ast, "parse", lambda src, *a, **k: parsed.append(src) or real_parse(src, *a, **k))
    monkeypatch.setattr(codehash, "_DISK", dict(codehash._DISK))

    def new_process():
        codehash._imports_of.cache_clear()
        codehash.keep_import_cache(tmp_path / "cache")
        parsed.clear()
        return {m: codehash.source_hash.__wrapped__(str(tmp_path), f"wsss_core.{m}")
                for m in ("stages.fuse_seeds", "stages.train_classifier", "methods")}

    first = new_process()
    assert parsed and (tmp_path / "cache" / codehash.CACHE_FILE).is_file()
    assert new_process() == first and parsed == []
    edited = tmp_path / "wsss_core" / "stages" / "fuse_seeds.py"
    edited.write_text(edited.read_text() + "\n# an edit\n")
    after = new_process()
    assert len(parsed) == 1 and after["stages.fuse_seeds"] != first["stages.fuse_seeds"]
    assert {m: h for m, h in after.items() if m != "stages.fuse_seeds"} == {
        m: h for m, h in first.items() if m != "stages.fuse_seeds"}
    (tmp_path / "cache" / codehash.CACHE_FILE).write_text("{not json")
    assert new_process() == after and len(parsed) > 1
    codehash._imports_of.cache_clear()
