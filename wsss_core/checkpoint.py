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
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import DataError, WeightsError
from .io import atomic_path

#: written into every model file so a reader can tell the format
MODEL_FORMAT = "wsss-model-1"


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write `payload` to `path` atomically. Raises DataError when the disk refuses the write
    (torch reports it as a RuntimeError without the path)."""
    try:
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(payload, tmp)
    except RuntimeError as e:
        if "write" not in str(e).lower():
            raise
        raise DataError(f"{path}: cannot write ({str(e).splitlines()[0][:200]}); free space in "
                        f"{path.parent} and re-run") from None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", stage: str | None = None) -> dict:
    """The dict a `save_checkpoint` wrote (weights only, no pickled code). Every reader of a
    checkpoint or model file goes through here, so a missing, truncated or foreign file is one
    line naming it and the stage that writes it (`stage`; None for a file the user supplies).

    Raises: DataError (missing, unreadable or not a dict)."""
    path = Path(path)
    fix = (f"re-run the {stage} stage" if stage else
           "give a model.pt that wsss wrote (results/<dataset>/<method>/seg/model.pt)")
    if not path.is_file():
        raise DataError(f"{path}: model file not found; {fix}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, bit rot: torch raises many kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{path}: unreadable or damaged model file ({reason}); "
                        f"{'delete it and ' + fix if stage else fix}") from None
    if not isinstance(ck, dict):
        raise DataError(f"{path}: not a wsss model file (holds a {type(ck).__name__}); {fix}")
    return ck


def resume_key(*parts: Any, files: Sequence[str | os.PathLike] = ()) -> str:
    """SHA-256 naming exactly what a training run is made from: the JSON-able `parts`
    (parameters, ids) and the content of every file it reads (`files`: files, or folders whose
    files are read in name order), by content, not by path. A checkpoint is resumed only when
    its key equals the current one, so a change to any upstream output (IR labels, a
    classifier, masks, images) starts the run afresh.

    Raises: DataError for a listed path that does not exist."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for item in files:
        item = Path(item)
        if item.is_dir():
            members = sorted(p for p in item.rglob("*") if p.is_file())
        elif item.is_file():
            members = [item]
        else:
            raise DataError(f"{item}: input not found")
        for member in members:
            digest.update(str(member.relative_to(item) if item.is_dir() else member.name).encode() + b"\0")
            with open(member, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()


def save_model(path: str | Path, kind: str, state: dict, **record: Any) -> None:
    """Write a model file of `kind` ("classifier", "irn", "segmentation"): `record` holds what
    rebuilding the model needs (JSON-like values), `state` its weights."""
    save_checkpoint(Path(path), {"format": MODEL_FORMAT, "kind": kind, **record, "state": state})


#: the stage that writes each kind of model file (named in the advice of read errors)
WRITTEN_BY = {"classifier": "train_classifier", "irn": "train_irn", "segmentation": "train_seg"}


def read_model(path: str | Path, kind: str, map_location: Any = "cpu") -> dict:
    """The record of a model file of `kind`.

    Raises: DataError when it is missing, truncated or unreadable (`load_checkpoint`), and
    WeightsError when it is not a `kind` model written by wsss; each one line naming the file
    and the stage to re-run."""
    path = Path(path)
    stage = WRITTEN_BY.get(kind)
    record = load_checkpoint(path, map_location=map_location, stage=stage)
    if record.get("format") != MODEL_FORMAT or record.get("kind") != kind:
        raise WeightsError(f"{path}: not a {kind} model written by wsss ({MODEL_FORMAT}); re-run "
                           f"the {stage or 'stage that trains it'} stage")
    return record


def fingerprint(*parts: Any) -> str:
    """SHA-256 of JSON-serialisable `parts`: the key a training checkpoint resumes under."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def pretrained_blocks(tree: Any):
    """Every nested dict of `tree` (a method block) that has a `pretrained` key."""
    if isinstance(tree, dict):
        if "pretrained" in tree:
            yield tree
        for v in tree.values():
            yield from pretrained_blocks(v)
