from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch import nn
from torch.export import Dim

from divqat.errors import ConfigError
from divqat.stopwatch import phase, timed

# The batch dimension of every exported graph is dynamic up to this size.
MAX_BATCH = 1 << 16


def quiet_torchao() -> None:
    """Import torchao without its CPU-irrelevant noise ("Failed to load ..._C_mxfp8" and friends).

    Importing it also registers the ``quantized_decomposed`` ops that a saved int8 program needs
    to deserialize, so every loader calls this first.
    """
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401


@timed("export")
def export_dynamic(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension, so one program serves any batch size."""
    batch = Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def _bn_nodes(gm: torch.fx.GraphModule):
    targets = {torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default}
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


class QATModel(nn.Module):
    """A PT2E fake-quant graph being fine-tuned, with the train/eval switch and freezing it needs.

    ``.train()`` / ``.eval()`` on an exported graph do not switch BatchNorm or fake-quant
    behaviour; torchao's ``move_exported_model_to_train/_eval`` rewrite the graph instead, and
    that rewrite resets BatchNorm momentum. This wrapper re-applies the freeze after each switch,
    so "frozen" stays frozen.
    """

    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph
        self.observers_frozen = False
        self.bn_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x)

    def train(self, mode: bool = True) -> QATModel:
        from torchao.quantization.pt2e import (
            move_exported_model_to_eval,
            move_exported_model_to_train,
        )

        # Not super().train(): it would recurse into the graph, whose train() torchao forbids.
        self.training = mode
        if mode:
            move_exported_model_to_train(self.graph_module)
            if self.bn_frozen:
                self._set_bn_momentum(0.0)
        else:
            move_exported_model_to_eval(self.graph_module)
        return self

    def freeze(self) -> None:
        """Stop updating quantization ranges and BatchNorm running statistics (end of QAT)."""
        from torchao.quantization.pt2e.fake_quantize import disable_observer

        self.graph_module.apply(disable_observer)
        self.observers_frozen = True
        self.bn_frozen = True
        if self.training:
            self._set_bn_momentum(0.0)

    def _set_bn_momentum(self, momentum: float) -> None:
        for node in _bn_nodes(self.graph_module):
            args = list(node.args)
            args[6] = momentum  # (input, weight, bias, mean, var, training, momentum, eps, ...)
            node.args = tuple(args)
        self.graph_module.recompile()


def qat_quantizer(target: str = "x86"):
    """The QAT quantizer of a deployment target.

    - ``x86``: ``X86InductorQuantizer`` with the default QAT config: int8 per-channel symmetric
      weights, uint8 per-tensor affine activations; lowered by inductor to oneDNN int8 kernels.
    - ``edge``: ExecuTorch's ``XNNPACKQuantizer``, symmetric per-channel QAT config: int8
      per-channel symmetric weights, int8 per-tensor affine activations; lowered to XNNPACK in a
      ``.pte`` program (``divqat.quant.edge``, needs ``divqat[edge]``).
    """
    from divqat.quant.edge import TARGETS, edge_quantizer

    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    if target == "edge":
        return edge_quantizer(is_qat=True)
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))


@timed("export")
def prepare_qat(model: nn.Module, example: torch.Tensor, target: str = "x86") -> QATModel:
    """Export ``model`` (fp32, any mode) and insert fake quantization for QAT with the quantizer
    of ``target`` (``qat_quantizer``): moving-average observers that fake-quantize from the first
    step; conv + BatchNorm are folded automatically.
    """
    quiet_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    quantizer = qat_quantizer(target)
    was_training = model.training
    model.train()
    exported = export_dynamic(model, example).module()
    model.train(was_training)
    with warnings.catch_warnings(), _conv2d_only(exported):
        warnings.simplefilter("ignore")
        prepared = prepare_qat_pt2e(exported, quantizer)
    return QATModel(prepared).train()


_OTHER_CONVS = ("conv1d", "conv3d", "conv_transpose")


def _conv2d_example(n_tensors: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1), *(torch.randn(1) for _ in range(n_tensors - 2)))


def _fuse_conv2d_bn_qat(m: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """torchao's ``_fuse_conv_bn_qat`` (prepare) restricted to conv2d; see ``_conv2d_only``."""
    import torch.nn.functional as F
    from torchao.quantization.pt2e import qat_utils

    if not any(qat_utils._is_bn_node(n) for n in m.graph.nodes):
        return m
    return qat_utils._fuse_conv_bn_qat_helper(m, F.conv2d, _conv2d_example(7), is_cuda=False)


def _fold_conv2d_bn_qat(m: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """torchao's ``_fold_conv_bn_qat`` (convert) restricted to conv2d; see ``_conv2d_only``."""
    import torch.nn.functional as F
    from torchao.quantization.pt2e import qat_utils

    if not any(qat_utils._is_bn_node(n) for n in m.graph.nodes):
        return m
    m = qat_utils._fold_conv_bn_qat_helper(m, F.conv2d, _conv2d_example(6), is_cuda=False)
    for node in list(m.graph.nodes):
        # The in-place counter increments that BatchNorm's training statistics left behind.
        if (node.target == torch.ops.aten.add_.Tensor and node.args[0].op == "get_attr"
                and node.args[1] == 1
                and "torch.nn.modules.batchnorm.BatchNorm2d"
                in [v[1] for v in node.meta.get("nn_module_stack", {}).values()]):
            m.graph.erase_node(node)
    m.graph.eliminate_dead_code()
    m.recompile()
    return m


@contextlib.contextmanager
def _conv2d_only(gm: torch.fx.GraphModule):
    """Run torchao's conv-BN fuse (prepare) and fold (convert) passes for conv2d only.

    The stock passes build their match patterns by running ``torch.export`` on small pattern
    functions for conv1d, conv2d, conv_transpose1d and conv_transpose2d (about 120 of them on
    convert): over a minute on 2 cores per conversion, three quarters of it for conv types
    our CNNs do not contain. Graphs with any other conv type, or a CUDA machine (where torchao
    also matches CUDA variants), get the stock passes.
    """
    from torchao.quantization.pt2e import quantize_pt2e

    targets = " ".join(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    if any(conv in targets for conv in _OTHER_CONVS) or torch.cuda.is_available():
        yield
        return
    stock = quantize_pt2e._fuse_conv_bn_qat, quantize_pt2e._fold_conv_bn_qat
    quantize_pt2e._fuse_conv_bn_qat, quantize_pt2e._fold_conv_bn_qat = _fuse_conv2d_bn_qat, _fold_conv2d_bn_qat
    try:
        yield
    finally:
        quantize_pt2e._fuse_conv_bn_qat, quantize_pt2e._fold_conv_bn_qat = stock


@timed("export")
def convert_to_int8(qat: QATModel, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Convert the fine-tuned fake-quant graph into the int8 program (quantize/dequantize + int8
    weights), re-exported with a dynamic batch so it can be saved with ``torch.export.save``."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    qat.eval()
    with warnings.catch_warnings(), _conv2d_only(qat.graph_module):
        warnings.simplefilter("ignore")
        converted = convert_pt2e(qat.graph_module)
    return export_dynamic(converted, example)


@contextlib.contextmanager
def _inductor_freezing():
    import torch._inductor.config as inductor_config

    old = inductor_config.freezing
    inductor_config.freezing = True
    try:
        yield
    finally:
        inductor_config.freezing = old


def compile_int8(module: nn.Module, freezing: bool = True):
    """``torch.compile`` with inductor freezing: weights become constants and the
    quantize -> conv -> dequantize patterns lower to oneDNN int8 kernels. Without freezing
    the int8 program is barely faster than fp32.

    ``freezing=False`` is for programs of the edge target (XNNPACK's scheme): oneDNN's int8
    convolutions take uint8 activations only, and with freezing inductor lowers XNNPACK's int8
    activations to them anyway, which fails at run time. Unfrozen, inductor compiles the
    quantize / dequantize arithmetic around fp32 convolutions: the same answers as the eager
    program, about 3x faster than it (measured on resnet8), not int8 kernels.

    Compiled statically (``dynamic=False``): with dynamic shapes this torch version's int8 conv
    lowering fails a stride assertion on recompilation, so callers feed a few fixed batch sizes.
    """
    compiled = torch.compile(module, dynamic=False)
    frozen = _inductor_freezing if freezing else contextlib.nullcontext
    shapes: set[tuple[int, ...]] = set()

    def run(x: torch.Tensor) -> torch.Tensor:
        # The first call of each batch size compiles; inductor's int8 lowering warns about its
        # own tensor copies there, which is noise to the user.
        with frozen(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if tuple(x.shape) in shapes:
                return compiled(x)
            with phase("compile"):
                out = compiled(x)
            shapes.add(tuple(x.shape))
            return out

    return run
