"""The Method contract's declarations: settings blocks, map roles, frozen / unsaved modules,
backbone_state, and the registry's name check."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from wsss_core.errors import ConfigError
from wsss_core.methods import Method, method_class, register_method
from wsss_core.methods.base import MapSpec, make_optimizer


@dataclass
class TeacherSettings:
    momentum: float = 0.99


class _Teacher(Method):
    name = "contract_probe"
    settings_blocks = {"teacher": TeacherSettings}
    maps = (MapSpec("a"), MapSpec("b", strided=True), MapSpec("att", kind="agnostic"))
    frozen_modules = ("ema",)
    unsaved_modules = ("perceptual",)

    def build(self):
        return {"student": nn.Linear(2, 2), "ema": nn.Linear(2, 2), "perceptual": nn.Linear(2, 2)}

    def optimizers(self, lr, weight_decay, momentum, kind="sgd"):
        return [make_optimizer([{"params": list(self.models["student"].parameters())}],
                               lr, weight_decay, momentum, kind)]

    def training_step(self, batch, ctx):
        return {"total": self.models["student"](batch).sum()}

    def after_step(self, ctx):
        m = self.blocks["teacher"].momentum
        with torch.no_grad():
            for t, s in zip(self.models["ema"].parameters(), self.models["student"].parameters()):
                t.mul_(m).add_(s, alpha=1 - m)

    def infer(self, pair):
        return {}


def test_settings_roles_and_module_kinds():
    method = _Teacher({"teacher": {"momentum": 0.5}}, num_classes=3)
    assert method.blocks["teacher"] == TeacherSettings(momentum=0.5)
    roles = method.map_roles()
    assert (roles.walk, roles.fuse, roles.agnostic) == ("b", ("a", "b"), "att")
    # frozen and unsaved modules are never optimised; unsaved ones are not checkpointed
    assert not any(p.requires_grad for n in ("ema", "perceptual") for p in method.models[n].parameters())
    state = method.state_dict()
    assert set(state) == {"student", "ema"}
    method.train()
    assert method.models["student"].training and not method.models["ema"].training
    assert not method.models["perceptual"].training
    wrapped = []
    method.distribute(lambda m: wrapped.append(m) or m)
    assert wrapped == [method.models["student"]]
    # the EMA teacher is saved and restored with the weights
    method.after_step(None)
    other = _Teacher({}, num_classes=3)
    other.load_state_dict(method.state_dict())
    assert torch.equal(other.models["ema"].weight, method.models["ema"].weight)
    with pytest.raises(ConfigError, match="teacher.momentun"):
        _Teacher({"teacher": {"momentun": 0.5}}, num_classes=3)
    with pytest.raises(ConfigError, match="no CNN backbone"):
        method.backbone_state()


def test_builtin_backbone_state_is_the_cnn_backbone():
    cam = method_class("cam")({"plugin": "cam", "model": {"backbone": "resnet_tiny", "pretrained": False}},
                              num_classes=4)
    state = cam.backbone_state()
    assert state.keys() == cam.models["cnn"].backbone.state_dict().keys()
    assert all(not k.startswith("backbone.") for k in state)


def test_a_second_class_under_a_taken_name_is_rejected():
    method_class("cam")  # built-ins registered

    class Impostor(_Teacher):
        name = "cam"

    with pytest.raises(ConfigError, match="taken"):
        register_method(Impostor)
