"""bitsandbytes' 4-bit (nf4) linear layers: building them from plain Linears, and reading them back.

diffusers' ``BitsAndBytesConfig`` refuses to run without a GPU (``validate_environment`` in
``diffusers/quantizers/bitsandbytes/bnb_quantizer.py``, 0.35-0.42), but bitsandbytes' own
``Linear4bit``/``Params4bit`` run on the CPU backend (bitsandbytes >= 0.45). Swapping the modules here is
what diffusers' ``replace_with_bnb_linear`` does, with the weights already loaded; the quantization itself
is bitsandbytes' (``Params4bit`` quantizes when moved to a device). bitsandbytes is imported only by the
functions that need it, so ``import diffusion_lora`` stays light and works without the ``[quant]`` extra.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["dequantize", "dequantize_rows", "is_4bit", "logical_shape", "quantize_like", "quantize_nf4"]


def is_4bit(weight: object) -> bool:
    """Whether ``weight`` is a bitsandbytes ``Params4bit`` (without importing bitsandbytes: a Params4bit
    exists only once bitsandbytes was imported)."""
    return type(weight).__name__ == "Params4bit" and type(weight).__module__.startswith("bitsandbytes")


def quantize_nf4(model: torch.nn.Module, *, compute_dtype: torch.dtype, skip: Callable[[str], bool],
                 double_quant: bool = True) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` whose path ``skip`` rejects by a bitsandbytes nf4
    ``Linear4bit`` computing in ``compute_dtype`` (blocks of 64, double quantization of the block scales
    as in QLoRA); returns how many were replaced. Marks the model ``is_loaded_in_4bit`` as diffusers does,
    which PEFT reads to give those layers its 4-bit LoRA layer."""
    import bitsandbytes as bnb

    count = 0
    for parent_path, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            path = f"{parent_path}.{child_name}" if parent_path else child_name
            if type(child) is not torch.nn.Linear or skip(path):
                continue
            device = child.weight.device
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, child.bias is not None,
                                    compute_dtype=compute_dtype, compress_statistics=double_quant,
                                    quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype), requires_grad=False,
                                           quant_type="nf4", compress_statistics=double_quant)
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, child_name, new.to(device))
            count += 1
    model.is_loaded_in_4bit = True
    return count


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The float weight ``[out, in]`` a ``Params4bit`` stands for (in its quant state's dtype)."""
    import bitsandbytes.functional as F

    return F.dequantize_4bit(weight.data, weight.quant_state)


def logical_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The shape of the float weight a ``Params4bit`` stands for (its own shape is the packed bytes')."""
    return tuple(weight.quant_state.shape)


def dequantize_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` rows ``[rows, in]`` of the float weight a ``Params4bit`` stands for, dequantizing
    only the blocks that hold them (the whole weight when it is not a 2-D Linear weight or has no more
    rows).

    The packed bytes are the row-major float weight, two values a byte, in blocks of ``blocksize``
    values with one scale each (the scales themselves 8-bit quantized with double quantization):
    the first ``rows·in`` values are the first blocks' bytes."""
    import bitsandbytes.functional as F

    state = weight.quant_state
    shape = tuple(state.shape)
    if len(shape) != 2 or rows >= shape[0] or state.blocksize % 2:
        return dequantize(weight)
    wanted = rows * shape[1]
    blocks = -(-wanted // state.blocksize)
    absmax = state.absmax
    if state.nested:  # the scales are blockwise-quantized too (1/64 of the values: dequantized whole)
        absmax = F.dequantize_blockwise(absmax, state.state2) + state.offset
    absmax = absmax[:blocks]
    values = min(blocks * state.blocksize, shape[0] * shape[1])
    part = F.QuantState(absmax=absmax.float(), shape=torch.Size([values]), code=state.code,
                        blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
    flat = F.dequantize_4bit(weight.data.reshape(-1)[: -(-values // 2)], part)
    return flat.reshape(-1)[:wanted].reshape(rows, shape[1])


def quantize_like(weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A new ``Params4bit`` holding ``values`` (float ``[out, in]``) quantized with ``weight``'s settings (type,
    block size, double quantization, storage) on ``weight``'s device; ``weight`` itself is not touched
    (PEFT's 4-bit merge rewrites the old weight's ``bnb_quantized`` flag in place, which would make a later
    ``.to(device)`` quantize its bytes a second time)."""
    import bitsandbytes as bnb

    new = bnb.nn.Params4bit(values.detach().to("cpu", weight.quant_state.dtype), requires_grad=False,
                            blocksize=weight.blocksize, compress_statistics=weight.compress_statistics,
                            quant_type=weight.quant_type, quant_storage=weight.quant_storage, module=weight.module)
    return new.to(weight.device)
