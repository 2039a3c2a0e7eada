"""The training config: defaults, every error path (naming the dotted key), overrides, TOML round trip,
and the sample configs."""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import re
import tomllib
import typing
from pathlib import Path

import pytest

import diffusion_lora as dl
from diffusion_lora.cli import FLAG_KEYS, flags_to_overrides
from diffusion_lora.training.config import (
    LatentCache,
    Loss,
    ModelDtype,
    TextCache,
    TimestepSampling,
)

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
# every sample config (the new ones are checked without edits here)
SAMPLE_FILES = tuple(sorted(p.name for p in SAMPLES.glob("train_*.toml")))


def minimal() -> dict:
    return {"model": {"name": "tiny-sd15"}, "data": {"path": "data/x"}, "output": {"dir": "out/x"}}


def load(overrides=(), **sections) -> dl.TrainConfig:
    raw = minimal()
    for name, body in sections.items():
        raw.setdefault(name, {}).update(body)
    return dl.load_config(raw, overrides)


def error_of(overrides=(), **sections) -> str:
    with pytest.raises(dl.ConfigError) as info:
        load(overrides, **sections)
    return str(info.value)


# ---------------------------------------------------------------- defaults

DEFAULTS = {
    "model": {"name": "tiny-sd15", "dtype": "float32", "quantize": None},
    "data": {"path": "data/x", "instance_prompt": "", "trigger_word": "", "caption_extension": ".txt",
             "resolution": None, "buckets": True, "bucket_step": None, "min_bucket": None, "max_bucket": None,
             "no_upscale": False, "center_crop": True, "flip": False, "caption_dropout": 0.0,
             "shuffle_captions": False, "keep_tokens": 0, "repeats": 1, "skip_bad_images": False,
             "control_path": "", "control_dir": "", "allow_unpaired": False, "mask_path": ""},
    "prior": {"class_dir": "", "class_prompt": "", "weight": 1.0, "num_images": 0},
    # targets, steps, batch_size and learning_rate: chosen from the model and the data (training.recipe)
    "lora": {"rank": 16, "alpha": None, "targets": "auto", "text_encoder": False, "use_dora": False,
             "use_rslora": False},
    "train": {"steps": None, "batch_size": None, "gradient_accumulation": 1, "learning_rate": None,
              "text_encoder_lr": None, "seed": 0, "mixed_precision": "no", "gradient_checkpointing": False,
              "noise_offset": 0.0, "min_snr_gamma": None, "loss": "l2", "huber_delta": 0.1,
              "timestep_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "shift": None,
              "zero_terminal_snr": False, "guidance": 1.0, "max_grad_norm": 1.0, "max_nonfinite_steps": 0},
    "optimizer": {"name": "adamw", "weight_decay": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8,
                  "loraplus_lr_ratio": None, "loraplus_unet_lr_ratio": None, "loraplus_text_encoder_lr_ratio": None},
    "scheduler": {"name": "constant", "warmup_steps": 0},
    "cache": {"latents": "memory", "text": "auto", "text_encoders": "auto", "dir": ""},
    "checkpoint": {"every": 0, "keep": 2},
    "sample": {"every": 0, "prompts": [], "seeds": [0], "steps": 20, "guidance": None, "width": None,
               "height": None},
    "output": {"dir": "out/x", "name": "lora", "save_format": "diffusers"},
    "log": {"tensorboard": True, "every": 10},
}


def test_defaults_of_a_minimal_config_match_the_table():
    cfg = load()
    actual = {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    assert actual == DEFAULTS
    for section, body in DEFAULTS.items():  # same types too: 0.0 is a float, 1 is not True
        for key, value in body.items():
            actual_value = getattr(getattr(cfg, section), key)
            if isinstance(actual_value, enum.Enum):
                assert isinstance(value, str), (section, key)
            else:
                assert type(actual_value) is type(value), (section, key)


def test_enums_are_members_and_equal_their_strings():
    cfg = load(train={"loss": "huber", "timestep_sampling": "logit_normal"}, model={"dtype": "bfloat16"})
    assert cfg.train.loss is Loss.HUBER and cfg.train.loss == "huber"
    assert cfg.train.timestep_sampling is TimestepSampling.LOGIT_NORMAL
    assert cfg.model.dtype is ModelDtype.BFLOAT16 and f"{cfg.model.dtype}" == "bfloat16"


def test_config_is_frozen_and_int_is_accepted_where_a_float_is_expected():
    cfg = load(train={"learning_rate": 1, "guidance": 3})
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert isinstance(cfg.train.guidance, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3  # type: ignore[misc]


def test_derived_values():
    cfg = load()
    assert cfg.lora.effective_alpha == 16.0
    assert load(lora={"alpha": 4}).lora.effective_alpha == 4.0
    assert cfg.text_cache is TextCache.MEMORY
    assert load(lora={"text_encoder": True}).text_cache is TextCache.OFF
    assert load(cache={"text": "disk"}).text_cache is TextCache.DISK
    assert Path(cfg.cache_dir) == Path("out/x/cache")
    assert load(cache={"dir": "/tmp/c"}).cache_dir == "/tmp/c"


def test_targets_accepts_a_string_or_a_list():
    assert load(lora={"targets": ["to_q", "to_v"]}).lora.targets == ["to_q", "to_v"]
    assert load(lora={"targets": "all-linear"}).lora.targets == "all-linear"


# ---------------------------------------------------------------- unknown and missing keys


def test_unknown_key_names_the_dotted_key_and_suggests():
    assert error_of(train={"lerning_rate": 1e-4}) == "train.lerning_rate: unknown key; did you mean learning_rate?"


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    msg = error_of(log={"zzz": 1})
    assert msg.startswith("log.zzz: unknown key; valid keys are ") and "tensorboard" in msg


def test_unknown_section_suggests():
    raw = minimal() | {"trian": {"steps": 3}}
    with pytest.raises(dl.ConfigError, match=r"^trian: unknown section; did you mean train\?"):
        dl.load_config(raw)


@pytest.mark.parametrize("dotted", ["data.path", "output.dir"])
def test_missing_required_key_is_named(dotted):
    section, key = dotted.split(".")
    raw = minimal()
    del raw[section][key]
    with pytest.raises(dl.ConfigError, match=rf"^{re.escape(dotted)}: required key is missing"):
        dl.load_config(raw)
    del raw[section]  # a missing section names its required key too
    with pytest.raises(dl.ConfigError, match=rf"^{re.escape(dotted)}: required key is missing"):
        dl.load_config(raw)


def test_model_name_defaults_to_the_embedded_model_as_in_generate():
    from diffusion_lora.cli import build_parser
    from diffusion_lora.models.loading import EMBEDDED_MODELS

    raw = minimal()
    del raw["model"]
    cfg = dl.load_config(raw)
    assert cfg.model.name == "shapes-sd15" and cfg.model.name in EMBEDDED_MODELS
    generate = build_parser().parse_args(["generate", "--prompt", "x"])
    assert cfg.model.name == generate.model
    assert dl.load_config(tomllib.loads(cfg.to_toml())).model.name == "shapes-sd15"


@pytest.mark.parametrize("dotted", ["model.name", "data.path", "output.dir"])
def test_required_strings_must_not_be_empty(dotted):
    section, key = dotted.split(".")
    with pytest.raises(dl.ConfigError, match=rf"^{re.escape(dotted)}: must not be empty"):
        load(**{section: {key: "  "}})


# ---------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "steps", "abc", "train.steps: expected an integer, got 'abc' (str)"),
        ("train", "steps", True, "train.steps: expected an integer, got True (bool)"),
        ("train", "steps", 2.0, "train.steps: expected an integer, got 2.0 (float)"),
        ("train", "learning_rate", "1e-4", "train.learning_rate: expected a number, got '1e-4' (str)"),
        ("train", "learning_rate", False, "train.learning_rate: expected a number, got False (bool)"),
        ("data", "buckets", 1, "data.buckets: expected a boolean (true or false), got 1 (int)"),
        ("model", "name", 5, "model.name: expected a string, got 5 (int)"),
        ("lora", "alpha", "x", "lora.alpha: expected a number, got 'x' (str)"),
        ("lora", "targets", 3, "lora.targets: expected a string or a list of strings, got 3 (int)"),
        ("lora", "targets", ["to_q", 1], "lora.targets[1]: expected a string, got 1 (int)"),
        ("optimizer", "betas", 0.9, "optimizer.betas: expected a list of numbers, got 0.9 (float)"),
        ("sample", "seeds", [1, 1.5], "sample.seeds[1]: expected an integer, got 1.5 (float)"),
        ("sample", "prompts", "a cat", "sample.prompts: expected a list of strings, got 'a cat' (str)"),
        ("train", "loss", 2, "train.loss: expected one of 'l2', 'huber', got 2 (int)"),
    ],
)
def test_wrong_type_names_key_value_and_type(section, key, value, message):
    assert error_of(**{section: {key: value}}) == message


def test_unknown_enum_value_suggests_the_close_one():
    assert error_of(train={"mixed_precision": "fp32"}) == (
        "train.mixed_precision: expected one of 'no', 'fp16', 'bf16', got 'fp32'; did you mean fp16?")
    assert error_of(cache={"text": "ram"}).startswith("cache.text: expected one of 'auto', 'memory', 'disk', 'off'")


def test_non_finite_numbers_are_rejected():
    assert error_of(train={"learning_rate": float("nan")}) == "train.learning_rate: nan is not a finite number"
    assert error_of(train={"logit_mean": float("inf")}).startswith("train.logit_mean: inf is not a finite")


def test_section_that_is_not_a_table():
    raw = minimal() | {"train": 5}
    with pytest.raises(dl.ConfigError, match=r"^train: expected a table \(\[train\]\), got 5 \(int\)"):
        dl.load_config(raw)


# ---------------------------------------------------------------- ranges

RANGES = [  # (section, key, bad value, an accepted edge value)
    ("data", "resolution", 24, 32), ("data", "resolution", 4104, 4096), ("data", "resolution", 100, 104),
    ("data", "bucket_step", 4, 8), ("data", "bucket_step", 520, 512), ("data", "bucket_step", 12, 16),
    ("data", "caption_dropout", 1.5, 1), ("data", "caption_dropout", -0.1, 0.0),
    ("data", "keep_tokens", -1, 0), ("data", "repeats", 0, 1), ("data", "repeats", 10_001, 10_000),
    ("prior", "weight", -1.0, 0), ("prior", "num_images", -1, 0),
    ("lora", "rank", 0, 1), ("lora", "rank", 1025, 1024), ("lora", "alpha", 0, 0.5),
    ("train", "steps", 0, 1), ("train", "batch_size", 0, 1), ("train", "gradient_accumulation", 0, 1),
    ("train", "learning_rate", 0, 1e-6), ("train", "seed", -1, 2**64 - 1),
    ("train", "noise_offset", -0.1, 0), ("train", "min_snr_gamma", 0, 5), ("train", "huber_delta", 0, 0.5),
    ("train", "logit_std", 0, 0.1), ("train", "shift", -1, 3), ("train", "max_grad_norm", -1, 0),
    ("train", "guidance", -1, 0), ("train", "max_nonfinite_steps", -1, 0),
    ("optimizer", "weight_decay", -0.1, 0), ("optimizer", "eps", 0, 1e-10),
    ("scheduler", "warmup_steps", -1, 0),
    ("checkpoint", "every", -1, 0), ("checkpoint", "keep", 0, 1),
    ("sample", "every", -1, 0), ("sample", "steps", 0, 1), ("sample", "width", 100, 104),
    ("sample", "height", 0, 8), ("sample", "guidance", -1, 0),
    ("log", "every", 0, 1),
]


@pytest.mark.parametrize(("section", "key", "bad", "good"), RANGES)
def test_out_of_range_names_key_and_value(section, key, bad, good):
    msg = error_of(**{section: {key: bad}})
    assert msg.startswith(f"{section}.{key}: {float(bad) if isinstance(good, float) else bad!r}"), msg
    assert "out of range; expected a value" in msg or "is not a multiple of 8" in msg
    loose = {"min_bucket": 8, "max_bucket": 8192} if key == "resolution" else {}  # so resolution's edges fit
    assert getattr(getattr(load(**{section: {**loose, key: good}}), section), key) == good


def test_range_message_states_the_range():
    assert error_of(data={"caption_dropout": 2}) == (
        "data.caption_dropout: 2.0 is out of range; expected a value >= 0 and <= 1")
    assert error_of(data={"resolution": 100}) == "data.resolution: 100 is not a multiple of 8"


@pytest.mark.parametrize(("betas", "key"), [([0.9, 1.0], "optimizer.betas[1]"), ([0.0, 0.9], "optimizer.betas[0]")])
def test_betas_must_lie_strictly_between_0_and_1(betas, key):
    assert error_of(optimizer={"betas": betas}).startswith(f"{key}: ")


def test_betas_must_be_two_values():
    assert error_of(optimizer={"betas": [0.9]}) == "optimizer.betas: expected 2 values [beta1, beta2], got 1"


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("output", "name", "a/b"), ("output", "name", "a\\b"), ("output", "name", ".."), ("output", "name", ""),
     ("output", "name", "x" * 201), ("output", "name", "é" * 101),
     ("data", "caption_extension", "txt"), ("data", "trigger_word", "ohwx, man"), ("lora", "targets", ""),
     ("lora", "targets", []), ("sample", "seeds", [])],
)
def test_string_and_list_checks_name_the_key(section, key, value):
    assert error_of(**{section: {key: value}}).startswith(f"{section}.{key}: ")


# ---------------------------------------------------------------- cross-field checks


@pytest.mark.parametrize(
    ("sections", "keys"),
    [
        ({"data": {"resolution": 128, "min_bucket": 256}}, ["data.min_bucket", "data.resolution"]),
        ({"data": {"min_bucket": 512, "max_bucket": 256}}, ["data.min_bucket", "data.max_bucket"]),
        ({"data": {"resolution": 96, "bucket_step": 64}}, ["data.resolution", "data.bucket_step"]),
        ({"data": {"min_bucket": 100, "bucket_step": 8}}, ["data.min_bucket", "data.bucket_step"]),
        ({"data": {"resolution": 1024, "max_bucket": 768}}, ["data.max_bucket", "data.resolution"]),
        ({"prior": {"num_images": 10}}, ["prior.class_prompt", "prior.num_images"]),
        ({"sample": {"every": 100}}, ["sample.prompts", "sample.every"]),
        ({"train": {"steps": 10}, "scheduler": {"warmup_steps": 10}}, ["scheduler.warmup_steps", "train.steps"]),
        ({"lora": {"text_encoder": True}, "cache": {"text": "memory"}}, ["cache.text", "lora.text_encoder"]),
        ({"lora": {"text_encoder": True}, "cache": {"text": "disk"}}, ["cache.text", "lora.text_encoder"]),
        ({"train": {"text_encoder_lr": 1e-5}}, ["train.text_encoder_lr", "lora.text_encoder"]),
    ],
)
def test_cross_field_errors_name_both_keys(sections, keys):
    msg = error_of(**sections)
    assert msg.startswith(f"{keys[0]}: "), msg
    assert all(k in msg for k in keys), msg


def test_cross_field_rules_accept_valid_combinations():
    load(data={"resolution": 128, "min_bucket": 64, "max_bucket": 128})
    load(prior={"num_images": 10, "class_prompt": "a dog"})
    load(sample={"every": 100, "prompts": ["a cat"]})
    load(train={"steps": 10}, scheduler={"warmup_steps": 9})
    for text in ("auto", "off"):
        load(lora={"text_encoder": True}, cache={"text": text}, train={"text_encoder_lr": 1e-5})


def test_direct_construction_is_checked_too():
    from diffusion_lora.training.config import DataSection, ModelSection, OutputSection

    with pytest.raises(dl.ConfigError, match=r"^data\.resolution: 100 is not a multiple of 8"):
        DataSection(path="x", resolution=100)
    with pytest.raises(dl.ConfigError, match=r"^data\.min_bucket: "):
        dl.TrainConfig(model=ModelSection(name="m"), data=DataSection(path="x", resolution=64, min_bucket=128),
                    output=OutputSection(dir="o"))
    with pytest.raises(dl.ConfigError, match=r"^model: expected a ModelSection"):
        dl.TrainConfig(model={"name": "m"}, data=DataSection(path="x"), output=OutputSection(dir="o"))


# ---------------------------------------------------------------- sizes resolved from the model


def sizes(cfg: dl.TrainConfig) -> tuple:
    d = cfg.data
    return d.resolution, d.bucket_step, d.min_bucket, d.max_bucket


@pytest.mark.parametrize(("resolution", "native", "expected"), [
    (None, 512, (512, 64, 256, 2048)),   # the old fixed defaults, now from the model
    (None, 64, (64, 64, 64, 2048)),      # shapes-sd15: the bucket floor follows it down
    (None, 32, (32, 32, 32, 2048)),      # tiny-* models
    (None, 1024, (1024, 64, 256, 2048)),
    (64, 512, (64, 64, 64, 2048)),       # --resolution 64 on any model
    (128, 512, (128, 64, 128, 2048)),
    (96, 512, (96, 32, 96, 2048)),       # a step that divides the resolution
    (4096, 512, (4096, 64, 256, 4096)),  # the ceiling follows it up
])
def test_unset_sizes_follow_the_resolution(resolution, native, expected):
    from diffusion_lora.training.config import resolve_sizes

    cfg = load(data={"resolution": resolution} if resolution else {})
    resolved = resolve_sizes(cfg, native)
    assert sizes(resolved) == expected
    assert dl.load_config(tomllib.loads(resolved.to_toml())) == resolved  # the saved config is concrete


def test_set_sizes_are_kept_and_a_contradiction_with_the_native_size_is_named():
    from diffusion_lora.training.config import resolve_sizes

    kept = resolve_sizes(load(data={"min_bucket": 128, "max_bucket": 1024, "bucket_step": 32}), 512)
    assert sizes(kept) == (512, 32, 128, 1024)
    with pytest.raises(dl.ConfigError) as info:
        resolve_sizes(load(data={"min_bucket": 256}), 64)
    msg = str(info.value)
    assert msg.startswith("data.min_bucket: 256 is larger than data.resolution (64)")
    assert "native size" in msg
    with pytest.raises(dl.ConfigError, match=r"^data.max_bucket: 768 is smaller than data.resolution \(1024\)"):
        resolve_sizes(load(data={"max_bucket": 768}), 1024)


def test_resolution_flags_below_the_old_bucket_floor_load():
    for flag in ("64", "128"):
        overrides = flags_to_overrides({"resolution": int(flag)})
        assert load(overrides).data.resolution == int(flag)


# ---------------------------------------------------------------- overrides


def test_overrides_are_parsed_as_typed_toml_values():
    cfg = load(["train.steps=20", "train.learning_rate=3e-4", "data.flip=true", "optimizer.betas=[0.8, 0.99]",
                'data.path="quoted path"', "lora.alpha=8", "sample.prompts=['a', 'b']", "train.loss=huber",
                " train.seed = 7 "])
    assert cfg.train.steps == 20 and cfg.train.learning_rate == 3e-4 and cfg.data.flip is True
    assert cfg.optimizer.betas == [0.8, 0.99] and cfg.data.path == "quoted path" and cfg.lora.alpha == 8.0
    assert cfg.sample.prompts == ["a", "b"] and cfg.train.loss is Loss.HUBER and cfg.train.seed == 7


def test_bare_string_overrides():
    cfg = load(["data.path=my/images", "output.dir=C:\\runs\\a", "output.name=2024", "data.trigger_word=",
                "lora.targets=all-linear", "model.name=tiny-sdxl", "data.instance_prompt=a photo of x"])
    assert cfg.data.path == "my/images" and cfg.output.dir == "C:\\runs\\a" and cfg.output.name == "2024"
    assert cfg.data.trigger_word == "" and cfg.lora.targets == "all-linear" and cfg.model.name == "tiny-sdxl"
    assert cfg.data.instance_prompt == "a photo of x"


def test_override_values_go_through_the_same_checks():
    assert error_of(["train.steps=abc"]) == "train.steps: expected an integer, got 'abc' (str)"
    assert error_of(["train.steps=0"]).startswith("train.steps: 0 is out of range")
    assert error_of(["data.flip=yes"]) == "data.flip: expected a boolean (true or false), got 'yes' (str)"


def test_override_unknown_key_or_section_suggests():
    msg = error_of(["train.lerning_rate=1e-4"])
    assert msg.startswith("train.lerning_rate: unknown key; did you mean learning_rate?")
    assert "train.lerning_rate=1e-4" in msg
    assert error_of(["trian.steps=3"]).startswith("trian: unknown section; did you mean train?")


@pytest.mark.parametrize("text", ["train.steps", "steps=3", "train.=3", ".steps=3", "train.steps.x=3", "=3"])
def test_malformed_override(text):
    assert error_of([text]).startswith(f"override {text!r}: expected section.key=value")


def test_overrides_apply_before_validation_and_leave_the_source_alone():
    raw = minimal()
    del raw["data"]["path"]
    raw["data"]["resolution"] = 100
    before = copy.deepcopy(raw)
    cfg = dl.load_config(raw, ["data.path=imgs", "data.resolution=128", "data.min_bucket=64", "prior.weight=0.5"])
    assert cfg.data.path == "imgs" and cfg.data.resolution == 128 and cfg.prior.weight == 0.5
    assert raw == before


def test_flag_keys_and_flags_to_overrides():
    assert FLAG_KEYS == {"model": "model.name", "data": "data.path", "out": "output.dir", "steps": "train.steps",
                         "rank": "lora.rank", "lr": "train.learning_rate", "resolution": "data.resolution",
                         "batch_size": "train.batch_size", "seed": "train.seed", "quantize": "model.quantize"}
    overrides = flags_to_overrides({"steps": "20", "lr": 3e-4, "data": "my imgs", "out": "o", "model": "m",
                                    "seed": None, "rank": 4})
    cfg = dl.load_config({}, overrides)
    assert (cfg.train.steps, cfg.train.learning_rate, cfg.data.path, cfg.lora.rank) == (20, 3e-4, "my imgs", 4)
    assert cfg.train.seed == 0
    with pytest.raises(dl.ConfigError, match=r"^--stpes: unknown flag; did you mean steps\?"):
        flags_to_overrides({"stpes": 3})


# ---------------------------------------------------------------- files


def test_toml_file_and_pathlike(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nname = "tiny-sd15"\n[data]\npath = "d"\n[output]\ndir = "o"\n[train]\nsteps = 7\n')
    assert dl.load_config(path).train.steps == 7
    assert dl.load_config(str(path), ["train.steps=8"]).train.steps == 8


def test_malformed_toml_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nname = "tiny-sd15"\n[data]\npath = \n')
    with pytest.raises(dl.ConfigError) as info:
        dl.load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: invalid TOML") and re.search(r"line 4, column \d+", msg), msg


def test_missing_file_directory_and_non_utf8(tmp_path):
    with pytest.raises(dl.ConfigError, match=r"nope\.toml: config file not found"):
        dl.load_config(tmp_path / "nope.toml")
    with pytest.raises(dl.ConfigError, match=re.escape(str(tmp_path))):
        dl.load_config(tmp_path)
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[model]\nname = "caf\xe9"\n')
    with pytest.raises(dl.ConfigError, match=r"latin1\.toml: invalid TOML"):
        dl.load_config(path)
    with pytest.raises(dl.ConfigError, match=r"^config: expected a TOML file path or a mapping"):
        dl.load_config(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------- round trip


def everything_changed() -> dl.TrainConfig:
    tricky = 'q"uo\\te\tTab\nnl \x01 ünï 🎨 \'single\' #hash'
    sections = {
        "model": {"name": "C:\\models\\sd.safetensors", "dtype": "bfloat16", "quantize": "nf4"},
        "data": {"path": tricky, "instance_prompt": "a [photo] = {x}", "trigger_word": "ohwx",
                 "caption_extension": ".caption", "resolution": 768, "buckets": False, "bucket_step": 32,
                 "min_bucket": 512, "max_bucket": 1024, "no_upscale": True, "center_crop": False, "flip": True,
                 "caption_dropout": 0.1, "shuffle_captions": True, "keep_tokens": 2, "repeats": 3,
                 "skip_bad_images": True},
        "prior": {"class_dir": "cls", "class_prompt": "a dog", "weight": 0.3, "num_images": 50},
        "lora": {"rank": 4, "alpha": 2.5, "targets": ["to_q", "to_k"], "text_encoder": True, "use_dora": True,
                 "use_rslora": True},
        "train": {"steps": 123, "batch_size": 2, "gradient_accumulation": 3, "learning_rate": 1 / 3,
                  "text_encoder_lr": 1e-20, "seed": 2**64 - 1, "mixed_precision": "bf16",
                  "gradient_checkpointing": True, "noise_offset": 0.05, "min_snr_gamma": 5, "loss": "huber",
                  "huber_delta": 0.25, "timestep_sampling": "shift", "logit_mean": -0.5, "logit_std": 1.5,
                  "shift": 3.1, "zero_terminal_snr": True, "guidance": 3.5, "max_grad_norm": 0},
        "optimizer": {"name": "prodigy", "weight_decay": 0, "betas": [0.5, 0.999999], "eps": 1e-30},
        "scheduler": {"name": "cosine", "warmup_steps": 10},
        "cache": {"latents": "disk", "text": "off", "dir": "/c"},
        "checkpoint": {"every": 5, "keep": 9},
        "sample": {"every": 7, "prompts": [tricky, ""], "seeds": [1, 2**63], "steps": 4, "guidance": 0,
                   "width": 256, "height": 512},
        "output": {"dir": "o", "name": "x.y", "save_format": "comfyui"},
        "log": {"tensorboard": False, "every": 1},
    }
    return load((), **sections)


@pytest.mark.parametrize("make", [load, everything_changed], ids=["defaults", "everything"])
def test_to_toml_round_trip(make):
    cfg = make()
    assert dl.load_config(tomllib.loads(cfg.to_toml())) == cfg
    assert dl.load_config(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_to_dict_is_plain_data_and_omits_unset_optionals():
    d = load().to_dict()
    assert d["train"]["loss"] == "l2" and type(d["train"]["loss"]) is str
    assert "alpha" not in d["lora"] and "shift" not in d["train"] and "width" not in d["sample"]
    assert list(d) == list(DEFAULTS)
    # leaving None out is lossless only because every field that accepts None defaults to None
    for section in dataclasses.fields(dl.TrainConfig):
        cls = typing.get_type_hints(dl.TrainConfig)[section.name]
        for f in dataclasses.fields(cls):
            if type(None) in typing.get_args(typing.get_type_hints(cls)[f.name]):
                assert f.default is None, f"{section.name}.{f.name}"


def test_round_trip_through_a_file(tmp_path):
    cfg = everything_changed()
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    assert dl.load_config(path) == cfg


# ---------------------------------------------------------------- samples


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_sample_files_load_and_round_trip(name):
    cfg = dl.load_config(SAMPLES / name)
    assert dl.load_config(tomllib.loads(cfg.to_toml())) == cfg


def test_samples_say_what_they_promise():
    style = dl.load_config(SAMPLES / "train_style_sd15.toml")
    assert style.model.name == "tiny-sd15" and style.lora.rank == 8 and style.data.buckets
    assert style.cache.latents is not LatentCache.OFF
    char = dl.load_config(SAMPLES / "train_character_sdxl.toml")
    assert char.data.trigger_word and char.lora.text_encoder and char.prior.num_images == 0
    assert "# [prior]" in (SAMPLES / "train_character_sdxl.toml").read_text()
    flux = dl.load_config(SAMPLES / "train_flux.toml")
    assert flux.train.timestep_sampling is TimestepSampling.SHIFT and flux.sample.guidance is not None


def test_the_reference_sample_documents_every_key():
    text = (SAMPLES / "train_style_sd15.toml").read_text()
    sections = re.findall(r"^\[(\w+)\]", text, flags=re.MULTILINE)
    assert sections == list(DEFAULTS)
    for section, body in DEFAULTS.items():
        part = text.split(f"[{section}]", 1)[1].split("\n[", 1)[0]
        for key in body:
            assert re.search(rf"^#? ?{key} = ", part, flags=re.MULTILINE), f"{section}.{key} is not in the sample"


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_commands_in_sample_headers_give_valid_configs(name):
    """The `diffusion-lora train ...` lines in each header parse with the real CLI and load."""
    from diffusion_lora.cli import build_parser

    header = (SAMPLES / name).read_text().split("\n[", 1)[0]
    joined = re.sub(r"\\\n#\s*", " ", header)
    commands = re.findall(r"diffusion-lora (train \S+.*)", joined)
    assert commands
    for command in commands:
        args = build_parser().parse_args(command.split())
        overrides = flags_to_overrides({flag: getattr(args, flag, None) for flag in FLAG_KEYS})
        cfg = dl.load_config(SAMPLES / Path(args.config).name, [*overrides, *args.set])
        assert cfg.model.name
