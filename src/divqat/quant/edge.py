"""The device target: ExecuTorch's XNNPACK quantization scheme and lowering to a ``.pte`` program.

XNNPACK (the CPU backend of ExecuTorch on phones, boards and x86) runs a different int8 scheme
from the x86 inductor path: int8 per-channel symmetric weights and *int8* (not uint8) per-tensor
activations. A victim trained for the x86 target cannot be lowered to it (its uint8 quantize /
dequantize nodes stay outside the delegate and the runtime has no kernels for them), so a device
victim is trained with this quantizer from the start (``divqat train --target edge``).

ExecuTorch is an optional extra: everything here imports it lazily and says in one line how to
get it (``pip install 'divqat[edge]'``).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from divqat.errors import MissingExtra, UnsupportedModel
from divqat.quant import quiet_torchao  # the package, not flow: flow imports this module lazily

TARGETS = ("x86", "edge")
# The batch dimension of a lowered program is dynamic up to this size; larger queries are run in
# chunks of it (XNNPACK plans its buffers for the upper bound).
EDGE_MAX_BATCH = 256
# The batch of a program whose dynamic batch does not run (see divqat.pipelines.export): queries
# go in chunks of it, a short one zero-padded.
EDGE_FIXED_BATCH = 32
INSTALL_HINT = "pip install 'divqat[edge]'"


def require_executorch() -> None:
    """Raise ``MissingExtra`` (one line, with the install command) when ExecuTorch is missing."""
    quiet_torchao()  # ExecuTorch imports torchao, which would print its CPU noise first
    try:
        import executorch.exir  # noqa: F401
    except ImportError:
        raise MissingExtra(f"the device target needs ExecuTorch: {INSTALL_HINT}") from None


def edge_quantizer(is_qat: bool = True):
    """ExecuTorch's ``XNNPACKQuantizer`` with the symmetric per-channel config (QAT or PTQ)."""
    require_executorch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                           is_qat=is_qat))


def lower_to_pte(module: nn.Module, example: torch.Tensor, *, max_batch: int = EDGE_MAX_BATCH,
                 constant_methods: dict[str, Any] | None = None, dynamic: bool = True) -> bytes:
    """``module`` (a converted int8 program, or an fp32 model) exported with a dynamic batch up to
    ``max_batch`` (``dynamic=False``: the batch of ``example``, fixed), lowered to XNNPACK and
    serialized: the bytes of a ``.pte`` file.

    ``constant_methods`` become methods of the program that return a constant (divqat stores the
    victim's metadata as one, so the file describes itself). What XNNPACK does not take (a fused
    defense's float64 formula) runs on ExecuTorch's portable kernels inside the same program.
    """
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torch._export.verifier import SpecViolationError

    # Victims train in channels_last, and their int8 weights keep that layout; XNNPACK's layout
    # pass refuses a constant it sees in two layouts, so every tensor goes in contiguous. Not
    # only the non-contiguous ones: a channels_last tensor whose channels are its only dimension
    # above 1 (the normalization's (1, C, 1, 1) mean and std) counts as contiguous, keeps its
    # strides (C, 1, C, C), and ExecuTorch reads those as the NHWC dim order; the delegate that
    # subtracts it from the NCHW input then fails at run time ("Propagating input shapes failed").
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.stride() != _contiguous_strides(tensor.shape):
            tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    batch = Dim("batch", min=1, max=max_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(module, (example,),
                                       dynamic_shapes=({0: batch},) if dynamic else None)
        if any(n.target == torch.ops.aten.round.decimals for n in exported.graph.nodes):
            exported = exported.run_decompositions({torch.ops.aten.round.decimals: _round_decimals})
        _refuse_random_ops(exported)
        try:
            edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                               constant_methods=constant_methods)
        except SpecViolationError as e:
            op = re.search(r"Operator (\S+) is not", str(e))
            raise UnsupportedModel(f"cannot lower to ExecuTorch: operator {op.group(1) if op else '?'} "
                                   "is not in its core ATen opset") from None
        return bytes(edge.to_executorch().buffer)


# Ops that draw random numbers: an int8 program holding them answers differently each call.
_RANDOM_OPS = ("bernoulli", "rand", "randn", "normal", "uniform", "multinomial", "native_dropout")


def _refuse_random_ops(exported: torch.export.ExportedProgram) -> None:
    """A program that draws random numbers is not a fixed function: refuse it in one line, naming
    the operator. (Int8 victims whose QAT graph was traced with
    stochastic depth on, e.g. torchvision's EfficientNet before ``prepare_qat`` traced it off,
    hold ``bernoulli_``.)"""
    for node in exported.graph.nodes:
        name = getattr(node.target, "__name__", "").split(".")[0].rstrip("_")
        if node.op == "call_function" and name in _RANDOM_OPS:
            raise UnsupportedModel(f"cannot lower to ExecuTorch: operator {node.target} draws random "
                                   "numbers on every query (stochastic depth traced in training mode?); "
                                   "retrain the victim with this divqat")


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def run_failure(data: bytes, shape: tuple[int, ...], batches: tuple[int, ...]) -> str | None:
    """Why the program ``data`` fails on inputs of ``shape`` at these batch sizes (the runtime's
    error), or None when it runs them all: a program that lowered can still fail every call."""
    with quiet_stderr():
        forward = runtime().load_program(data).load_method("forward")
        for n in batches:
            try:
                forward.execute([torch.rand(n, *shape)])
            except RuntimeError as e:
                return f"batch {n}: {e}"
    return None


def _round_decimals(x: torch.Tensor, decimals: int = 0) -> torch.Tensor:
    """``torch.round(x, decimals=d)`` as ATen's CPU kernel computes it, in core ops (the
    rounding defense's): ``round(x * 10^d) / 10^d`` (``round(x / 10^-d) * 10^-d`` for d < 0).
    ``aten.round.decimals`` is not a core op and the runtime has no kernel for it."""
    if decimals < 0:
        scale = 10.0 ** -decimals
        return torch.round(x / scale) * scale
    scale = 10.0 ** decimals
    return torch.round(x * scale) / scale


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 for a moment: the runtime's C++ side prints cpuinfo warnings
    about this CPU on its first program load ("Unsupported hardware" and friends), which are
    noise to a user and cannot be switched off from Python."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def runtime():
    """The ExecuTorch runtime singleton (``executorch.runtime.Runtime``)."""
    require_executorch()
    try:
        from executorch.runtime import Runtime
    except ImportError:
        raise MissingExtra(f"the ExecuTorch runtime is not installed: {INSTALL_HINT}") from None
    with quiet_stderr():
        return Runtime.get()


def set_runtime_threads(n: int) -> None:
    """Size the runtime's XNNPACK thread pool (by default as many threads as cores). Only call it
    while no program is running."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != n:
        portable_lib._unsafe_reset_threadpool(n)
