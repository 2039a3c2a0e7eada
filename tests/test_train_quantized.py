"""QLoRA: training on a quantized base (model.quantize = "nf4" / "int8") for every family's tiny model.

The trainer is watched, not replaced: the real ``load_pipeline`` is wrapped to keep the pipeline it made
and a copy of the quantized weights' bytes, and a global optimizer step hook records the gradients and
the layer types while the run trains. References are independent of the code under test: bitsandbytes'
and torchao's own classes, the same config trained on the float base, and the float base loading the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import diffusion_lora as dl
from diffusion_lora.formats.safetensors_io import read_metadata
from diffusion_lora.training import trainer

from . import helpers
from .conftest import ALL_TINY
from .test_train import make_dataset

MODES = ("nf4", "int8")


def _is_quantized(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a base layer quantized by bitsandbytes (nf4) or torchao (int8), by the libraries'
    own classes."""
    import bitsandbytes as bnb
    from torchao.utils import TorchAOBaseTensor

    return isinstance(module, bnb.nn.Linear4bit) or isinstance(getattr(module, "weight", None), TorchAOBaseTensor)


def _quantized_bytes(weight: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor a quantized weight is stored in: nf4's packed bytes and (double-quantized) block
    scales; torchao's inner tensors (int8 ``qdata``, ``scale``, …)."""
    if hasattr(weight, "quant_state"):
        state = weight.quant_state
        parts = [weight.data, state.absmax, state.code]
        if state.state2 is not None:
            parts += [state.state2.absmax, state.state2.code, state.offset]
        return [p.detach().clone() for p in parts]
    names = list(weight.tensor_data_names) + [n for n in getattr(weight, "optional_tensor_data_names", ())
                                               if getattr(weight, n, None) is not None]
    return [getattr(weight, n).detach().clone() for n in names]


class Watch:
    """What one ``dl.train`` run did: its pipeline, the quantized layers' bytes at load, and per optimizer
    step the LoRA gradients and how many quantized / PEFT layers the denoiser had."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pipe = None
        self.loaded: list[tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]] = []
        self.steps: list[dict] = []
        real_load = trainer.load_pipeline

        def load_and_keep(*args, **kwargs):
            self.pipe = real_load(*args, **kwargs)
            denoiser = _denoiser(self.pipe)
            self.loaded = [(m, m.weight, _quantized_bytes(m.weight)) for m in denoiser.modules() if _is_quantized(m)]
            return self.pipe

        monkeypatch.setattr(trainer, "load_pipeline", load_and_keep)

    def __enter__(self) -> Watch:
        self.handle = register_optimizer_step_pre_hook(self._on_step)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _on_step(self, optimizer, args, kwargs) -> None:
        names = {id(p): n for n, p in _denoiser(self.pipe).named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        modules = list(_denoiser(self.pipe).modules())
        self.steps.append({
            "dtypes": {p.dtype for p in params},
            "nonzero": {names[id(p)] for p in params if p.grad is not None and bool(p.grad.abs().sum() > 0)},
            "quantized": {id(m.weight) for m in modules if _is_quantized(m)},
            "peft_on_quantized": sum(type(m).__module__.startswith("peft.tuners.lora")
                                     and _is_quantized(getattr(m, "base_layer", m)) for m in modules),
            "optimizer": type(optimizer).__name__,
        })


def _denoiser(pipe) -> torch.nn.Module:
    return getattr(pipe, "transformer", None) or pipe.unet


def _lora_params(pipe) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in _denoiser(pipe).named_parameters() if ".lora_" in n}


def _config(data: Path, out: Path, kind: str, quantize: str | None, **sections) -> dict:
    cfg = {
        "model": {"name": kind} | ({"quantize": quantize} if quantize else {}),
        "data": {"path": str(data), "resolution": 32, "min_bucket": 32, "max_bucket": 64, "bucket_step": 32,
                 **helpers.paired_data(kind, data)},
        "lora": {"rank": 4},
        "train": {"steps": 2, "learning_rate": 1e-3, "batch_size": 1, "gradient_checkpointing": True},
        "optimizer": {"name": "adamw8bit"},
        "cache": {"text_encoders": "auto"},
        "output": {"dir": str(out), "name": "style"},
        "log": {"tensorboard": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("qdata"), n=2, size=(32, 32))


@pytest.fixture(scope="module")
def float_runs(dataset, tmp_path_factory) -> dict:
    """The same config trained on each float base (once per kind), watched the same way."""
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            with pytest.MonkeyPatch.context() as mp, Watch(mp) as watch:
                result = dl.train(_config(dataset, tmp_path_factory.mktemp("f32"), kind, None), progress=False)
            cache[kind] = (result, watch)
        return cache[kind]

    return get


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ALL_TINY)
def test_qlora_trains_saves_a_normal_file_that_loads_exactly_on_the_float_base(
        dataset, float_runs, tmp_path, monkeypatch, kind, mode):
    reference, float_watch = float_runs(kind)
    with Watch(monkeypatch) as watch:
        result = dl.train(_config(dataset, tmp_path / "q", kind, mode), progress=False)

    # during training: the denoiser's linears stayed quantized under PEFT's quantized LoRA layers, the
    # trainable parameters were the float32 LoRA weights, the 8-bit optimizer stepped, gradients flowed
    assert len(watch.steps) == 2 and watch.loaded
    for step in watch.steps:
        assert step["quantized"] == {id(weight) for _, weight, _ in watch.loaded}
        assert step["peft_on_quantized"] > 0
        assert step["dtypes"] == {torch.float32} and step["optimizer"] == "AdamW8bit"
    # after step 1 (lora_B no longer zero) the same LoRA tensors get gradients as on the float base
    assert watch.steps[-1]["nonzero"] == float_watch.steps[-1]["nonzero"]
    nonzero = watch.steps[-1]["nonzero"]
    assert any(".lora_A." in n for n in nonzero) and any(".lora_B." in n for n in nonzero)
    assert result.freed_text_encoders == reference.freed_text_encoders

    # the base's quantized weights are the very objects loaded, bit for bit
    for module, weight, saved in watch.loaded:
        assert module.weight is weight
        assert all(torch.equal(a, b) for a, b in zip(_quantized_bytes(weight), saved, strict=True))

    # the file is a normal adapter file: the keys and shapes of the float-base run
    tensors, float_tensors = load_file(str(result.adapter)), load_file(str(reference.adapter))
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in float_tensors.items()}
    assert read_metadata(result.adapter)["diffusion_lora.base_quantize"] == mode
    assert "diffusion_lora.base_quantize" not in read_metadata(reference.adapter)

    # ... and the full-precision base loads exactly the trained tensors
    trained = _lora_params(watch.pipe)
    assert trained and all(t.dtype == torch.float32 for t in trained.values())
    pipe = dl.load_pipeline(kind)
    assert not any(_is_quantized(m) for m in _denoiser(pipe).modules())
    dl.load_lora(pipe, result.adapter)
    loaded = _lora_params(pipe)
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[n], trained[n]) for n in trained)


def test_resume_on_a_quantized_base_is_bit_identical_and_samples(dataset, tmp_path):
    """The usual QLoRA recipe: nf4 computing in bfloat16 under bf16 autocast, 8-bit AdamW, checkpointing."""
    mode = "nf4"

    def cfg(out: str) -> dict:
        return _config(dataset, tmp_path / out, "tiny-flux", mode, model={"dtype": "bfloat16"},
                       train={"steps": 4, "mixed_precision": "bf16"}, checkpoint={"every": 2},
                       sample={"every": 2, "prompts": ["a red circle"], "steps": 2, "width": 32, "height": 32})

    straight = dl.train(cfg("a"), progress=False)
    first = dl.train(cfg("b"), progress=False, max_steps_this_run=2)
    assert first.adapter is None and first.checkpoint.name == "checkpoint-00000002"
    resumed = dl.train(cfg("b"), progress=False, resume=True)
    a, b = load_file(str(straight.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.losses[2:] == resumed.losses
    assert straight.freed_text_encoders == ("text_encoder", "text_encoder_2")  # captions cached, encoders freed
    # previews were generated on the quantized base during training
    samples = sorted(p.name for p in (tmp_path / "a" / "samples").glob("*.png"))
    assert samples == ["step_000002.png", "step_000004.png"]
    assert f"quantized to {mode} (QLoRA)" in (tmp_path / "a" / "README.md").read_text()


def test_resume_refuses_a_checkpoint_of_another_base_quantization(dataset, tmp_path):
    cfg = _config(dataset, tmp_path / "r", "tiny-flux", None, train={"steps": 2}, checkpoint={"every": 1})
    assert dl.train(cfg, progress=False, max_steps_this_run=1).checkpoint is not None
    cfg["model"]["quantize"] = "nf4"
    with pytest.raises(dl.ConfigError, match="different config"):
        dl.train(cfg, progress=False, resume=True)


def test_quantize_setting_is_checked_and_named(dataset, tmp_path):
    base = _config(dataset, tmp_path / "x", "tiny-flux", None)
    assert dl.load_config(base, ["model.quantize=nf4"]).model.quantize == "nf4"
    assert dl.load_config(base, ["model.quantize=none"]).model.quantize is None
    assert "quantize" not in dl.load_config(base).to_dict()["model"]  # unset: old checkpoints still resume
    with pytest.raises(dl.ConfigError, match=r"^model\.quantize: expected one of 'nf4', 'int8', 'fp8', got 'nf5'"):
        dl.load_config(base, ["model.quantize=nf5"])
    with pytest.raises(dl.ConfigError, match=r"^model\.quantize: "):
        dl.load_config(base, ["model.quantize=4"])


def test_missing_quantization_library_is_a_config_error_before_anything_is_written(
        dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what Python does for a package that is absent
    out = tmp_path / "out"
    with pytest.raises(dl.ConfigError, match=r"model\.quantize = nf4 needs bitsandbytes.*"
                                             r"pip install 'diffusion-lora\[quant\]'"):
        dl.train(_config(dataset, out, "tiny-flux", "nf4"), progress=False)
    assert not out.exists()


def test_cli_sets_quantize_and_a_bad_value_exits_2_with_one_line(dataset, tmp_path, capsys):
    from diffusion_lora.cli import main

    common = ["train", "--model", "tiny-flux", "--data", str(dataset), "--steps", "1", "--resolution", "32",
              "--set", "data.min_bucket=32", "--set", "log.tensorboard=false"]
    assert main([*common, "--out", str(tmp_path / "bad"), "--set", "model.quantize=nf5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.quantize: ") and err.count("\n") == 1
    assert main([*common, "--out", str(tmp_path / "ok"), "--quantize", "int8"]) == 0
    adapter = Path(capsys.readouterr().out.strip())
    meta = read_metadata(adapter)
    assert meta["diffusion_lora.base_quantize"] == "int8"
    assert json.loads(meta["diffusion_lora.train_config"])["model"]["quantize"] == "int8"
