"""Configuration: schema validation and per-stage parameter resolution.

A stage's parameters for (dataset, method) are the dataset's preset block
(`presets.<preset>.<stage>`) overlaid by the method's own block for that preset
(`methods.<method>.presets.<preset>.<stage>`). Snakemake passes the resolved dict to the rule
as a param, so changing any value re-runs exactly that stage and what depends on it.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

import yaml

from .errors import ConfigError, WSSSError
from .io import read_user_text
from .param_schema import SCHEMA_DIR, stage_defaults
from .param_schema import load_schema as _load_schema
from .param_schema import schema_validator as _validator

SCHEMA_PATH = SCHEMA_DIR / "config.schema.yaml"
#: environment variable naming a folder that Snakemake starts share for what they learn about
#: the code and the config (`workflow_cache_folder`)
CACHE_ENV = "WSSS_CACHE_DIR"


def workflow_cache_folder(workdir: str | Path = ".") -> Path:
    """Where a workflow start keeps what it learnt about the code and the config: the plug-in
    descriptions, each source file's imports, the configs that passed the check. Every entry is
    keyed by the content it was made from, so folders can be shared: `$WSSS_CACHE_DIR` when set
    (one folder for many working folders, e.g. a test session), else
    `<workdir>/.snakemake/wsss-config-cache`."""
    shared = os.environ.get(CACHE_ENV)
    return Path(shared) if shared else Path(workdir) / ".snakemake" / "wsss-config-cache"

#: stages whose parameter blocks are defined by a schema in schemas/stages/
STAGES = (
    "train_classifier", "export_cams", "fuse_seeds", "eval_seeds", "ir_labels", "train_irn",
    "propagate", "make_masks", "train_seg", "eval_seg", "audit",
)
#: the block every plug-in receives, declared or not
MODEL_BLOCK = "model"


def _key_path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def _explain(error) -> str:
    """One line for a schema error; for the oneOf over dataset kinds, the error of the branch
    whose `kind` matches the entry (branches with a different kind are not what the user meant)."""
    import jsonschema

    while error.context:
        wrong_kind = {e.relative_schema_path[0] for e in error.context
                      if list(e.relative_path)[:1] == ["kind"]}
        same_kind = [e for e in error.context if e.relative_schema_path[0] not in wrong_kind]
        if not same_kind:
            kind = error.instance.get("kind") if isinstance(error.instance, dict) else None
            return (f"config key {_key_path([*error.absolute_path, 'kind'])}: {kind!r} is not "
                    f"one of {', '.join(_DEFAULT_PRESET)}")
        error = jsonschema.exceptions.best_match(same_kind)
    return f"config key {_key_path(error.absolute_path)}: {error.message}"


def config_schema(cfg: dict | None = None) -> dict:
    """The config schema: config.schema.yaml with the plug-in names and the settings blocks
    of every registered method (built-in ones, and those `cfg` names by `module`) added, so
    a new method changes no shared schema file."""
    from .methods import describe_methods

    modules = tuple(entry.get("module") for entry in ((cfg or {}).get("methods") or {}).values()
                    if isinstance(entry, dict) and isinstance(entry.get("module"), str))
    described = describe_methods(modules)
    schema = copy.deepcopy(_load_schema(SCHEMA_PATH))
    names = sorted(described)
    method_entry = schema["properties"]["methods"]["additionalProperties"]
    method_entry["properties"]["plugin"]["enum"] = names
    declared: dict[str, list[dict]] = {MODEL_BLOCK: []}
    for name in names:
        for block, fragment in described[name]["blocks"].items():
            declared.setdefault(block, []).append(fragment)
    blocks = schema["$defs"]["stage_blocks"]["properties"]
    for block, fragments in declared.items():
        if block in STAGES:
            raise ConfigError(f"a method declares a settings block named after stage {block!r}")
        # plug-ins sharing a block name (`model`) each check their own keys (validate_config)
        same = fragments and all(f == fragments[0] for f in fragments)
        blocks[block] = fragments[0] if same else {"type": "object",
                                                   "description": "settings of the method"}
    return schema


def validate_config(cfg: dict, plugins: bool = True, cache: str | Path | None = None) -> dict:
    """Check `cfg` against the assembled schema (`config_schema`) and, with `plugins`, every
    method's settings blocks and backbone names (`check_plugin_blocks`); raise ConfigError
    naming the first offending key.

    With a folder `cache`, a config that passed is recorded there under a digest of its content,
    the code of this module and what it imports (the plug-ins included), and the schema files,
    and the same config is not checked again (Snakemake re-reads the Snakefile at every start and
    in every cluster job). A config naming a plug-in kept outside the package is always checked:
    that code is not fingerprinted."""
    import jsonschema

    passed = _passed_marker(cfg, plugins, cache)
    if passed is not None and any(p.is_file() for p in passed):
        return cfg
    schema = config_schema(cfg)
    validator = _validator(schema, SCHEMA_DIR)
    # not best_match: it descends into the oneOf context by itself and may report the
    # "wrong kind" error of a branch the entry was never meant for
    error = max(validator.iter_errors(cfg), key=jsonschema.exceptions.relevance, default=None)
    if error is not None:
        raise ConfigError(_explain(error))
    for name, ds in cfg["datasets"].items():
        if ds["kind"] == "toy":
            n_eval, n_aug = ds.get("num_train_eval", 100), ds.get("num_train_aug", 320)
            if n_eval > n_aug:
                raise ConfigError(
                    f"config key datasets.{name}.num_train_eval: {n_eval} exceeds "
                    f"num_train_aug ({n_aug}); the evaluated subset must lie inside train_aug")
    for name in cfg["datasets"]:
        preset = cfg["datasets"][name]["preset"]
        if preset not in cfg["presets"]:
            raise ConfigError(f"config key datasets.{name}.preset: no block presets.{preset}")
        for block in cfg["datasets"][name].get("overrides") or {}:
            if block not in STAGES:
                raise ConfigError(f"config key datasets.{name}.overrides.{block}: not a stage (a "
                                  f"dataset overrides stage blocks: {', '.join(STAGES)}); set a "
                                  f"method's settings in methods.<method>.presets.{preset}")
    for d in cfg["datasets"]:
        for m in cfg["methods"]:
            for stage in STAGES:
                stage_params(cfg, d, m, stage)
    check_training_batches(cfg)
    check_map_settings(cfg)
    if plugins:
        check_plugin_blocks(cfg, cache)
    if passed is not None:
        passed[0].parent.mkdir(parents=True, exist_ok=True)
        passed[0].touch()
    return cfg


def _passed_marker(cfg: dict, plugins: bool, cache: str | Path | None) -> list[Path] | None:
    """The files that record that `cfg` passed `validate_config` (with `plugins`: the one this
    check writes, then the one a check with plug-ins wrote, which also covers a check without
    them); None where nothing is recorded (no `cache`, or a plug-in module outside the package)."""
    import hashlib
    import json

    from .codehash import source_hash

    methods = cfg.get("methods") or {}
    if cache is None or any(isinstance(e, dict) and e.get("module") for e in methods.values()):
        return None
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    digest.update(source_hash(str(Path(__file__).parent.parent), __name__).encode())
    for f in sorted(SCHEMA_DIR.rglob("*.yaml")):
        digest.update(str(f.relative_to(SCHEMA_DIR)).encode() + b"\0" + f.read_bytes())
    key = digest.hexdigest()
    with_plugins = Path(cache) / f"config-passed-{key}-plugins"
    return [with_plugins] if plugins else [Path(cache) / f"config-passed-{key}", with_plugins]


#: training stages (a `processes` count of their own) and whether a per-process batch of one
#: image fails there: DeepLabV3+'s ASPP pooling branch normalises a [B, C, 1, 1] tensor, so
#: training batch norm needs 2 images per process (SegFormer shares the rule and its settings)
TRAINING_STAGES = {"train_classifier": False, "train_irn": False, "train_seg": True}


def check_map_settings(cfg: dict) -> None:
    """Settings that ask cams.h5 for a map the method's plug-in never exports, which only the
    eval_seeds / ir_labels / fuse_seeds job would find (after training and export): a
    `percentile` background without a class-agnostic map, a seed recipe naming a map that is
    not one of the plug-in's class maps. Read from the plug-in descriptions (no import of
    torch when they are kept).

    Raises: ConfigError naming the key, the method and the maps there are."""
    from .methods import describe_methods
    from .pseudo.seeds import RECIPES

    modules = tuple(e.get("module") for e in cfg["methods"].values()
                    if isinstance(e, dict) and isinstance(e.get("module"), str))
    described = describe_methods(modules)
    for d in cfg["datasets"]:
        for m, entry in cfg["methods"].items():
            info = described.get(entry["plugin"], {})
            if "agnostic_maps" not in info:
                continue
            where = f"(dataset {d}, method {m}: the {entry['plugin']} plug-in"
            if not info["agnostic_maps"]:
                for stage, key in (("eval_seeds", "background"), ("ir_labels", "thresholds")):
                    if stage_params(cfg, d, m, stage).get(key) == "percentile":
                        fix = "constant" if stage == "eval_seeds" else "fixed"
                        raise ConfigError(f"config key {stage}.{key} {where} exports no class-agnostic "
                                          f"map): 'percentile' needs one; use {fix}")
            recipe = stage_params(cfg, d, m, "fuse_seeds").get("recipe")
            if recipe is not None and recipe not in RECIPES and recipe not in info["class_maps"]:
                raise ConfigError(f"config key fuse_seeds.recipe {where} exports the class maps "
                                  f"{info['class_maps']}): {recipe!r} is neither one of them nor one "
                                  f"of {sorted(RECIPES)}")


def rule_processes(cfg: dict, rule: str) -> int:
    """Training processes of `rule`: resources.rules.<rule>.processes over resources.default
    (as rules/common.smk reads them), 1 when unset."""
    res = cfg.get("resources") or {}
    spec = dict(res.get("default") or {}, **((res.get("rules") or {}).get(rule) or {}))
    return int(spec.get("processes", 1))


def train_aug_images(ds: dict) -> int | None:
    """The train_aug image count where the config alone tells it (toy data), else None: a
    VOC/COCO list is counted by the dataset index, and the training job checks it then."""
    return int(ds.get("num_train_aug", 320)) if ds.get("kind") == "toy" else None


def check_training_batches(cfg: dict) -> None:
    """Batch settings that could only fail inside a training job, refused before any job runs:
    a batch that does not split over the stage's processes; with several processes a batch
    larger than train_aug (every process needs full batches: the last one is dropped); and
    for train_seg a per-process batch of one image while batch norm trains (frozen_bn keeps
    only the encoder's in eval mode; the decoder's always trains), counting the images there
    are when that is known (toy data: a batch larger than train_aug is one step of all of them);
    more export_cams shards than toy train_aug images (for VOC / COCO only the dataset index
    knows the count, which Snakemake start does not read: not checked there).

    Raises: ConfigError naming the key (and resources.rules.<stage>.processes)."""
    shards = int(((cfg.get("resources") or {}).get("rules") or {}).get("export_cams", {}).get("shards", 1))
    for name, ds in cfg["datasets"].items():
        n = train_aug_images(ds)
        if n is not None and shards > n:
            raise ConfigError(f"config key resources.rules.export_cams.shards: {shards} jobs for the {n} "
                              f"train_aug images of dataset {name} (datasets.{name}.num_train_aug) leave "
                              f"some without an image; use at most {n}")
        for method in cfg["methods"]:
            for stage, needs_two in TRAINING_STAGES.items():
                procs = rule_processes(cfg, stage)
                block = stage_params(cfg, name, method, stage)
                models = sorted(block["encoders"]) if stage == "train_seg" and "encoders" in block else [None]
                for model in models:
                    params = resolve_seg_params(block, model) if model else block
                    _check_batch(params["batch_size"], procs, n, needs_two,
                                 f"{stage}.batch_size (dataset {name}, method {method}"
                                 f"{f', model {model}' if model else ''})", stage)


def _check_batch(batch: int, procs: int, n: int | None, needs_two: bool, key: str, stage: str) -> None:
    where = f"resources.rules.{stage}.processes"
    if batch % procs:
        raise ConfigError(f"config key {key}: {batch} does not split over the {procs} processes of "
                          f"{where}; set it to a multiple of {procs} or change {where}")
    if procs > 1 and n is not None and n < batch:
        raise ConfigError(f"config key {key}: {batch} exceeds the {n} train_aug images, and the "
                          f"{procs} processes of {where} need full batches; lower it or run one process")
    used = batch if n is None else min(batch, n)
    if needs_two and used // procs < 2:
        why = (f"{batch} over the {procs} processes of {where}" if procs > 1
               else f"the {n} train_aug images" if n is not None and n < batch else f"{batch}")
        raise ConfigError(f"config key {key}: {why} leaves {used // procs} image per process, and "
                          f"batch norm cannot train on one image (DeepLabV3+'s pooling branch); "
                          f"use at least {2 * procs} or fewer processes")


def check_or_exit(check: Callable[[], Any]) -> Any:
    """Run a check of the workflow's config or inputs; a WSSSError ends the run with its one
    line (no traceback) and exit status 2. Used where Snakemake would print a traceback."""
    try:
        return check()
    except WSSSError as e:
        if os.environ.get("WSSS_DEBUG") == "1":
            raise
        exit_with(e)


def exit_with(error: WSSSError) -> NoReturn:
    """Print the error's one line and end the workflow run with exit status 2."""
    print(f"wsss: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def check_plugin_blocks(cfg: dict, cache: str | Path | None = None) -> None:
    """The method plug-ins' own blocks (`model` and the blocks each plug-in declares) of every (method, preset) in
    use, and the backbone names of the stage blocks: what the schema leaves to the plug-ins.
    This imports the plug-ins (torch, timm: seconds), so blocks that passed once are recorded
    in the folder `cache` (with the plug-in code's fingerprint) and not checked again.

    Raises: ConfigError naming the first offending key."""
    import hashlib
    import json

    from .codehash import source_hash

    blocks = {}
    for d, ds in cfg["datasets"].items():
        for m in cfg["methods"]:
            where = f"methods.{m}.presets.{ds['preset']}"
            blocks[where] = (m, method_params(cfg, d, m), stage_params(cfg, d, m, "train_irn")["backbone"])
    code = source_hash(str(Path(__file__).parent.parent), "wsss_core.methods")
    key = hashlib.sha256(json.dumps([blocks, code], sort_keys=True).encode()).hexdigest()
    if cache is not None and (Path(cache) / f"checked-{key}").is_file():
        return

    from .methods.settings import check_backbone_name
    for where, (method, params, irn_backbone) in blocks.items():
        _check_method_settings(cfg, params, method)
        check_backbone_name(irn_backbone, f"{where}.train_irn.backbone")
    if cache is not None:
        Path(cache).mkdir(parents=True, exist_ok=True)
        (Path(cache) / f"checked-{key}").touch()


def _check_method_settings(cfg: dict, params: dict, method: str) -> None:
    """The settings blocks of `method` resolved for one preset (`params`, as `method_params`
    returns them), parsed by the plug-in, and no block the plug-in does not declare."""
    from .methods import method_class

    entry = method_config(cfg, method)
    cls = method_class(entry["plugin"], entry.get("module"))
    own = ((entry.get("presets") or {}).get(params["preset"]) or {})
    for name in own:
        if name not in STAGES and name != MODEL_BLOCK and name not in cls.settings_blocks:
            raise ConfigError(f"config key methods.{method}.presets.{params['preset']}.{name}: the "
                              f"{entry['plugin']} plug-in has no {name} block (its blocks: "
                              f"{', '.join([MODEL_BLOCK, *cls.settings_blocks])}; and the stages)")
    try:
        method_class(params["plugin"], params.get("module")).parse_settings(params)
    except ConfigError as e:
        where = f"methods.{method}.presets.{params['preset']}."
        raise ConfigError(str(e).replace("config key ", f"config key {where}", 1)) from None


_DEFAULT_PRESET = {"toy": "tiny", "voc": "paper", "coco": "paper"}


def require_base_config(cfg: dict, workdir: str | Path, checkout: str | Path) -> None:
    """Check that the project's defaults (config.yaml: `results`, `datasets`, `methods`,
    `presets`) are part of `cfg`. Snakemake reads the Snakefile's `configfile: "config.yaml"`
    from its working directory and skips it when absent there and `--configfile` is given, so a
    run from another folder with only a partial config (e.g. `-d run --configfile
    scripts/voc632.yaml`) would otherwise fail validation on the first missing key.

    Raises:
        ConfigError: a top-level key of the defaults is missing and `workdir` holds no
            config.yaml; the line names the folder and the `--configfile` that fixes it.
    """
    required = _load_schema(SCHEMA_PATH)["required"]
    missing = [key for key in required if key not in cfg]
    if missing and not (Path(workdir) / "config.yaml").is_file():
        raise ConfigError(
            f"config.yaml not found in the working directory {workdir} (config key {missing[0]} "
            f"is missing): pass the defaults first, --configfile {Path(checkout) / 'config.yaml'} "
            f"<your yaml ...>, or run from the checkout")


def apply_defaults(cfg: dict) -> dict:
    """Fill dataset keys left out (so `toy2: {kind: toy, seed: 7}` is a complete entry)."""
    schema = _load_schema(SCHEMA_PATH)["$defs"]
    for name, ds in (cfg.get("datasets") or {}).items():
        if not isinstance(ds, dict) or ds.get("kind") not in _DEFAULT_PRESET:
            continue  # validation reports it
        ds.setdefault("preset", _DEFAULT_PRESET[ds["kind"]])
        block = schema["toy_dataset" if ds["kind"] == "toy" else "voc_dataset"]["properties"]
        for key, spec in block.items():
            if "default" in spec:
                ds.setdefault(key, spec["default"])
        if ds["kind"] != "toy":
            ds.setdefault("lists", {})
            for split in ("train_aug", "train", "val"):
                ds["lists"].setdefault(split, split)
    return cfg


def load_config(path: str | Path, *extra: str | Path) -> dict:
    """Read config.yaml (and any extra files merged over it) and validate it."""
    cfg: dict = {}
    for p in (path, *extra):
        try:
            cfg = deep_merge(cfg, yaml.safe_load(read_user_text(p)) or {})
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return validate_config(apply_defaults(cfg))


def deep_merge(base: dict, over: dict) -> dict:
    """A new dict: `over` overlaid on `base`, recursing into nested dicts (lists replace)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _entry(cfg: dict, kind: str, name: str) -> dict:
    """`cfg[kind + "s"][name]`; ConfigError naming the key and the known names otherwise."""
    try:
        return cfg[f"{kind}s"][name]
    except KeyError:
        known = ", ".join(sorted(cfg[f"{kind}s"]))
        raise ConfigError(f"config key {kind}s.{name}: no such {kind} (known: {known})") from None


def dataset_config(cfg: dict, dataset: str) -> dict:
    """The config entry of `dataset` (ConfigError when there is none)."""
    return _entry(cfg, "dataset", dataset)


def method_config(cfg: dict, method: str) -> dict:
    """The config entry of `method` (ConfigError when there is none)."""
    return _entry(cfg, "method", method)


def stage_params(cfg: dict, dataset: str, method: str, stage: str) -> dict:
    """The resolved parameter block of `stage` for (dataset, method): the dataset's preset
    block, the method's entry for that preset over it, the dataset's own `overrides.<stage>`
    over both (key by key, `deep_merge`)."""
    ds = dataset_config(cfg, dataset)
    preset = ds["preset"]
    base = cfg["presets"].get(preset, {}).get(stage, {})
    over = method_config(cfg, method).get("presets", {}).get(preset, {}).get(stage, {})
    params = deep_merge(deep_merge(base, over), (ds.get("overrides") or {}).get(stage) or {})
    if stage in STAGES:
        # keys with a schema default (e.g. max_steps: null) may be left out: the stage fills them
        # at the door, and a block that leaves them out keeps the Snakemake params (and so the
        # cached results) of the config before the key existed
        schema = _load_schema(SCHEMA_DIR / "stages" / f"{stage}.schema.yaml")
        defaults = stage_defaults(stage)
        missing = [k for k in schema.get("properties", {}) if k not in params and k not in defaults]
        if missing:
            raise ConfigError(
                f"config key presets.{preset}.{stage}.{missing[0]}: missing (set it in the "
                f"preset or in methods.{method}.presets.{preset}.{stage})")
    return params


def method_params(cfg: dict, dataset: str, method: str) -> dict:
    """Everything a method plug-in needs: its plug-in name (and `module`, for one kept outside
    wsss_core/methods) and the resolved settings blocks it declares (`model` always)."""
    from .methods import describe_method

    preset = dataset_config(cfg, dataset)["preset"]
    entry = method_config(cfg, method)
    out = {"plugin": entry["plugin"], "preset": preset}
    if entry.get("module"):
        out["module"] = entry["module"]
    blocks = describe_method(entry["plugin"], entry.get("module"))["blocks"]
    for block in (MODEL_BLOCK, *blocks):
        out[block] = stage_params(cfg, dataset, method, block)
    return out


#: a config layer: (where it came from, e.g. a file name or `--config`, its raw content)
Layer = tuple[str, dict]


def read_config_layers(path: str | Path, extra: tuple[str | Path, ...] = (),
                       overrides: list[str] = ()) -> list[Layer]:
    """The layers of a workflow's config as Snakemake stacks them: `path` (config.yaml), each
    `--configfile` in `extra`, then the `--config KEY=VALUE` items of `overrides` (VALUE read
    as YAML, as Snakemake reads it).

    Raises: ConfigError for a missing or malformed file or an item without `=`."""
    layers: list[Layer] = []
    for p in (path, *extra):
        try:
            layers.append((str(p), yaml.safe_load(read_user_text(p)) or {}))
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if overrides:
        over: dict = {}
        for item in overrides:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ConfigError(f"--config {item!r}: expected KEY=VALUE")
            try:
                over[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                over[key] = value
        layers.append(("--config", over))
    return layers


def config_from_layers(layers: list[Layer]) -> dict:
    """The layers merged (`deep_merge`), defaults applied and validated (without importing
    the plug-ins: `validate_config(plugins=False)`).

    Raises: ConfigError naming the first offending key."""
    cfg: dict = {}
    for _, content in layers:
        cfg = deep_merge(cfg, content)
    return validate_config(apply_defaults(cfg), plugins=False)


def _leaves(block: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    """Nested dict → {key path: value}; lists and other values are leaves (an empty dict too)."""
    out: dict[tuple, Any] = {}
    for k, v in block.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _layer_of(layers: list[Layer], path: tuple) -> str | None:
    """The last layer that sets the config key `path` (what Snakemake's merge keeps)."""
    for name, content in reversed(layers):
        node: Any = content
        for part in path:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return name
    return None


def stage_params_sources(cfg: dict, dataset: str, method: str, block: str,
                         layers: list[Layer] = (), model: str | None = None) -> dict[str, tuple[Any, str]]:
    """The resolved parameter block `block` (a stage, or a method's settings block) of
    (dataset, method), each leaf key with where its value comes from.

    Args:
        cfg: the merged config (`config_from_layers`).
        layers: its layers (`read_config_layers`): each source then names the file (or
            `--config`) that set it last.
        model: for train_seg, resolve for this architecture as the rule does
            (`resolve_seg_params`: `encoder` from `encoders.<model>`, `per_model.<model>`
            over the shared keys); None keeps the config block.

    Returns: {dotted key: (value, source)} in key order, the source a config key path such
    as `presets.tiny.eval_seeds.thresholds.step` or
    `methods.<method>.presets.tiny.eval_seeds.background`, followed by ` (FILE)` with `layers`.

    Raises: ConfigError for an unknown dataset or method, or a block with a missing key."""
    preset = dataset_config(cfg, dataset)["preset"]
    params = stage_params(cfg, dataset, method, block)
    base = ("presets", preset, block)
    over = ("methods", method, "presets", preset, block)
    own = _leaves((((method_config(cfg, method).get("presets") or {}).get(preset) or {})
                   .get(block) or {}))
    ds_path = ("datasets", dataset, "overrides", block)
    ds_own = _leaves((dataset_config(cfg, dataset).get("overrides") or {}).get(block) or {})

    def source(path: tuple) -> str:
        # deep_merge keeps the dataset's leaves over the method's over the preset's, key by key
        full = ((*ds_path, *path) if path in ds_own else (*over, *path) if path in own
                else (*base, *path))
        text = ".".join(map(str, full))
        layer = _layer_of(list(layers), full) if layers else None
        return f"{text} ({layer})" if layer else text

    if model is not None and block == "train_seg":
        flat = resolve_seg_params(params, model)
        leaves = _leaves(params)
        out = {}
        for key in sorted(flat):
            if key == "encoder":
                out[key] = (flat[key], source(("encoders", model)))
            elif key == "model" and model != params.get("model"):
                out[key] = (flat[key], f"the rule's architecture (seg-{model}/)")
            elif ("per_model", model, key) in leaves:
                out[key] = (flat[key], source(("per_model", model, key)))
            else:
                out[key] = (flat[key], source((key,)))
        return out
    return {".".join(map(str, path)): (value, source(path)) for path, value in sorted(_leaves(params).items())}


def resolve_seg_params(block: dict, model: str | None = None) -> dict:
    """The flat training parameters of architecture `model` (default: the block's `model`):
    shared keys, overlaid by `per_model[model]`, with `encoder = encoders[model]`.
    A block that is already flat (no `encoders`) is returned as a copy. Torch-free: the
    workflow resolves it for a rule param at every start.

    Raises: ConfigError for an unknown architecture or one without an encoder."""
    if "encoders" not in block:
        if model is not None and model != block.get("model"):
            raise ConfigError(f"train_seg parameters are resolved for {block.get('model')!r}, "
                              f"not {model!r}")
        return dict(block)
    name = model or block["model"]
    known = _load_schema(SCHEMA_DIR / "stages" / "train_seg.schema.yaml")["properties"]["model"]["enum"]
    if name not in known:
        raise ConfigError(f"segmentation model {name!r} unknown; choose one of {sorted(known)}")
    if name not in block["encoders"]:
        raise ConfigError(f"config key train_seg.encoders.{name}: missing")
    flat = {k: v for k, v in block.items() if k not in ("encoders", "per_model")}
    flat.update((block.get("per_model") or {}).get(name, {}))
    flat["model"] = name
    flat["encoder"] = block["encoders"][name]
    return flat
