"""Placing PEFT LoRA layers into pipeline components and taking them out again."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch.overrides import TorchFunctionMode

from ..compat import peft as compat_peft
from ..errors import ConfigError, UnsupportedModelError
from ..families import ALL_LAYERS, ALL_LINEAR, Family
from ..formats.adapter_data import ModuleLora
from ..formats.peft_format import lora_config_fields
from .layers import ADAPTABLE, plain_modules
from .quantized import compute_dtype, dora_problem, peft_layer_kwargs, quant_kind

logger = logging.getLogger(__name__)


def resolve_targets(
    model: torch.nn.Module, suffixes: Sequence[str], *, component: str, linear_only: bool = True
) -> list[str]:
    """Exact module paths in ``model`` whose names end with one of ``suffixes`` (:data:`ALL_LINEAR`: every
    Linear; :data:`ALL_LAYERS`: every Linear and Conv2d). Named suffixes match Linear layers only, or Conv2d
    layers too when ``linear_only`` is false.

    Raises ConfigError when nothing matches, naming the component and the suffixes.
    """
    wanted = tuple(suffixes)
    everything = wanted in (ALL_LINEAR, ALL_LAYERS)
    kinds = (torch.nn.Linear,) if linear_only and wanted != ALL_LAYERS else ADAPTABLE
    paths = [
        path
        for path, module in plain_modules(model)
        if isinstance(module, kinds)
        and (everything or any(path == s or path.endswith("." + s) for s in wanted))
    ]
    if not paths:
        raise ConfigError(
            f"targets: no layer of {component} matches {list(wanted)}; check the module names "
            f"(e.g. to_q, to_k, to_v, to_out.0) or use a preset such as 'attn'"
        )
    return paths


def target_paths(model: torch.nn.Module, family: Family, targets: str | Sequence[str], component: str) -> list[str]:
    """Module paths for a preset name or an explicit list of module names/suffixes (which may name Conv2d
    layers: ``conv1``, ``conv2``, ``proj_in``)."""
    if isinstance(targets, str):
        return resolve_targets(model, family.targets(targets), component=component)
    return resolve_targets(model, tuple(targets), component=component, linear_only=False)


def inject(
    model: torch.nn.Module,
    name: str,
    config: LoraConfig,
    layers: Mapping[str, tuple[int, float, bool]],
    *,
    empty: bool,
) -> dict[str, LoraLayer]:
    """Add adapter ``name`` to ``model`` at exactly the module paths of ``layers``
    (path → rank, alpha, whether ``lora_B`` has a bias); returns the LoRA layer at each path.

    Creates PEFT's own LoRA layers one by one, which skips the whole-model scans, the trainable
    marking and the activation PEFT's ``inject_adapter_in_model`` does on every call (most of its
    time on a large UNet). ``empty=True`` creates the LoRA tensors on the meta device because they
    are assigned right after. Other adapters' configs are kept.
    """
    previous = dict(getattr(model, "peft_config", {}) or {})
    placed = _create_layers(model, name, config, layers, empty=empty)
    previous[name] = config
    model.peft_config = previous
    compat_peft.mark_peft_loaded(model, True)
    return placed


def _create_layers(
    model: torch.nn.Module,
    name: str,
    config: LoraConfig,
    layers: Mapping[str, tuple[int, float, bool]],
    *,
    empty: bool,
) -> dict[str, LoraLayer]:
    # DoRA on a quantized layer dequantizes (copies) the base weight while the layer is built, which the meta
    # device cannot hold: such an adapter is built with real tensors.
    dora_on_quantized = config.use_dora and any(quant_kind(_module_at(model, path)) is not None for path in layers)
    context = _empty_tensors if empty and not dora_on_quantized else contextlib.nullcontext
    if empty:  # the weights are assigned next: skip PEFT's second random init of every LoRA matrix
        config = dataclasses.replace(config, init_lora_weights=False)
    # lora_bias only where the adapter changes a bias: PEFT cannot fuse a LoRA bias into a bias-less layer
    configs = {False: dataclasses.replace(config, lora_bias=False)} if config.lora_bias else {False: config}
    if config.lora_bias:
        configs[True] = config
    placed = {}
    with context():
        for path, (rank, alpha, bias) in layers.items():
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            target = getattr(parent, child)
            cfg = configs[bias]
            if cfg.use_dora and (problem := dora_problem(_module_at(model, path), path)):
                raise UnsupportedModelError(f"use_dora: {problem}")
            if isinstance(target, LoraLayer):
                compat_peft.add_to_layer(target, cfg, name, rank=rank, alpha=alpha, path=path)
                placed[path] = target
                continue
            new = compat_peft.new_layer(cfg, name, target, rank=rank, alpha=alpha, path=path,
                                        quantized=peft_layer_kwargs(target))
            setattr(parent, child, new)
            placed[path] = new
    return placed


def _module_at(model: torch.nn.Module, path: str) -> torch.nn.Module:
    module = model.get_submodule(path)
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


class _SkipInit(TorchFunctionMode):
    """Makes torch.nn.init's in-place initialisers (``kaiming_uniform_``, ``uniform_``, …) return their
    tensor untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # torch's signature
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@contextlib.contextmanager
def _empty_tensors() -> Iterator[None]:
    """New tensors on the meta device, and no initialisation of them.

    The LoRA tensors PEFT creates are replaced by the file's right after. Initialising them (even on
    meta, where torch runs its Python decompositions) was about a tenth of the time of placing an
    adapter, and PEFT's constructors are most of a load's time.
    Torch function modes are per thread, unlike PEFT's ``init_empty_weights``, which patches
    ``nn.Module.register_parameter`` for every thread while it runs.
    """
    with torch.device("meta"), _SkipInit():
        yield


def config_for(modules: Mapping[str, ModuleLora], use_rslora: bool) -> LoraConfig:
    """A LoraConfig that reproduces ``modules`` (paths in one component) exactly."""
    return LoraConfig(**lora_config_fields(modules, use_rslora))


def assign_weights(layers: Mapping[str, LoraLayer], name: str, modules: Mapping[str, ModuleLora]) -> None:
    """Put the tensors of ``modules`` into the LoRA layers of adapter ``name`` (``layers``: path → layer,
    as :func:`inject` returns them), on each layer's device/dtype."""
    for path, m in modules.items():
        layer = layers[path]
        base = layer.get_base_layer()
        weight = base.weight
        dtype = compute_dtype(base)

        def param(t: torch.Tensor) -> torch.nn.Parameter:
            return torch.nn.Parameter(t.to(device=weight.device, dtype=dtype), requires_grad=False)

        layer.lora_A[name].weight = param(m.down.reshape(layer.lora_A[name].weight.shape))
        layer.lora_B[name].weight = param(m.up.reshape(layer.lora_B[name].weight.shape))
        if m.magnitude is not None:
            # AdapterData keeps magnitude as [out]; PEFT's conv DoRA stores it as [1, out, 1, 1].
            shape = layer.lora_magnitude_vector[name].weight.shape
            layer.lora_magnitude_vector[name].weight = param(m.magnitude.reshape(shape))
        if m.bias is not None:
            layer.lora_B[name].bias = param(m.bias)


def remove_from_model(model: torch.nn.Module, name: str) -> int:
    """Delete adapter ``name`` from ``model``; layers left with no adapter are unwrapped.

    Returns the number of layers the adapter was in. The model ends up exactly as before the adapter
    was added when it was the only one.
    """
    count = 0
    for path, layer in list(model.named_modules()):
        if not isinstance(layer, LoraLayer) or name not in layer.lora_A:
            continue
        count += 1
        compat_peft.set_active_adapters(layer, [a for a in layer.active_adapters if a != name])
        layer.delete_adapter(name)
        if not layer.lora_A:
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, layer.get_base_layer())
    configs = getattr(model, "peft_config", None)
    if configs is not None:
        configs.pop(name, None)
        if not configs:
            del model.peft_config
            compat_peft.mark_peft_loaded(model, False)
    return count
