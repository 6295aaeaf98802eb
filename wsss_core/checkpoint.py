"""One checkpoint format and one loader for every trained model (classifier, IRN,
segmentation network) and for training checkpoints.

A model file is a dict `{"format": "wsss-model-1", "kind": <stage's model kind>, ..., "state":
<state dict>}` saved with torch.save under a temporary name and renamed into place; it is
read with `weights_only=True` (no pickles). `read_model` reports a missing, unreadable or
foreign file in one line naming it. The fingerprint of a training run (`fingerprint`) is
what a resume must match.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .errors import DataError, WeightsError
from .io import atomic_path

#: written into every model file so a reader can tell the format
MODEL_FORMAT = "wsss-model-1"


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save `payload` to `path` under a temporary name, renamed into place."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """The dict torch.save wrote to `path` (tensors and primitives only: weights_only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def save_model(path: str | Path, kind: str, state: dict, **record: Any) -> None:
    """Write a model file of `kind` ("classifier", "irn", "segmentation"): `record` holds what
    rebuilding the model needs (JSON-like values), `state` its weights."""
    save_checkpoint(Path(path), {"format": MODEL_FORMAT, "kind": kind, **record, "state": state})


def read_model(path: str | Path, kind: str, map_location: Any = "cpu") -> dict:
    """The record of a model file of `kind`. DataError when it is missing, WeightsError when
    it cannot be read or is not a `kind` model written by wsss (one line naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {kind} model not found; run the stage that trains it first")
    try:
        record = load_checkpoint(path, map_location=map_location)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise WeightsError(f"{path}: cannot read the {kind} model ({type(e).__name__}); delete "
                           f"it and re-run the stage that trains it") from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT or record.get("kind") != kind:
        raise WeightsError(f"{path}: not a {kind} model written by wsss ({MODEL_FORMAT}); re-run "
                           f"the stage that trains it")
    return record


def fingerprint(*parts: Any) -> str:
    """SHA-256 of JSON-serialisable `parts`: the key a training checkpoint resumes under."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def file_digest(path: str | Path | None) -> str:
    """SHA-256 of a file's bytes ("" for None): initial weights are part of a resume key."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""


def load_method(path: str | Path, device: torch.device | str = "cpu"):
    """The trained method (eval mode, on `device`) from a classifier model file."""
    from .methods import create_method

    record = read_model(path, "classifier", map_location=device)
    method = dict(record["method"])
    # weights come from the file: never fetch ImageNet weights again
    for block in _pretrained_blocks(method):
        block["pretrained"] = False
    m = create_method(method, int(record["num_classes"]), train_params=record.get("train_params"))
    m.load_state_dict(record["state"])
    m.to(device).eval()
    return m


def classifier_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The trained CNN backbone of a classifier model file (`Method.backbone_state`), for IRN
    and segmentation encoders started from it. The global RNG is left as it was, so building
    the method does not shift the initialisation of the model that receives the weights."""
    with torch.random.fork_rng(devices=[]):
        return load_method(path, "cpu").backbone_state()


def _pretrained_blocks(tree: Any):
    if isinstance(tree, dict):
        if "pretrained" in tree:
            yield tree
        for v in tree.values():
            yield from _pretrained_blocks(v)
