"""The JSON schemas of the stage parameter blocks (schemas/stages/<stage>.schema.yaml) and the
check of a stage's `--params` against them.

Torch-free and free of the method plug-ins: every stage entry point imports it (through
stages/common.py), so what it imports is part of every stage's code fingerprint.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import yaml

from .errors import ConfigError

SCHEMA_DIR = Path(__file__).parent / "schemas"
STAGE_SCHEMA_DIR = SCHEMA_DIR / "stages"
#: train_seg config-block keys that select per architecture; the stage receives the block
#: resolved for one architecture (config.resolve_seg_params): `encoder` instead of these
SEG_SELECTING_KEYS = ("encoders", "per_model")


@lru_cache(maxsize=None)
def load_schema(path: Path) -> dict:
    """The schema (YAML) at `path`, read once per process (with libyaml's parser where PyYAML
    has it: ~8x faster, and every workflow start reads the schemas). Callers must not modify
    it."""
    with open(path) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def schema_validator(schema: dict, base: Path):
    """A jsonschema validator of `schema` whose relative `$ref`s are files under `base`."""
    import jsonschema
    from referencing import Registry, Resource

    def retrieve(uri: str):
        target = (base / uri.split("#")[0]).resolve()
        return Resource.from_contents(load_schema(target))

    registry = Registry(retrieve=retrieve)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, registry=registry)


def stage_defaults(stage: str) -> dict:
    """The top-level keys of `stage`'s schema that have a `default` (directly or through a
    local `$ref` into `$defs`), with it: e.g. the training stages' `max_steps: null`."""
    schema = load_schema(STAGE_SCHEMA_DIR / f"{stage}.schema.yaml")
    out = {}
    for key, prop in schema.get("properties", {}).items():
        ref = prop.get("$ref", "")
        if ref.startswith("#/$defs/"):
            prop = schema.get("$defs", {}).get(ref.split("/")[-1], {})
        if "default" in prop:
            out[key] = copy.deepcopy(prop["default"])
    return out


def stage_schema(stage: str, resolved: bool = False) -> dict:
    """The schema of `stage`'s parameter block, every top-level key without a `default`
    required (a resolved block holds them all: config.stage_params refuses one without). With
    `resolved`, train_seg's block as the stage receives it for one architecture: `encoder` (a
    string) in place of `encoders` and `per_model`.

    Raises: ConfigError when `stage` has no schema."""
    path = STAGE_SCHEMA_DIR / f"{stage}.schema.yaml"
    if not path.is_file():
        known = sorted(p.name.split(".")[0] for p in STAGE_SCHEMA_DIR.glob("*.schema.yaml"))
        raise ConfigError(f"stage {stage!r} has no parameter schema (known: {', '.join(known)})")
    schema = copy.deepcopy(load_schema(path))
    props = schema.setdefault("properties", {})
    if resolved and stage == "train_seg":
        for key in SEG_SELECTING_KEYS:
            props.pop(key, None)
        props["encoder"] = {"type": "string", "minLength": 1,
                            "description": "the architecture's encoder (from encoders.<model>)"}
    defaults = stage_defaults(stage)
    schema["required"] = sorted(k for k in props if k not in defaults)
    return schema


def _where(path) -> str:
    return ".".join(str(p) for p in path)


def check_stage_params(stage: str, params: object) -> None:
    """Check a stage's parameter block (its `--params`) against the stage's schema
    (`stage_schema`; a train_seg block without `encoders` / `per_model` as one resolved for one
    architecture); a key the schema gives a `default` may be left out (`fill_stage_defaults`).

    Raises: ConfigError with one line naming the stage and the key: an unknown key, a missing
    key, or a value of the wrong type or out of range."""
    import jsonschema

    resolved = stage == "train_seg" and isinstance(params, dict) and not any(
        k in params for k in SEG_SELECTING_KEYS)
    validator = schema_validator(stage_schema(stage, resolved), STAGE_SCHEMA_DIR)
    error = jsonschema.exceptions.best_match(validator.iter_errors(params))
    if error is None:
        return
    head = f"{stage} parameter"
    where = list(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = error.schema.get("properties", {})
        unknown = sorted(k for k in error.instance if k not in allowed)
        raise ConfigError(f"{head} {_where([*where, unknown[0]])}: unknown key (known: "
                          f"{', '.join(sorted(allowed))})")
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [k for k in error.validator_value if k not in error.instance]
        raise ConfigError(f"{head} {_where([*where, missing[0]])}: missing (have "
                          f"{', '.join(sorted(error.instance)) or 'none'})")
    if not where:
        raise ConfigError(f"{head}s: {error.message}")
    raise ConfigError(f"{head} {_where(where)}: {error.message}")


def fill_stage_defaults(stage: str, params: dict) -> dict:
    """Set the keys of `stage`'s schema defaults that `params` leaves out, in place (a stage's
    block from an older workflow, or written by hand); returns `params`."""
    for key, value in stage_defaults(stage).items():
        params.setdefault(key, value)
    return params
