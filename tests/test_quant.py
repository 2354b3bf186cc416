"""QAT must really fake-quantize and really train the model it returns (algorithms.md, section 1
pitfalls: an optimizer over a different copy, or observers that never fake-quantize)."""

import copy

import pytest
import torch
from conftest import make_bars

from divqat.models import VictimNet
from divqat.quant import compile_int8, convert_to_int8, prepare_qat
from divqat.quant.flow import _bn_nodes
from divqat.train import CrossEntropy, FitConfig, fit


@pytest.fixture(scope="module")
def fp32_and_qat():
    torch.manual_seed(0)
    net = VictimNet("resnet8", 1, 4, (0.3,), (0.3,))
    images, labels = make_bars(128, seed=0)
    fit(net, images, labels, CrossEntropy(), FitConfig(epochs=1, batch_size=32, progress=False, log_epochs=False))
    net.eval()
    example = torch.rand(4, 1, 16, 16)
    qat = prepare_qat(copy.deepcopy(net), example)
    return net, qat, images, labels, example


def _fake_quantizers(qat):
    return [m for m in qat.graph_module.modules() if hasattr(m, "fake_quant_enabled")]


def test_qat_graph_fake_quantizes(fp32_and_qat):
    net, qat, _, _, _ = fp32_and_qat
    fqs = _fake_quantizers(qat)
    assert len(fqs) > 10  # weights and activations of every conv/linear
    assert all(int(m.fake_quant_enabled) == 1 for m in fqs)
    x = torch.rand(32, 1, 16, 16)
    qat.eval()
    with torch.no_grad():
        fq, fp = qat(x), net(x)
    qat.train()
    diff = (fq - fp).abs().max().item()
    assert diff > 1e-4, "fake quantization changed nothing: QAT would be plain fine-tuning"
    assert diff < 0.5 * fp.abs().max().item(), "fake-quant output unrelated to the fp32 model"


def test_training_updates_the_graph_being_trained(fp32_and_qat):
    net, qat, images, labels, _ = fp32_and_qat
    qat = copy.deepcopy(qat)
    before = {k: v.clone() for k, v in qat.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in net.state_dict().items()}
    fit(qat, images, labels, CrossEntropy(),
        FitConfig(epochs=1, batch_size=32, lr=0.01, schedule="cosine", progress=False, log_epochs=False))
    after = qat.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    weights = [k for k in changed if k.endswith("weight")]
    assert weights, "the optimizer did not update the fake-quant model"
    assert any("scale" in k or "min_val" in k or "max_val" in k for k in changed), "observers never updated"
    assert all(torch.equal(teacher_before[k], v) for k, v in net.state_dict().items()), "teacher changed"


def test_freeze_stops_observers_and_bn_statistics_across_mode_switches(fp32_and_qat):
    _, qat, images, labels, _ = fp32_and_qat
    qat = copy.deepcopy(qat)
    qat.freeze()
    qat.eval()
    qat.train()  # torchao's rewrite resets BN momentum: the wrapper must re-freeze
    assert all(int(m.observer_enabled) == 0 for m in _fake_quantizers(qat))
    assert _bn_nodes(qat.graph_module) and all(n.args[6] == 0.0 for n in _bn_nodes(qat.graph_module))
    stats = {k: v.clone() for k, v in qat.state_dict().items() if "running" in k or "scale" in k}
    fit(qat, images[:64], labels[:64], CrossEntropy(),
        FitConfig(epochs=1, batch_size=32, lr=0.01, progress=False, log_epochs=False))
    now = qat.state_dict()
    assert stats and all(torch.equal(v, now[k]) for k, v in stats.items())


def test_convert_gives_int8_program_close_to_fake_quant(fp32_and_qat):
    _, qat, _, _, example = fp32_and_qat
    qat = copy.deepcopy(qat)
    program = convert_to_int8(qat, example)
    targets = [str(n.target) for n in program.graph.nodes]
    assert any("quantize_per_tensor" in t for t in targets)
    assert not any("batch_norm" in t for t in targets), "BatchNorm was not folded"
    int8_weights = [v for v in program.state_dict.values() if v.dtype == torch.int8]
    assert int8_weights, "no int8 weights in the converted program"
    x = torch.rand(20, 1, 16, 16)  # a batch size the example did not have: dynamic batch
    with torch.no_grad():
        ref = qat(x)
        out = program.module()(x)
        compiled = compile_int8(program.module())(x)
    assert out.shape == (20, 4)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert (compiled - out).abs().max() < 0.05 * ref.abs().max()
