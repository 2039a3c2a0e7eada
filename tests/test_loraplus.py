"""LoRA+ (``optimizer.loraplus_*lr_ratio``): the optimizer's groups against PEFT's own
``create_loraplus_optimizer``, the ratio through a real training run and its resume, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

import diffusion_lora as dl
from diffusion_lora.adapters.state import state_of
from diffusion_lora.training.config import load_config
from diffusion_lora.training.optimizers import build_lr_scheduler, build_optimizer, param_groups, trainable_parameters

from .test_train import config, make_dataset

LR, TE_LR, WD = 1e-3, 4e-4, 0.05


def _cfg(tmp_path: Path, **optimizer) -> dl.TrainConfig:
    raw = config(tmp_path / "data", tmp_path / "out", lora={"text_encoder": True},
                 train={"learning_rate": LR, "text_encoder_lr": TE_LR}, optimizer={"weight_decay": WD, **optimizer})
    return load_config(raw)


def _peft_split(model: torch.nn.Module, lr: float, ratio: float) -> tuple[set[int], set[int], list[dict]]:
    """(A ids, B ids, groups) of PEFT's LoRA+ optimizer over one component."""
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, weight_decay=WD)
    a = {id(p) for g in opt.param_groups if g["lr"] == lr for p in g["params"]}
    b = {id(p) for g in opt.param_groups if g["lr"] == lr * ratio for p in g["params"]}
    return a, b, opt.param_groups


def _ids(group: dict) -> set[int]:
    return {id(p) for p in group["params"]}


@pytest.mark.parametrize(("use_dora", "optimizer", "ratios"), [
    (False, {"loraplus_lr_ratio": 16}, (16, 16)),
    (True, {"loraplus_lr_ratio": 16, "loraplus_unet_lr_ratio": 8, "loraplus_text_encoder_lr_ratio": 4}, (8, 4)),
], ids=["lora", "dora-kohya-per-part"])
def test_groups_match_peft_loraplus_except_dora_magnitude_and_weight_decay(tmp_path, use_dora, optimizer, ratios):
    cfg = _cfg(tmp_path, **optimizer)
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    dl.add_lora(pipe, "style", rank=4, targets="attn", text_encoder=True, use_dora=use_dora)
    named = trainable_parameters(state_of(pipe))
    groups = param_groups(cfg, named, "unet")
    assert [g["name"] for g in groups] == ["denoiser", "denoiser plus", "text_encoder", "text_encoder plus"]
    assert [g["lr"] for g in groups] == [LR, LR * ratios[0], TE_LR, TE_LR * ratios[1]]
    magnitudes = {id(p) for n, p in named if "lora_magnitude_vector" in n}
    assert bool(magnitudes) == use_dora
    for (mine_a, mine_b), model, lr, ratio in [(groups[:2], pipe.unet, LR, ratios[0]),
                                               (groups[2:], pipe.text_encoder, TE_LR, ratios[1])]:
        peft_a, peft_b, peft_groups = _peft_split(model, lr, ratio)
        assert _ids(mine_b) and _ids(mine_a)
        # Same A/B membership as PEFT's, except that PEFT puts every 1-D parameter (the DoRA magnitude)
        # with B, where we keep it at the base rate.
        assert _ids(mine_b) == peft_b - magnitudes
        assert _ids(mine_a) == peft_a | (peft_b & magnitudes)
        assert (peft_b & magnitudes) == (magnitudes & {id(p) for p in model.parameters()})
        assert {g["weight_decay"] for g in peft_groups} == {0.0}  # PEFT drops weight decay; we keep it:
    opt = build_optimizer(cfg, groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [WD] * 4
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)


def test_one_adamw_step_moves_up_factors_ratio_times_further(tmp_path):
    """B starts at zero, so after one AdamW step |B| = its rate (Adam's first step has size lr per
    element); A gets no gradient yet (B = 0) and moves by weight decay only; DoRA's magnitude at the base rate."""
    cfg = _cfg(tmp_path, loraplus_lr_ratio=16, loraplus_text_encoder_lr_ratio=4)
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    dl.add_lora(pipe, "style", rank=4, targets="attn", text_encoder=True, use_dora=True)
    named = trainable_parameters(state_of(pipe))
    before = {n: p.detach().clone() for n, p in named}
    opt = build_optimizer(cfg, param_groups(cfg, named, "unet"))
    scheduler = build_lr_scheduler(cfg, opt)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    unet = pipe.unet
    size = unet.config.sample_size
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    unet(latents, 10, pipe.text_encoder(ids)[0]).sample.pow(2).mean().backward()
    opt.step()
    scheduler.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in named}

    def largest(component: str, part: str) -> float:
        return max(v for n, v in moved.items() if n.startswith(component + ".") and f".{part}." in n)

    assert largest("unet", "lora_B") == pytest.approx(LR * 16, rel=1e-3)
    assert largest("text_encoder", "lora_B") == pytest.approx(TE_LR * 4, rel=1e-3)
    for component, lr in (("unet", LR), ("text_encoder", TE_LR)):
        decay = max(float(before[n].abs().max()) for n in before if n.startswith(component + ".") and ".lora_A." in n)
        assert largest(component, "lora_A") <= lr * WD * decay * 1.01
        assert lr * 0.5 < largest(component, "lora_magnitude_vector") < lr * 1.5


def _lrs(out: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("lr")} for r in rows}


def test_ratio_through_warmup_in_a_training_run_and_after_resume(tmp_path):
    """The logged rate of every group after each step of a run that stops at step 3 and resumes:
    diffusers' warm-up scales both groups alike, and the resumed scheduler and groups continue it."""
    data = make_dataset(tmp_path / "data", n=4)
    cfg = config(data, tmp_path / "out", train={"steps": 6, "learning_rate": LR},
                 optimizer={"loraplus_lr_ratio": 16}, scheduler={"name": "constant_with_warmup", "warmup_steps": 4},
                 log={"every": 1, "tensorboard": False})
    assert dl.train(cfg, progress=False, max_steps_this_run=3).adapter is None
    assert dl.train(cfg, progress=False, resume=True).adapter is not None
    logged = _lrs(tmp_path / "out")
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for step, lrs in logged.items():
        factor = min(1.0, step / 4)  # linear warm-up, after `step` scheduler steps
        assert lrs.keys() == {"lr", "lr/denoiser", "lr/denoiser_plus"}
        assert lrs["lr"] == lrs["lr/denoiser"] == pytest.approx(LR * factor, rel=1e-12)
        assert lrs["lr/denoiser_plus"] == pytest.approx(16 * LR * factor, rel=1e-12)


@pytest.mark.parametrize(("optimizer", "lora", "message"), [
    ({"loraplus_lr_ratio": 0.5}, {}, "optimizer.loraplus_lr_ratio: 0.5 is out of range; expected a value >= 1"),
    ({"loraplus_lr_ratio": "16"}, {}, "optimizer.loraplus_lr_ratio: expected a number, got '16' (str)"),
    ({"loraplus_unet_lr_ratio": True}, {}, "optimizer.loraplus_unet_lr_ratio: expected a number, got True (bool)"),
    ({"loraplus_lr_ratio": 16, "name": "prodigy"}, {},
     "optimizer.loraplus_lr_ratio: LoRA+ needs a fixed learning rate, and optimizer.name = prodigy sets its own"),
    ({"loraplus_text_encoder_lr_ratio": 4}, {},
     "optimizer.loraplus_text_encoder_lr_ratio: set while lora.text_encoder = false"),
], ids=["below-1", "string", "bool", "prodigy", "te-ratio-without-te"])
def test_config_errors_name_the_key(tmp_path, optimizer, lora, message):
    with pytest.raises(dl.ConfigError) as info:
        load_config(config(tmp_path, tmp_path / "out", optimizer=optimizer, lora=lora))
    assert str(info.value).startswith(message)


def test_ratio_is_kept_in_the_resolved_config_and_off_by_default(tmp_path):
    cfg = load_config(config(tmp_path, tmp_path / "out", optimizer={"loraplus_lr_ratio": 16}))
    assert cfg.optimizer.loraplus_ratios == (16.0, 16.0)
    (tmp_path / "resolved.toml").write_text(cfg.to_toml(), encoding="utf-8")
    assert load_config(tmp_path / "resolved.toml").optimizer == cfg.optimizer
    plain = load_config(config(tmp_path, tmp_path / "out"))
    assert plain.optimizer.loraplus_ratios == (None, None)
    assert "loraplus" not in plain.to_toml()
