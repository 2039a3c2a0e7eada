"""`generate` and the CLI against hostile folders, prompts, files and arguments (issue 12).

Output folders with planted symlinks and gaps, prompt tags naming files outside --lora-dir,
two files under one adapter name, A1111's other tag forms, control characters from files, and
arguments that used to end in a traceback or a NaN image.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffusion_lora as dl
from diffusion_lora.cli import main
from diffusion_lora.formats.atomic import write_new_file
from diffusion_lora.generate import GeneratedImage, GenerationSettings, ImageFolder, generate
from diffusion_lora.prompt_tags import LoraTag, parse_lora_tags

from .helpers import trained_adapter

ARGS = ["generate", "--model", "tiny-sd15", "--steps", "2", "--height", "32", "--width", "32", "--seed", "7"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Folder L with L/A/style.safetensors and L/B/style.safetensors: two different adapters, one stem."""

    root = tmp_path_factory.mktemp("loras")
    for sub, seed in (("A", 40), ("B", 41)):
        pipe = dl.build_tiny_pipeline("tiny-sd15")
        trained_adapter(pipe, "style", seed=seed, rank=4, alpha=2, text_encoder=True)
        (root / sub).mkdir()
        dl.save_lora(pipe, "style", root / sub / "style.safetensors")
    return root


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _run(capsys, *args):
    """(exit code, stdout, stderr) of the CLI."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err):
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


# --- output folder: never through a link, never over an earlier image (4.1, 5.7) -------------------


def test_planted_symlinks_are_never_written_through(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    # Two entries, so a count of the PNGs names the next image 00002-7.png: a link to the victim.
    (out / "00002-7.png").symlink_to(victim)
    (out / "00003-7.png").symlink_to(tmp_path / "created-by-attacker")  # dangling
    code, printed, _ = _run(capsys, *ARGS, "--prompt", "a red circle", "--out", str(out))
    assert code == 0
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "created-by-attacker").exists()
    assert (out / "00002-7.png").is_symlink() and (out / "00003-7.png").is_symlink()
    written = Path(printed.strip())
    assert written.parent == out and not written.is_symlink()
    assert Image.open(written).size == (32, 32)


def test_earlier_images_are_never_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # A folder where 00001 was deleted: counting the PNGs gave index 2 and replaced 00002-7.png.
    (out / "00000-7.png").write_bytes(b"first")
    (out / "00002-7.png").write_bytes(b"third")
    code, printed, _ = _run(capsys, *ARGS, "--prompt", "a red circle", "--out", str(out), "--num-images", "2")
    assert code == 0
    assert (out / "00000-7.png").read_bytes() == b"first" and (out / "00002-7.png").read_bytes() == b"third"
    assert printed.split() == [str(out / "00003-7.png"), str(out / "00004-8.png")]


def _image(marker: str) -> GeneratedImage:
    return GeneratedImage(Image.new("RGB", (8, 8), (1, 2, 3)), "p", 7, marker)


def _write_many(folder: Path, tag: str, count: int) -> None:
    images = ImageFolder(folder)
    for i in range(count):
        images.add(_image(f"{tag}{i}"))


def test_a_planted_name_with_a_huge_number_does_not_push_names_past_the_length_limit(tmp_path):
    huge = tmp_path / ("9" * 240 + "-0.png")
    huge.write_bytes(b"planted")
    (tmp_path / "00004-1.png").write_bytes(b"ours")
    assert ImageFolder(tmp_path).add(_image("x")).name == "00005-7.png"
    assert huge.read_bytes() == b"planted"


def test_two_writers_racing_for_one_folder_lose_nothing(tmp_path):
    import multiprocessing

    folder = tmp_path / "out"
    per_writer = 25
    # two processes (forked: this one's imports are reused) and two threads, all at once
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_write_many, args=(folder, tag, per_writer)) for tag in ("a", "b")]
    threads = [threading.Thread(target=_write_many, args=(folder, tag, per_writer)) for tag in ("c", "d")]
    for worker in [*procs, *threads]:
        worker.start()
    for worker in [*procs, *threads]:
        worker.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    files = sorted(folder.iterdir())
    markers = sorted(Image.open(f).text["parameters"] for f in files)
    expected = sorted(f"{t}{i}" for t in "abcd" for i in range(per_writer))
    assert markers == expected  # every image kept: none replaced another
    assert all(f.name.endswith("-7.png") for f in files)


def test_write_new_file_refuses_existing_names_and_links(tmp_path):
    existing = tmp_path / "a.png"
    existing.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        write_new_file(existing, b"new")
    assert existing.read_bytes() == b"old"
    link = tmp_path / "b.png"
    link.symlink_to(tmp_path / "target")
    with pytest.raises(FileExistsError):
        write_new_file(link, b"new")
    assert not (tmp_path / "target").exists()
    write_new_file(tmp_path / "c.png", b"fresh")
    assert (tmp_path / "c.png").read_bytes() == b"fresh"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]  # no temp files left


def test_out_that_is_a_file_or_too_long_is_one_line(tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_bytes(b"x")
    code, _, err = _run(capsys, *ARGS, "--prompt", "x", "--out", str(file))
    _one_line_error(code, err)
    assert str(file) in err and file.read_bytes() == b"x"
    code, _, err = _run(capsys, *ARGS, "--prompt", "x", "--out", str(tmp_path / ("n" * 300)))
    _one_line_error(code, err)
    assert "too long" in err


# --- prompt tags: only loaded names or files inside --lora-dir (4.2) ------------------------------


@pytest.mark.parametrize("target", ["/etc/passwd", "../B/style", "A/../../x", "\\\\server\\share\\x", "..\\x"])
def test_tags_cannot_name_paths_outside_lora_dir(loras, target, capsys):
    code, _, err = _run(capsys, *ARGS, "--prompt", f"x <lora:{target}:1>", "--lora-dir", str(loras / "A"),
                        "--out", str(loras.parent / "never"))
    _one_line_error(code, err)
    assert "--lora PATH" in err
    assert not (loras.parent / "never").exists()  # refused before anything was written


def test_tag_symlink_leading_out_of_lora_dir_is_refused(tmp_path, loras, capsys):
    lora_dir = tmp_path / "mine"
    lora_dir.mkdir()
    (lora_dir / "evil.safetensors").symlink_to(loras / "B" / "style.safetensors")
    code, _, err = _run(capsys, *ARGS, "--prompt", "x <lora:evil:1>", "--lora-dir", str(lora_dir),
                        "--out", str(tmp_path / "o"))
    _one_line_error(code, err)
    assert "outside" in err


def test_tag_without_lora_dir_does_not_read_cwd_files(tmp_path, loras, capsys, monkeypatch):
    monkeypatch.chdir(loras / "A")  # style.safetensors is right here, but no --lora-dir was given
    code, _, err = _run(capsys, *ARGS, "--prompt", "x <lora:style:1>", "--out", str(tmp_path / "o"))
    _one_line_error(code, err)
    assert "no --lora-dir" in err


def test_read_errors_never_echo_file_contents(tmp_path, capsys):
    secret = b"TOPSECRETpassword=hunter2\n"
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    (lora_dir / "notes.safetensors").write_bytes(secret * 4)
    code, _, err = _run(capsys, *ARGS, "--prompt", "x <lora:notes:1>", "--lora-dir", str(lora_dir),
                        "--out", str(tmp_path / "o"))
    _one_line_error(code, err)
    assert "TOPSECRET" not in err and "TOPSECRE"[:6] not in err
    assert str(int.from_bytes(secret[:8], "little")) not in err  # the length prefix is the first 8 bytes
    assert "not a safetensors file" in err and "starts with text" in err


# --- one name, two files (5.5) --------------------------------------------------------------------


def test_tag_naming_another_file_with_a_loaded_name_is_refused(loras, tmp_path, capsys):
    code, _, err = _run(capsys, *ARGS, "--lora", str(loras / "A" / "style.safetensors"),
                        "--prompt", "x <lora:B/style:1>", "--lora-dir", str(loras), "--out", str(tmp_path / "o"))
    _one_line_error(code, err)
    assert str(loras / "B" / "style.safetensors") in err and str(loras / "A" / "style.safetensors") in err
    code, _, err = _run(capsys, *ARGS, "--prompt", "x <lora:A/style:1> <lora:B/style:0.5>",
                        "--lora-dir", str(loras), "--out", str(tmp_path / "o"))
    _one_line_error(code, err)
    assert "rename" in err


def test_same_name_in_two_lora_dirs_is_ambiguous(loras, tmp_path, capsys):
    code, _, err = _run(capsys, *ARGS, "--prompt", "x <lora:style:1>", "--lora-dir", str(loras / "A"),
                        "--lora-dir", str(loras / "B"), "--out", str(tmp_path / "o"))
    _one_line_error(code, err)
    assert "ambiguous" in err


def test_tag_naming_the_loaded_file_itself_uses_it(loras, tmp_path, capsys):
    via_flag = tmp_path / "flag"
    code, _, _ = _run(capsys, *ARGS, "--lora", f"{loras / 'A' / 'style.safetensors'}:0.5", "--prompt", "x",
                      "--out", str(via_flag))
    assert code == 0
    both = tmp_path / "both"
    code, _, _ = _run(capsys, *ARGS, "--lora", f"{loras / 'A' / 'style.safetensors'}:1",
                      "--prompt", "x <lora:A/style:0.5>", "--lora-dir", str(loras), "--out", str(both))
    assert code == 0
    (a,), (b,) = via_flag.glob("*.png"), both.glob("*.png")
    assert np.array_equal(_pixels(a), _pixels(b))  # the tag's weight, on the same file


# --- A1111's tag forms (5.9) ----------------------------------------------------------------------


def test_a1111_tag_forms_parse():
    assert parse_lora_tags("a <lora:x:0.5:0.3> b") == ("a b", [LoraTag("x", 0.3, 0.5)])
    assert parse_lora_tags("<lora:x:te=0.2:unet=0.7>")[1] == [LoraTag("x", 0.7, 0.2)]
    assert parse_lora_tags("<lora:x:unet=0.5>")[1] == [LoraTag("x", 0.5, 1.0)]
    assert parse_lora_tags("<lora:x:0.4:0.4>")[1] == [LoraTag("x", 0.4)]
    assert parse_lora_tags("cat, <lyco:x:0.6>")[1] == [LoraTag("x", 0.6)]
    assert parse_lora_tags("<lora:x>")[1] == [LoraTag("x", 1.0)]


@pytest.mark.parametrize("prompt, message", [
    ("<lora::1>", "name is empty"), ("<lora:x:1:1:8>", "DyLoRA"), ("<lora:x:dyn=8>", "DyLoRA"),
    ("<lora:x:foo=1>", "unknown argument"), ("<hypernet:x:1>", "not supported"), ("<lora:x:nan>", "finite"),
    ("<lora:x:1e400>", "finite"), ("<lora:x:0.5:abc>", "not a number"), ("<lora:x:1:2:3:4>", "4 weights"),
])  # fmt: skip
def test_tags_that_cannot_be_honoured_are_errors(prompt, message):
    with pytest.raises(dl.ConfigError, match=message):
        parse_lora_tags(f"a cat {prompt}")


def test_text_encoder_and_unet_weights_apply_separately(loras, tmp_path, capsys):
    def png(prompt, name):
        code, out, _ = _run(capsys, *ARGS, "--prompt", prompt, "--lora-dir", str(loras / "A"),
                            "--out", str(tmp_path / name))
        assert code == 0
        return Path(out.strip())

    one = png("a red circle <lora:style:0.5>", "one")
    split_same = png("a red circle <lora:style:0.5:0.5>", "same")
    unet_only = png("a red circle <lora:style:0:0.5>", "unet")
    assert np.array_equal(_pixels(one), _pixels(split_same))
    assert not np.array_equal(_pixels(one), _pixels(unet_only))  # the text encoder's part is off
    params = Image.open(unet_only).text["parameters"]
    assert params.startswith("a red circle <lora:style:0:0.5>\n")


# --- infotext (1.5) -------------------------------------------------------------------------------


def test_infotext_has_every_a1111_field_in_order(tmp_path, capsys):
    code, out, _ = _run(capsys, *ARGS, "--prompt", "a red circle", "--negative-prompt", "blue",
                        "--out", str(tmp_path))
    assert code == 0
    text = Image.open(out.strip()).text["parameters"]
    prompt, negative, fields = text.split("\n")
    assert (prompt, negative) == ("a red circle", "Negative prompt: blue")
    keys = [f.split(": ")[0] for f in fields.split(", ")]
    assert keys == ["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Family"]
    assert "CFG scale: 7.5," in fields  # StableDiffusionPipeline's default, used when --guidance is absent


def test_model_hash_of_a_single_file_checkpoint(tmp_path):
    pipe = dl.load_pipeline("tiny-sd15")
    checkpoint = tmp_path / "myModel_v2.safetensors"
    data = os.urandom(1 << 21)
    checkpoint.write_bytes(data)
    expected = hashlib.sha256(data[1 << 20:(1 << 20) + (1 << 16)]).hexdigest()[:8]  # A1111's original hash
    (result,) = generate(pipe, GenerationSettings(["x"], steps=1, height=32, width=32), progress=False,
                         model_file=checkpoint)
    fields = result.parameters.split("\n")[-1]
    assert f"Model hash: {expected}, Model: myModel_v2, " in fields


def test_parameters_with_a_non_utf8_file_name_are_still_written(tmp_path):
    pipe = dl.load_pipeline("tiny-sd15")
    checkpoint = tmp_path / os.fsdecode(b"model\xff.safetensors")  # a name that is not UTF-8
    checkpoint.write_bytes(b"\0" * 16)
    (result,) = generate(pipe, GenerationSettings(["x"], steps=1, height=32, width=32), progress=False,
                         model_file=checkpoint)
    path = result.save(tmp_path / "a.png")
    assert "Model: model\\udcff" in Image.open(path).text["parameters"]


def test_save_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (tmp_path / "a.png").symlink_to(victim)
    path = _image("p").save(tmp_path / "a.png")
    assert victim.read_bytes() == b"precious" and not path.is_symlink()
    assert Image.open(path).text["parameters"] == "p"


# --- arguments that ended in a traceback or NaN images (5.8, 5.9) ----------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--seed", "99999999999999999999999"], "seed"), (["--seed", "-1"], "seed"),
    (["--guidance", "nan"], "guidance"), (["--guidance", "inf"], "guidance"), (["--guidance", "-3"], "guidance"),
    (["--height", "8192", "--width", "8192"], "over the limit"),
    (["--lora", "n" * 300 + ".safetensors"], "too long"),
])  # fmt: skip
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, extra, message):
    code, _, err = _run(capsys, *ARGS, "--prompt", "x", "--out", str(tmp_path / "o"), *extra)
    _one_line_error(code, err)
    assert message in err


def test_model_name_too_long_is_one_line(tmp_path, capsys):
    code, _, err = _run(capsys, "generate", "--model", "m" * 300, "--prompt", "x", "--out", str(tmp_path))
    _one_line_error(code, err)
    assert "too long" in err


def test_lora_weight_overflowing_a_float_is_refused(loras, tmp_path, capsys):
    code, _, err = _run(capsys, *ARGS, "--prompt", "x", "--lora", f"{loras / 'A' / 'style.safetensors'}:1e400",
                        "--out", str(tmp_path / "o"))
    _one_line_error(code, err)
    assert "finite" in err


def test_settings_refuse_what_the_pipeline_would_turn_into_nan_or_crash():
    for bad in ({"guidance": float("nan")}, {"guidance": float("inf")}, {"seed": 2**64},
                {"seed": 2**64 - 1, "num_images": 2}, {"prompts": ["a\udcff"]}, {"negative_prompt": "\ud800"},
                {"prompts": "not a list"}, {"steps": 2.5}):
        with pytest.raises(dl.ConfigError):
            GenerationSettings(**{"prompts": ["x"], **bad})


def test_non_utf8_prompt_bytes_are_one_line(tmp_path, capsys):
    prompt = os.fsdecode(b"a \xff cat")  # what Python makes of a non-UTF-8 byte on the command line
    code, _, err = _run(capsys, *ARGS, "--prompt", prompt, "--out", str(tmp_path))
    _one_line_error(code, err)
    assert err.startswith("error: prompts[0]")


_OOM_SCRIPT = """
import resource, sys
import diffusion_lora as dl
from diffusion_lora.generate import GenerationSettings, generate
pipe = dl.load_pipeline("tiny-sd15")
generate(pipe, GenerationSettings(["x"], steps=1, height=32, width=32), progress=False)  # warm up
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), hard))
try:
    generate(pipe, GenerationSettings(["x"], steps=1, height=4096, width=4096, max_pixels=1 << 30), progress=False)
except dl.ConfigError as exc:
    print("ConfigError:", exc)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
def test_running_out_of_memory_is_a_config_error(tmp_path):
    result = subprocess.run([sys.executable, "-c", _OOM_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ConfigError: height x width 4096x4096: ran out of memory" in result.stdout


# --- control characters from files (4.3) -----------------------------------------------------------


MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _raw_safetensors(path: Path, metadata: dict[str, str], modules: tuple[str, ...] = (MODULE,)) -> None:
    """A kohya LoRA with a header written by hand (so any metadata string or key fits)."""
    header: dict = {"__metadata__": metadata}
    blobs, offset = [], 0
    for module in modules:
        for suffix, array in (("lora_down.weight", np.ones((2, 8))), ("lora_up.weight", np.ones((8, 2))),
                              ("alpha", np.array(2.0))):
            blob = array.astype("<f4").tobytes()
            header[f"{module}.{suffix}"] = {"dtype": "F32", "shape": list(array.shape),
                                            "data_offsets": [offset, offset + len(blob)]}
            blobs.append(blob)
            offset += len(blob)
    raw = json.dumps(header).encode()  # ensure_ascii: a lone surrogate is written as a \\ud800 escape
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


HOSTILE = {
    "ss_output_name": "\x1b]0;pwned\x07title",
    "modelspec.title\nforged": "line\rfile       /etc/shadow",
    "modelspec.trigger_phrase": "\x1b[2Jtrigger, \u202eword",
    "diffusion_lora.base_model": "base\rforged",
    "lone": "\ud800",
}


def test_inspect_escapes_control_characters(tmp_path):
    file = tmp_path / "hostile.safetensors"
    _raw_safetensors(file, HOSTILE)
    result = subprocess.run([sys.executable, "-m", "diffusion_lora.cli", "inspect", str(file)],
                            capture_output=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout.decode("utf-8")  # bytes as printed: no newline translation hides a \r
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "\\x1b]0;pwned\\x07title" in out and "\\ud800" in out
    assert "trigger    \\x1b[2Jtrigger, \\u202eword\n" in out and "base model base\\rforged\n" in out
    assert not any(line.startswith("file       /etc/shadow") for line in out.splitlines())  # splits at \r too
    assert sum(line.startswith("file ") for line in out.splitlines()) == 1


def test_error_messages_escape_control_characters(tmp_path, capsys):
    name = tmp_path / "a\x1b]0;pwned\x07\nerror: forged.safetensors"
    code, _, err = _run(capsys, "inspect", str(name))
    _one_line_error(code, err)
    assert "\x1b" not in err and "\\x1b]0;pwned\\x07\\nerror: forged" in err


def test_skipped_modules_warning_escapes_keys(tmp_path, caplog):
    """A diffusers-format file (module paths are free text there) with one module that fits no layer."""
    file = tmp_path / "odd.safetensors"
    header: dict = {"__metadata__": {}}
    blobs, offset = [], 0
    for module in ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "unet.x\x1b]0;x\x07.to_q"):
        for suffix, array in (("lora_A.weight", np.ones((2, 32))), ("lora_B.weight", np.ones((32, 2)))):
            blob = array.astype("<f4").tobytes()
            header[f"{module}.{suffix}"] = {"dtype": "F32", "shape": list(array.shape),
                                            "data_offsets": [offset, offset + len(blob)]}
            blobs.append(blob)
            offset += len(blob)
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    pipe = dl.load_pipeline("tiny-sd15")
    with caplog.at_level("WARNING"):
        report = dl.load_lora(pipe, file, strict=False)
    assert report.skipped == ("unet.x\x1b]0;x\x07.to_q",)
    (message,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "\x1b" not in message and "unet.x\\x1b]0;x\\x07.to_q" in message
