"""Writing a denoiser's weights as a GGUF file with the ``gguf`` package (the format of the community's
quantized Flux files), for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch


def write_gguf(model: torch.nn.Module, path: Path, qtype_name: str = "Q8_0") -> Path:
    """``model``'s state dict (diffusers key names) as a GGUF file: every 2-D tensor whose rows fit the block
    size quantized to ``qtype_name`` by gguf's reference quantizer, everything else as F32."""
    import gguf
    import numpy as np

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    writer = gguf.GGUFWriter(str(path), "diffusers")
    for key, value in model.state_dict().items():
        array = value.detach().float().numpy()
        if array.ndim == 2 and array.shape[1] % block == 0:
            packed = gguf.quants.quantize(array, qtype)
            writer.add_tensor(key, packed, raw_shape=packed.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(key, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def read_gguf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantized by the gguf package itself (float32, logical shape)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions fastest first
        out[t.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
    return out
