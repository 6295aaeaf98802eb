"""`create_method(name, num_classes, **blocks)`: a plug-in built by name from partial settings
blocks, the keys left out taking the plug-in's defaults; the config route unchanged."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from wsss_core.errors import ConfigError
from wsss_core.methods import create_method, method_class
from wsss_core.methods.common import ResNetSettings

TINY = {"backbone": "resnet_tiny", "pretrained": False}


def test_a_partial_block_is_filled_with_the_plugin_defaults():
    m = create_method("cam", 5, model=TINY)
    defaults = dataclasses.asdict(ResNetSettings())
    assert m.params["plugin"] == "cam"
    assert m.params["model"] == {**defaults, **TINY}
    assert m.blocks["model"] == ResNetSettings(**{**defaults, **TINY})
    assert m.num_classes == 5


def test_blocks_left_out_take_their_defaults_and_nested_blocks_are_filled():
    m = create_method("fbr", 4, model=TINY, fbr={"proj_dim": 16}, train_params={"seed": 3})
    fbr_defaults = dataclasses.asdict(method_class("fbr").settings_blocks["fbr"]())
    assert m.params["fbr"] == {**fbr_defaults, "proj_dim": 16}
    assert m.train_params == {"seed": 3}
    nested = create_method("cobra", 3, model={"cnn": TINY, "vit": {"backbone": "vit_tiny_patch16_224",
                                                                   "pretrained": False}})
    cnn = nested.params["model"]["cnn"]
    assert cnn["backbone"] == "resnet_tiny" and cnn["strides"] == ResNetSettings().strides
    assert set(nested.params) == {"plugin", *method_class("cobra").settings_blocks}


def test_by_name_equals_the_config_route():
    """The same filled blocks through `create_method(params, ...)` give the same weights."""
    torch.manual_seed(0)
    by_name = create_method("cam", 5, model=TINY)
    torch.manual_seed(0)
    by_params = create_method(dict(by_name.params), 5)
    a, b = by_name.state_dict()["cnn"], by_params.state_dict()["cnn"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_plugin_block_and_key_are_config_errors():
    with pytest.raises(ConfigError, match="unknown method plug-in 'nope'"):
        create_method("nope", 5)
    with pytest.raises(ConfigError, match="has no cobra block"):
        create_method("cam", 5, model=TINY, cobra={})
    with pytest.raises(ConfigError, match="model.strid"):
        create_method("cam", 5, model={**TINY, "strid": [2, 2, 2, 1]})
    with pytest.raises(TypeError):
        create_method({"plugin": "cam", "model": TINY}, 5, model=TINY)
