"""Names of the built-in base models that need no import of torch or diffusers to know.

The CLI's help text and defaults read them from here so that ``diffusion-lora --help`` starts fast;
:mod:`diffusion_lora.models.loading` re-exports them.
"""

# Trained pipelines shipped inside the package (diffusers folders under diffusion_lora/assets/).
EMBEDDED_MODELS: tuple[str, ...] = ("shapes-sd15",)
DEFAULT_MODEL = "shapes-sd15"  # the base model of every command (generate, train) when none is named
