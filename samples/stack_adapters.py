"""Stack two adapters with weights, per-block weights and fusing — on the built-in tiny SD1.5 model.

    python samples/stack_adapters.py

Runs on a CPU in seconds and needs no download. With a real model, pass its folder or hub id to
``load_pipeline`` and your own .safetensors files to ``load_lora`` instead.
"""

from pathlib import Path

import torch

import diffusion_lora as dl

out = Path("out/samples")
out.mkdir(parents=True, exist_ok=True)
pipe = dl.load_pipeline("tiny-sd15")

# Two adapters; normally these come from files (`dl.load_lora(pipe, "style.safetensors")`).
for name, seed in (("style", 1), ("char", 2)):
    dl.add_lora(pipe, name, rank=8, alpha=4)
    torch.manual_seed(seed)
    for module in pipe.unet.modules():
        if hasattr(module, "lora_B") and name in module.lora_B:
            torch.nn.init.normal_(module.lora_B[name].weight, std=0.2)
    dl.save_lora(pipe, name, out / f"{name}.safetensors", trigger_words=[f"zx{name}"])

dl.set_weights(pipe, {"style": 0.8, "char": 0.6})  # both active, each at its weight
dl.set_weights(pipe, {"style": {"default": 0.0, "up": 1.0}, "char": 0.6})  # style only in the up blocks
dl.fuse(pipe)  # zero overhead while generating; unfuse() restores the base weights bit-exactly
image = pipe("a small red circle", num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images[0]
image.save(out / "stacked.png")
dl.unfuse(pipe)
for info in dl.list_loras(pipe):
    print(info)
print(out / "stacked.png")
