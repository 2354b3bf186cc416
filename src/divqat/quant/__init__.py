"""The PT2E quantization flow (torchao): export -> prepare_qat_pt2e -> fine-tune -> convert -> compile.

The deprecated ``torch.ao.quantization`` eager and FX flows are deliberately not used (see
environment.md): their quantized dtypes are being removed, and the PT2E int8 program lowered by
inductor with freezing is the supported fast int8 path on x86 CPUs. ``divqat.quant.edge`` holds
the device target: ExecuTorch's XNNPACK scheme and the lowering to a ``.pte`` program.
"""

from divqat.quant.flow import (
    QATModel,
    compile_int8,
    convert_to_int8,
    export_dynamic,
    prepare_qat,
    qat_quantizer,
    quiet_torchao,
    straight_through,
)

__all__ = ["QATModel", "compile_int8", "convert_to_int8", "export_dynamic", "prepare_qat", "qat_quantizer",
           "quiet_torchao", "straight_through"]
