"""Third-party internals, one module per library (``compat.peft``, ``compat.diffusers``, ``compat.accelerate``)."""
