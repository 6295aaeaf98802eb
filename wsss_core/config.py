"""Configuration: schema validation and per-stage parameter resolution.

A stage's parameters for (dataset, method) are the dataset's preset block
(`presets.<preset>.<stage>`) overlaid by the method's own block for that preset
(`methods.<method>.presets.<preset>.<stage>`). Snakemake passes the resolved dict to the rule
as a param, so changing any value re-runs exactly that stage and what depends on it.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import yaml

from .errors import ConfigError

SCHEMA_DIR = Path(__file__).parent / "schemas"
SCHEMA_PATH = SCHEMA_DIR / "config.schema.yaml"

#: stages whose parameter blocks are defined by a schema in schemas/stages/
STAGES = (
    "train_classifier", "export_cams", "fuse_seeds", "eval_seeds", "ir_labels", "train_irn",
    "propagate", "make_masks", "train_seg", "eval_seg", "audit",
)
#: free-form blocks checked by the method plug-in rather than by a stage schema
PLUGIN_BLOCKS = ("model", "cobra", "seco")


def _key_path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


@lru_cache(maxsize=None)
def _load_schema(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _validator(schema: dict, base: Path):
    import jsonschema
    from referencing import Registry, Resource

    def retrieve(uri: str):
        target = (base / uri.split("#")[0]).resolve()
        return Resource.from_contents(_load_schema(target))

    registry = Registry(retrieve=retrieve)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, registry=registry)


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


def validate_config(cfg: dict) -> dict:
    """Check `cfg` against the schema; raise ConfigError naming the first offending key."""
    import jsonschema

    schema = dict(_load_schema(SCHEMA_PATH))
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
    for d in cfg["datasets"]:
        for m in cfg["methods"]:
            for stage in STAGES:
                stage_params(cfg, d, m, stage)
    return cfg


_DEFAULT_PRESET = {"toy": "tiny", "voc": "paper", "coco": "paper"}


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
            with open(p) as f:
                cfg = deep_merge(cfg, yaml.safe_load(f) or {})
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


def dataset_config(cfg: dict, dataset: str) -> dict:
    try:
        return cfg["datasets"][dataset]
    except KeyError:
        known = ", ".join(sorted(cfg["datasets"]))
        raise ConfigError(f"config key datasets.{dataset}: no such dataset (known: {known})") from None


def method_config(cfg: dict, method: str) -> dict:
    try:
        return cfg["methods"][method]
    except KeyError:
        known = ", ".join(sorted(cfg["methods"]))
        raise ConfigError(f"config key methods.{method}: no such method (known: {known})") from None


def stage_params(cfg: dict, dataset: str, method: str, stage: str) -> dict:
    """The resolved parameter block of `stage` for (dataset, method)."""
    preset = dataset_config(cfg, dataset)["preset"]
    base = cfg["presets"].get(preset, {}).get(stage, {})
    over = method_config(cfg, method).get("presets", {}).get(preset, {}).get(stage, {})
    params = deep_merge(base, over)
    if stage in STAGES:
        schema = _load_schema(SCHEMA_DIR / "stages" / f"{stage}.schema.yaml")
        missing = [k for k in schema.get("properties", {}) if k not in params]
        if missing:
            raise ConfigError(
                f"config key presets.{preset}.{stage}.{missing[0]}: missing (set it in the "
                f"preset or in methods.{method}.presets.{preset}.{stage})")
    return params


def method_params(cfg: dict, dataset: str, method: str) -> dict:
    """Everything a method plug-in needs: its plug-in name and its resolved free-form blocks."""
    preset = dataset_config(cfg, dataset)["preset"]
    out = {"plugin": method_config(cfg, method)["plugin"], "preset": preset}
    for block in PLUGIN_BLOCKS:
        out[block] = stage_params(cfg, dataset, method, block)
    return out
