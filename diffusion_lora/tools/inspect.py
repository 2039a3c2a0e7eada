"""``inspect``: what an adapter file is, without a model — format, family, ranks, alphas, metadata, hashes."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import FormatError
from ..formats.detect import detect_format
from ..formats.file_family import TENSOR_SUFFIXES, family_of
from ..formats.hashes import addnet_hash, autov2_hash, file_sha256
from ..formats.kohya import is_kohya
from ..formats.lycoris import is_lycoris
from ..formats.metadata import trigger_words_of
from ..formats.peft_format import PEFT_MODEL_PREFIX, split_peft_key
from ..formats.printable import printable
from ..formats.safetensors_io import read_adapter_file

_TARGET = re.compile(r"(to_q|to_k|to_v|to_out[._]0|add_[qkv]_proj|to_add_out|q_proj|k_proj|v_proj|out_proj|qkv|proj|"
                     r"linear1|linear2|proj_in|proj_out|ff[._]net[._]0[._]proj|ff[._]net[._]2|fc1|fc2|lin|"
                     r"conv\d?|conv_shortcut|mlp[._][02])$")


@dataclass
class FileReport:
    """Everything ``inspect`` shows about one adapter file."""

    file: str
    size_bytes: int
    format: str
    algorithm: str
    family: str | None
    family_source: str
    modules: int
    ranks: dict[int, int]
    alphas: dict[float, int]
    targets: dict[str, int]
    components: dict[str, int]
    trigger_words: list[str]
    base_model: str | None
    hashes: dict[str, str | bool | None]
    metadata: dict[str, str] = field(default_factory=dict)
    bias_deltas: int = 0  # diff_b / lora_B.bias tensors: changes of a layer's bias

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False, default=str)


def _split(key: str, fmt: str) -> tuple[str, str, str | None]:
    """(module name, role, algorithm) of a file key."""
    if fmt == "diffusers":
        split = split_peft_key(key.removeprefix(PEFT_MODEL_PREFIX))
        if split is None:
            raise FormatError(f"key {key!r} is not a diffusers LoRA key")
        module, role = split
        return module, role, "dora" if role == "magnitude" else ("lora" if role != "alpha" else None)
    for suffix, (role, algo) in TENSOR_SUFFIXES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role, algo
    raise FormatError(f"key {key!r} has no known LoRA/LyCORIS suffix")


def inspect_file(path: str | os.PathLike) -> FileReport:
    """Read ``path`` safely and describe it. Hashes are computed from the bytes, never trusted."""
    p = Path(path)
    tensors, metadata = read_adapter_file(p)
    fmt = "lycoris" if is_lycoris(tensors) and not is_kohya(tensors) else detect_format(tensors, str(p)).value
    parts: dict[str, dict[str, torch.Tensor]] = {}
    algos: Counter[str] = Counter()
    for key, tensor in tensors.items():
        module, role, algo = _split(key, "diffusers" if fmt == "diffusers" else "kohya")
        parts.setdefault(module, {})[role] = tensor
        if algo:
            algos[algo] += 1
    ranks: Counter[int] = Counter()
    alphas: Counter[float] = Counter()
    targets: Counter[str] = Counter()
    components: Counter[str] = Counter()
    bias_deltas = sum(1 for roles in parts.values() if roles.keys() & {"diff_b", "bias"})
    for module, roles in parts.items():
        if "down" in roles:
            ranks[int(roles["down"].shape[0])] += 1
        if "alpha" in roles and roles["alpha"].numel() == 1:
            alphas[round(float(roles["alpha"].reshape(())), 6)] += 1
        targets[_target_of(module)] += 1
        components[module.split(".")[0] if "." in module else "_".join(module.split("_")[:2])] += 1
    found = family_of(metadata, tensors)
    stored = metadata.get("sshs_model_hash")
    computed = addnet_hash(p)
    algorithm = "dora" if algos.get("dora") else ", ".join(sorted(a for a in algos if a != "dora")) or "lora"
    return FileReport(
        file=str(p), size_bytes=p.stat().st_size, format=fmt, algorithm=algorithm,
        family=" or ".join(found.names) or None, family_source=found.source, modules=len(parts),
        ranks=dict(sorted(ranks.items())),
        alphas=dict(sorted(alphas.items())), targets=dict(targets.most_common()), components=dict(components),
        trigger_words=list(trigger_words_of(metadata)),
        base_model=metadata.get("diffusion_lora.base_model") or metadata.get("ss_sd_model_name"),
        hashes={"addnet": computed, "addnet_stored": stored, "addnet_stored_matches": None if stored is None
                else stored == computed, "autov2": autov2_hash(p), "sha256": file_sha256(p)},
        metadata=dict(metadata), bias_deltas=bias_deltas,
    )


_DOTTED = {"to_out_0": "to_out.0", "ff_net_0_proj": "ff.net.0.proj", "ff_net_2": "ff.net.2", "mlp_0": "mlp.0",
           "mlp_2": "mlp.2"}


def _target_of(module: str) -> str:
    """The layer kind a module name ends in (``to_q``, ``to_out.0``, ``qkv``, …), or ``other``."""
    m = _TARGET.search(module)
    if m is None:
        return "other"
    flat = m.group(1).replace(".", "_")
    return _DOTTED.get(flat, flat)


def format_report(report: FileReport) -> str:
    """A human-readable summary (metadata values cut to one line each)."""
    lines = [
        f"file       {report.file} ({report.size_bytes / 1e6:.2f} MB)",
        f"format     {report.format} ({report.algorithm})",
        f"family     {report.family or 'unknown'}  [{report.family_source}]",
        f"modules    {report.modules}  components {report.components}",
        f"ranks      {report.ranks}",
        f"alphas     {report.alphas or 'none stored (scale 1, or in lora_adapter_metadata)'}",
        f"targets    {report.targets}",
        *([f"bias       {report.bias_deltas} diff_b (bias deltas)"] if report.bias_deltas else []),
        f"trigger    {', '.join(report.trigger_words) or '-'}",
        f"base model {report.base_model or '-'}",
        f"addnet     {report.hashes['addnet']}"
        + ("" if report.hashes["addnet_stored"] is None else
           ("  (matches stored)" if report.hashes["addnet_stored_matches"] else "  (STORED HASH DIFFERS)")),
        f"AutoV2     {report.hashes['autov2']}",
        f"sha256     {report.hashes['sha256']}",
        "metadata",
    ]
    for key, value in sorted(report.metadata.items()):
        one_line = value.replace("\n", " ")
        lines.append(f"  {key}: {one_line[:100]}{'…' if len(one_line) > 100 else ''}")
    # Every value above may come from the file (keys, metadata, trigger words, module names): escape
    # control characters so none can drive the terminal or forge a line of the report.
    return "\n".join(printable(line) for line in lines)
