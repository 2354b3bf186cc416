"""Users' own architectures: spec strings (torchvision:, timm:, package.module:function), the
penultimate features of any of them, and PT2E QAT of a net torchvision builds."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from user_nets import ItemBranch, TinyCNN

from divqat.errors import ConfigError, UnsupportedModel
from divqat.models import VictimNet, check_arch, create_model, features, penultimate

SPECS = ["resnet8", "torchvision:mobilenet_v3_small", "timm:mobilenetv3_small_050",
         "user_nets:tiny_cnn"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("channels", [1, 3])
def test_each_spec_form_builds_for_the_dataset(spec, channels):
    net = create_model(spec, in_channels=channels, num_classes=5).eval()
    with torch.no_grad():
        assert net(torch.rand(2, channels, 32, 32)).shape == (2, 5)
    assert check_arch(f"  {spec} ") == spec


def test_victim_net_takes_a_spec_or_a_module():
    by_spec = VictimNet("torchvision:resnet18", 1, 4, (0.5,), (0.25,))
    assert by_spec.arch == "torchvision:resnet18" and by_spec.net.conv1.in_channels == 1
    by_module = VictimNet(TinyCNN(1, 4), 1, 4, (0.5,), (0.25,))
    assert by_module.arch is None and by_module(torch.rand(3, 1, 16, 16)).shape == (3, 4)


@pytest.mark.parametrize("spec, says", [
    ("resnet9", "torchvision:NAME"),
    ("torchvision:resnet9", "list_models"),
    ("timm:no_such_net", "list_models"),
    ("no_such_package.nets:build", "cannot import"),
    ("user_nets:missing", "no function"),
    ("user_nets:", "package.module:function"),
    ("user_nets:no_keywords", "num_classes= and in_channels="),
    ("user_nets:not_a_module", "not an nn.Module"),
])
def test_bad_specs_are_one_line_config_errors(spec, says):
    with pytest.raises(ConfigError) as caught:
        create_model(spec, 3, 10)
    message = str(caught.value)
    assert says in message and "\n" not in message and caught.value.__cause__ is None


@pytest.mark.parametrize("spec, width", [("resnet8", 64), ("torchvision:mobilenet_v3_small", 1024),
                                         ("user_nets:tiny_cnn", 8)])
def test_penultimate_features_are_the_classifier_input(spec, width):
    net = create_model(spec, 3, 6).eval()
    x = torch.rand(3, 3, 32, 32)
    h = features(net, x)
    assert h.shape == (3, width)
    head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        assert torch.allclose(head(h), net(x), atol=1e-5)


def test_penultimate_needs_a_linear_head():
    with pytest.raises(ConfigError, match="no nn.Linear"):
        penultimate(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten()))


def test_torchvision_resnet18_goes_through_qat_and_int8():
    """Its BasicBlock calls one ReLU twice: the partition split must let the X86 quantizer
    annotate it; the int8 program computes what the fake-quant model it came from does (logits
    compared, not argmaxes: an untrained net's logits are near ties)."""
    from divqat.quant import convert_to_int8, prepare_qat

    torch.manual_seed(0)
    net = create_model("torchvision:resnet18", 3, 10)
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    qat = prepare_qat(net, x)
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    for _ in range(2):
        loss = nn.functional.cross_entropy(qat(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    qat.eval()
    with torch.no_grad():
        fake_quant = qat(x)
        int8 = convert_to_int8(qat, x).module()(x)
    assert int8.shape == (8, 10)
    assert torch.corrcoef(torch.stack([int8.flatten(), fake_quant.flatten()]))[0, 1] > 0.9


def test_a_model_torch_export_cannot_capture_is_one_line(capsys):
    from divqat.quant import prepare_qat

    with pytest.raises(UnsupportedModel) as caught:
        prepare_qat(ItemBranch(3, 4), torch.rand(2, 3, 8, 8))
    message = str(caught.value)
    assert "\n" not in message and "ItemBranch.forward" in message and ".item()" in message
    assert "def forward" not in capsys.readouterr().err  # torch.export's partial graph
