"""The ``diffusion-lora`` command line: argument parsing and output, nothing else."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Only light modules at the top: `--help` and `--version` must not import torch, diffusers, transformers
# or peft. Each command imports what it runs inside its function (CLI start-up).
from .errors import ConfigError, DatasetError, DiffusionLoraError
from .families import FAMILIES
from .formats.file_format import FileFormat
from .formats.printable import printable
from .model_names import DEFAULT_MODEL  # the embedded trained base (diffusion_lora/assets)
from .version import __version__

_FORMATS = [f.value for f in FileFormat]  # --to choices
_FAMILY_NAMES = list(FAMILIES)  # --family choices


def split_weighted(spec: str, default: float = 1.0) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` → (path, weight); a trailing part that is not a number belongs to the path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, default


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images with stacked LoRA adapters")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"base model: shapes-sd15, a tiny-* name, a diffusers folder, a .safetensors checkpoint "
                   f"or a hub id (default: {DEFAULT_MODEL})")
    _add_quantized_base(p)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="adapter file to apply, repeatable; weight defaults to 1")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="folder where <lora:NAME:W> prompt tags look for NAME.safetensors")
    _add_allow_pickle(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt, repeatable; may contain <lora:NAME_OR_PATH:WEIGHT> tags")
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed, seed+1, …)")
    p.add_argument("--sampler", metavar="NAME",
                   help="A1111 sampler: Euler a, Euler, Heun, DPM2, DPM2 a, DPM++ 2M, DPM++ 2M SDE, DPM++ SDE, DDIM, "
                   "PLMS, UniPC, LCM, … or an older combined name like 'DPM++ 2M Karras' (default: the model's own)")
    p.add_argument("--scheduler", metavar="TYPE",
                   help="A1111 schedule type: Automatic, Uniform, Karras, Exponential, SGM Uniform, Simple, Beta")
    p.add_argument("--out", default="out", help="output folder for the PNGs (default: out)")
    p.add_argument("--max-pixels", type=int,
                   help="largest height x width allowed (default: 16x the model's native pixel count, "
                   "at least 2048x2048)")
    p.add_argument("--fuse", action="store_true", help="fuse adapters into the weights for speed")
    p.add_argument("--offload", choices=("model", "sequential", "group"),
                   help="keep weights in CPU memory and move them to the GPU as they are needed: model (one model "
                   "at a time), sequential (one layer at a time: least memory, slowest), group (one block at a "
                   "time, copies overlapped with compute); needs a GPU")
    p.add_argument("--image", metavar="PATH", help="Flux.1 Kontext: the image to edit; Fill: the image to paint in")
    p.add_argument("--mask", metavar="PATH", help="Flux.1 Fill: the mask, white = repaint")
    p.add_argument("--control-image", metavar="PATH", help="Flux.1 Control: the depth or edge image to follow")
    p.set_defaults(func=_run_generate)


def _add_quantized_base(p: argparse.ArgumentParser) -> None:
    # no argparse choices: a bad value is one `error:` line (exit 2) from the library's own check
    p.add_argument("--quantize", metavar="{nf4,int8,fp8}",
                   help="quantize the base's denoiser: nf4 (bitsandbytes 4-bit), int8 or fp8 (torchao weight-only); "
                   "needs pip install 'diffusion-lora[quant]'")
    p.add_argument("--denoiser", metavar="FILE",
                   help="use this denoiser (transformer/UNet) weights file instead of the base's: a GGUF file "
                   "(e.g. flux1-dev-Q4_K.gguf, kept quantized) or a .safetensors with the denoiser's keys")


def _quantized_base(args: argparse.Namespace) -> dict[str, Any]:
    """load_pipeline's quantize/denoiser arguments, the quantization checked before anything loads."""
    from .models.quantize import parse_quantize, require_library

    mode = parse_quantize(args.quantize, "--quantize")
    if mode is not None:
        require_library(mode, "--quantize")
    return {"quantize": mode, "denoiser": args.denoiser}


def _run_generate(args: argparse.Namespace) -> int:
    # imported here, not at the top: CLI start-up (--help must not import torch)
    from .adapters import fuse, load_lora, set_weights
    from .generate import GenerationSettings, ImageFolder, iter_generate
    from .models import load_pipeline
    from .models.image_inputs import image_inputs
    from .models.offload import apply_offload, check_offload
    from .prompt_tags import parse_lora_tags

    # Everything the arguments alone can refuse is refused before the model loads.
    settings = GenerationSettings(
        prompts=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
        seed=args.seed, height=args.height, width=args.width, num_images=args.num_images,
        lora_dirs=args.lora_dir, max_pixels=args.max_pixels, sampler=args.sampler, scheduler=args.scheduler,
        # read now: a bad image file is refused before the model loads
        **image_inputs({"image": args.image, "mask_image": args.mask, "control_image": args.control_image}),
    )
    for prompt in args.prompt:
        parse_lora_tags(prompt)
    specs = [split_weighted(spec) for spec in args.lora]
    base = _quantized_base(args)
    offload = check_offload(args.offload, setting="--offload")
    folder = ImageFolder(args.out)
    pipe = load_pipeline(args.model, **base)
    loras = {}
    for path, weight in specs:
        name = load_lora(pipe, path, weight=weight, allow_pickle=args.allow_pickle)
        loras[name] = weight
    settings = dataclasses.replace(settings, loras=loras)
    if args.fuse:
        set_weights(pipe, loras)
        fuse(pipe)
    if offload is not None:  # after the adapters: sequential offload moves the weights off the CPU
        apply_offload(pipe, *offload, setting="--offload")
    for result in iter_generate(pipe, settings, model_file=_single_file(args.model)):
        print(printable(folder.add(result)))  # each image is on disk as soon as it is made
    return 0


def _single_file(model: str) -> str | None:
    """``--model`` when it names a checkpoint file (its hash and stem go into the PNG parameters)."""
    try:
        return model if Path(model).is_file() else None
    except OSError:
        return None


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="describe an adapter file: format, family, ranks, metadata, hashes")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    # imported here, not at the top: CLI start-up (--help must not import torch)
    from .tools.inspect import format_report, inspect_file

    report = inspect_file(args.file)
    print(report.to_json() if args.json else format_report(report))
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="rewrite an adapter file in another key format")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", required=True, choices=_FORMATS)
    p.add_argument("--family", choices=_FAMILY_NAMES,
                   help="model family, when the file's metadata and keys do not say")
    p.add_argument("--model", help="resolve keys against this model instead of the family's reference model")
    _add_allow_pickle(p)
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    # imported here, not at the top: CLI start-up (--help must not import torch)
    from .tools.convert import convert_file

    out = convert_file(args.input, args.output, args.to, family=args.family, keys=_model_keys(args.model),
                       allow_pickle=args.allow_pickle)
    print(out)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a LoRA from a folder of images (TOML config and/or flags)")
    p.add_argument("config", nargs="?", help="TOML config file (see samples/); flags override it")
    p.add_argument("--model", help=f"base model (model.name; default: {DEFAULT_MODEL})")
    p.add_argument("--data", help="image folder (data.path)")
    p.add_argument("--out", help="output folder (output.dir)")
    p.add_argument("--steps", type=int, help="train.steps (default: each image seen 200 times, in [100, 4000])")
    p.add_argument("--rank", type=int, help="lora.rank")
    p.add_argument("--lr", type=float, help="train.learning_rate (default: from the denoiser's size; 1e-4 from "
                                             "500 M parameters)")
    p.add_argument("--resolution", type=int, help="data.resolution (default: the model's native image size)")
    p.add_argument("--batch-size", type=int, dest="batch_size",
                   help="train.batch_size (default: 1; up to 8 for denoisers under 50 M parameters)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--quantize", help="model.quantize: nf4, int8 or fp8 (train on a quantized base: QLoRA)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config value")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output folder")
    p.add_argument("--estimate", action="store_true",
                   help="print the memory the run needs, by part (no weights are loaded), and exit without training")
    p.set_defaults(func=_run_train)


# `train` flag name -> the config's dotted key it sets.
FLAG_KEYS = types.MappingProxyType({
    "model": "model.name", "data": "data.path", "out": "output.dir", "steps": "train.steps",
    "rank": "lora.rank", "lr": "train.learning_rate", "resolution": "data.resolution",
    "batch_size": "train.batch_size", "seed": "train.seed", "quantize": "model.quantize",
})


def flags_to_overrides(flags: dict[str, Any]) -> list[str]:
    """Override strings for named `train` flags (:data:`FLAG_KEYS`); flags whose value is None are skipped.
    A string value is passed as typed on the command line; other values are written as TOML."""
    from .training.typed_config import did_you_mean, toml_value  # why here: `--help` imports no training code

    out = []
    for flag, value in flags.items():
        if flag not in FLAG_KEYS:
            raise ConfigError(f"--{flag}: unknown flag{did_you_mean(flag, FLAG_KEYS)}")
        if value is not None:
            out.append(f"{FLAG_KEYS[flag]}={value if isinstance(value, str) else toml_value(value)}")
    return out


def _run_train(args: argparse.Namespace) -> int:
    # imported here, not at the top: CLI start-up (--help must not import torch)
    from .training.trainer import train

    overrides = flags_to_overrides({flag: getattr(args, flag, None) for flag in FLAG_KEYS})
    if args.estimate:
        from .training.config import load_config
        from .training.memory import estimate_memory

        print(estimate_memory(load_config(args.config or {}, [*overrides, *args.set])).format())
        return 0
    result = train(args.config or {}, overrides=[*overrides, *args.set], resume=args.resume)
    if result.adapter is not None:
        print(result.adapter)
    return 0


def _add_allow_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read pickled .ckpt/.pt/.bin adapters, with torch.load(weights_only=True) only")


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="combine adapter files with weights into one")
    p.add_argument("inputs", nargs="+", metavar="FILE[:WEIGHT]")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--method", choices=["concat", "svd"], default="concat",
                   help="concat: exact (ranks add up); svd: truncate the summed delta to --rank/--dynamic")
    p.add_argument("--rank", type=int)
    p.add_argument("--dynamic", metavar="RULE:X", help="sv_ratio:X, sv_fro:X or sv_cumulative:X")
    p.add_argument("--to", default="diffusers", choices=_FORMATS)
    p.add_argument("--family", choices=_FAMILY_NAMES)
    p.add_argument("--model", help="resolve keys against this model instead of the family's reference model")
    _add_allow_pickle(p)
    p.set_defaults(func=_run_merge)


def _print_energy(report: Any, verbose: bool) -> None:
    if verbose:
        for name, kept in sorted(report.energy.items()):
            print(f"  {printable(name)}: rank {report.ranks.get(name, '?')}, energy retained {kept:.4f}")
    print(f"{report.out}: {report.modules} modules, total Frobenius energy retained {report.total_energy:.4f}")


def _model_keys(model: str | None) -> Any:
    """Layer shapes of ``--model`` when given, without loading weights where its configs suffice (else
    the tools use the base model the file records, or the family's reference model)."""
    if not model:
        return None
    # imported here, not at the top: CLI start-up (--help must not import torch)
    from .tools.base_keys import keys_of_model

    return keys_of_model(model)


def _run_merge(args: argparse.Namespace) -> int:
    # imported here, not at the top: CLI start-up (--help must not import torch)
    from .tools.merge import merge_files

    report = merge_files([split_weighted(spec) for spec in args.inputs], args.out, method=args.method,
                         rank=args.rank, dynamic=args.dynamic, to=args.to, family=args.family,
                         keys=_model_keys(args.model), allow_pickle=args.allow_pickle)
    _print_energy(report, args.verbose)
    return 0


def _add_resize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resize", help="shrink an adapter's rank by SVD, keeping its effective scale")
    p.add_argument("input")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--rank", type=int)
    p.add_argument("--dynamic", metavar="RULE:X", help="sv_ratio:X, sv_fro:X or sv_cumulative:X")
    p.add_argument("--to", choices=_FORMATS, help="default: the input's format")
    p.add_argument("--family", choices=_FAMILY_NAMES)
    p.add_argument("--model", help="resolve keys against this model instead of the family's reference model")
    _add_allow_pickle(p)
    p.set_defaults(func=_run_resize)


def _run_resize(args: argparse.Namespace) -> int:
    # imported here, not at the top: CLI start-up (--help must not import torch)
    from .tools.resize import resize_file

    report = resize_file(args.input, args.out, rank=args.rank, dynamic=args.dynamic, to=args.to, family=args.family,
                         keys=_model_keys(args.model), allow_pickle=args.allow_pickle)
    _print_energy(report, True)
    return 0


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="extract a LoRA from the difference of two checkpoints of one family")
    p.add_argument("--base", required=True, help="the original model")
    p.add_argument("--tuned", required=True, help="the fine-tuned model")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("-o", "--out", required=True, help="output .safetensors")
    p.add_argument("--targets", default="attn",
                   help="preset (attn, attn-ff, all-linear, all = every Linear and Conv2d) or comma-separated names")
    p.add_argument("--text-encoder", action="store_true", help="also extract the text encoders' attention")
    p.add_argument("--threshold", type=float, default=1e-6, help="skip modules whose ‖ΔW‖/‖W‖ is at most this")
    p.add_argument("--to", default="diffusers", choices=_FORMATS)
    p.set_defaults(func=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    # imported here, not at the top: CLI start-up (--help must not import torch)
    from .tools.extract import extract_file

    targets = args.targets if "," not in args.targets else [t.strip() for t in args.targets.split(",")]
    report = extract_file(args.base, args.tuned, args.out, rank=args.rank, targets=targets,
                          text_encoder=args.text_encoder, threshold=args.threshold, to=args.to)
    for name in report.skipped:
        print(f"skipped (no difference): {name}")
    kept = sum(report.energy.values()) / max(1, len(report.energy))
    print(f"{report.out}: {len(report.modules)} modules, mean energy retained {kept:.4f}")
    return 0


def _add_bake(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bake", help="write a standalone pipeline with adapters fused in")
    p.add_argument("--model", required=True)
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]")
    p.add_argument("--out", required=True, help="output diffusers folder (must not exist)")
    p.add_argument("--single-file", help="also write one .safetensors with every component (diffusers names)")
    p.set_defaults(func=_run_bake)


def _run_bake(args: argparse.Namespace) -> int:
    # imported here, not at the top: CLI start-up (--help must not import torch)
    from .tools.bake import bake

    report = bake(args.model, [split_weighted(spec) for spec in args.lora], args.out, single_file=args.single_file)
    print(f"{report.out_dir}: {report.layers_fused} layers fused")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP server: the AUTOMATIC1111 web API and a native API, many adapters on "
                       "one base, requests with different adapters batched together")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model, as for generate (default: {DEFAULT_MODEL})")
    _add_quantized_base(p)
    p.add_argument("--device", help="torch device for the pipeline, e.g. cuda (default: the CPU)")
    p.add_argument("--lora-dir", action="append", required=True, metavar="DIR",
                   help="folder of .safetensors adapters that requests name, repeatable")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; any other needs --api-key)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860, A1111's; 0: any free port)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (or HTTP basic auth "
                   "with KEY as password); default: $DIFFUSION_LORA_API_KEY, which keeps it out of `ps`")
    p.add_argument("--max-batch", type=int, default=8, help="images in one pipeline call (default: 8)")
    p.add_argument("--batch-window", type=float, default=0.02, metavar="SECONDS",
                   help="how long a batch waits for more requests to join it (default: 0.02)")
    p.add_argument("--cache-size", type=int, default=32, help="adapters kept loaded (default: 32)")
    p.add_argument("--cache-mb", type=float, help="also bound the loaded adapters' tensors to this many MiB")
    p.add_argument("--max-steps", type=int, default=150, help="steps per request (default: 150)")
    p.add_argument("--max-pixels", type=int, help="height x width per image (default: 4x the native pixels)")
    p.add_argument("--max-images", type=int, default=16,
                   help="images per request, A1111's batch_size x n_iter (default: 16)")
    p.add_argument("--max-adapters", type=int, default=8, help="adapters per request (default: 8)")
    p.add_argument("--max-prompt-chars", type=int, default=4000, help="characters per prompt (default: 4000)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="images waiting; beyond that requests get 429 (default: 64)")
    p.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGINT/SIGTERM, how long queued work may run before it is refused with 503 (default: 30)")
    p.set_defaults(func=_run_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _run_serve(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("DIFFUSION_LORA_API_KEY") or None
    if not _is_loopback(args.host) and not key:  # refused before anything loads
        raise ConfigError(f"--host {args.host} is reachable from other machines: set --api-key KEY (or "
                          "DIFFUSION_LORA_API_KEY) so that only clients with the key can use the server")
    if args.cache_mb is not None and args.cache_mb <= 0:
        raise ConfigError(f"--cache-mb must be positive, got {args.cache_mb}")
    base = _quantized_base(args)
    # imported here, not at the top: CLI start-up (--help must not import torch or FastAPI)
    from .models import load_pipeline
    from .serve import Engine, ServeLimits
    from .serve.server import ServeOptions, bind, serve  # a missing [serve] extra is refused here, before loading

    options = ServeOptions(api_key=key, grace=args.grace)
    limits = ServeLimits(max_steps=args.max_steps, max_pixels=args.max_pixels, max_images=args.max_images,
                         max_adapters=args.max_adapters, max_prompt_chars=args.max_prompt_chars,
                         max_queue=args.max_queue)
    sock = bind(args.host, args.port)  # before the model loads: a port in use is refused at once
    try:
        pipe = load_pipeline(args.model, device=args.device, **base)
        cache_bytes = None if args.cache_mb is None else int(args.cache_mb * 2**20)
        engine = Engine(pipe, args.lora_dir, limits=limits, max_batch=args.max_batch, cache_size=args.cache_size,
                        cache_bytes=cache_bytes, batch_window=args.batch_window, model_file=_single_file(args.model))
        serve(engine, sock, options, on_ready=lambda url: print(f"serving {args.model} on {url}", flush=True))
    finally:
        sock.close()
    return 0


def _add_serve_ray(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-ray", help="serve adapters on Ray Serve: replicas routed by adapter stack (needs "
                       "pip install 'diffusion-lora[ray]')")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model of every replica (default: {DEFAULT_MODEL}); "
                   "on a cluster, the same path or hub id must work on every node")
    p.add_argument("--lora-dir", action="append", default=[], required=True, metavar="DIR",
                   help="adapter folder, repeatable; requests name adapters inside it")
    p.add_argument("--host", default="127.0.0.1", help="Ray's HTTP proxy address (default: 127.0.0.1); another "
                   "address needs --api-key")
    p.add_argument("--port", type=int, default=8000, help="Ray's HTTP proxy port (default: 8000)")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on every request")
    p.add_argument("--address", help="Ray cluster to join: auto (RAY_ADDRESS, else the one `ray start` runs on this "
                   "machine), HOST:PORT or ray://HOST:PORT (default: a new local Ray instance on 127.0.0.1)")
    p.add_argument("--replicas", type=int, default=2, help="replicas, each with its own copy of the base (default: 2)")
    p.add_argument("--max-batch", type=int, default=8, help="images per denoiser batch in a replica (default: 8)")
    p.add_argument("--max-stacks", type=int, default=4,
                   help="adapter stacks a replica keeps loaded for routing (Ray's max_num_models_per_replica; "
                   "default: 4)")
    p.add_argument("--cache-size", type=int, help="adapters a replica's cache holds (default: max-stacks x 8)")
    p.add_argument("--cache-mb", type=float, help="bound of a replica's adapter cache in MB")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs Ray reserves per replica (default: 1)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (default: 0; > 0 runs on cuda)")
    p.set_defaults(func=_run_serve_ray)


def _run_serve_ray(args: argparse.Namespace) -> int:
    # imported here, not at the top: CLI start-up (--help must not import torch or ray)
    from .serve.ray_app import check_bind, ray_deployment, require_ray, run_ray

    check_bind(args.host, args.api_key)
    require_ray()
    options = {"num_cpus": args.num_cpus, **({"num_gpus": args.num_gpus} if args.num_gpus else {})}
    cache_bytes = None if args.cache_mb is None else max(1, int(args.cache_mb * 2**20))
    app = ray_deployment(args.model, args.lora_dir, replicas=args.replicas, max_batch=args.max_batch,
                         max_stacks=args.max_stacks, cache_size=args.cache_size, cache_bytes=cache_bytes,
                         api_key=args.api_key, ray_actor_options=options)
    try:
        run_ray(app, host=args.host, port=args.port, address=args.address, api_key=args.api_key,
                ready=lambda url: print(f"serving on {url} (Ctrl-C stops)", flush=True))
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-lora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"diffusion-lora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_train(sub)
    _add_inspect(sub)
    _add_convert(sub)
    _add_merge(sub)
    _add_resize(sub)
    _add_extract(sub)
    _add_bake(sub)
    _add_serve(sub)
    _add_serve_ray(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (DiffusionLoraError, ConfigError) as exc:
        # Messages quote keys, metadata and file names: escape their control characters. A dataset
        # error lists one problem per line on purpose.
        print(f"error: {printable(exc, keep_newlines=isinstance(exc, DatasetError))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # `train` has saved a checkpoint by now (see training.trainer); other commands write nothing
        # partial, because every output is renamed into place only when complete.
        hint = "; continue with the same command plus --resume" if args.command == "train" else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; use smaller sizes or fewer items", file=sys.stderr)
        return 2
    except OSError as exc:
        # Last resort for a file error no command turned into a message of its own: one line, never a traceback.
        where = f"{exc.filename}: " if exc.filename is not None else ""
        print(f"error: {printable(where)}{printable(exc.strerror or exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
