"""`import diffusion_lora` and the CLI's --help/--version import nothing heavy; the lazy exports are complete."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types

import pytest

import diffusion_lora as dl
from diffusion_lora.cli import build_parser
from diffusion_lora.families import FAMILIES
from diffusion_lora.formats.detect import FileFormat

HEAVY = ("torch", "diffusers", "transformers", "peft")

# Runs the CLI as `python -m diffusion_lora.cli ARGS` does, then reports which heavy packages got imported.
_RUN_CLI = """
import json, runpy, sys
sys.argv = ["diffusion-lora", *json.loads(sys.argv[1])]
try:
    runpy.run_module("diffusion_lora.cli", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in %r if m in sys.modules)
print("HEAVY=" + json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
""" % (HEAVY,)


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def _cli(*argv: str) -> tuple[int, list[str], str]:
    result = _python("-c", _RUN_CLI, json.dumps(argv))
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("HEAVY=")]
    assert line, result.stderr
    report = json.loads(line[-1].removeprefix("HEAVY="))
    return report["code"], report["heavy"], result.stdout


def test_import_diffusion_lora_is_light():
    result = _python("-c", f"import diffusion_lora, sys; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [("--help",), ("--version",), ("train", "--help")])
def test_cli_help_and_version_are_light(argv):
    code, heavy, out = _cli(*argv)
    assert code == 0
    assert out.startswith("usage: diffusion-lora") or out.startswith("diffusion-lora ")  # it really ran
    assert heavy == []


def test_every_subcommand_help_is_light():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert len(commands) >= 8
    for command in commands:
        code, heavy, out = _cli(command, "--help")
        assert code == 0 and out.startswith(f"usage: diffusion-lora {command}")
        assert heavy == [], command


def test_every_public_name_resolves_in_a_fresh_interpreter():
    # A fresh process, so each name goes through the lazy __getattr__ (this process cached them long ago).
    script = (
        "import diffusion_lora as dl, sys\n"
        "missing = [n for n in dl.__all__ if not hasattr(dl, n)]\n"
        "not_listed = [n for n in dl.__all__ if n not in dir(dl)]\n"
        "ns = {}\n"
        "exec('from diffusion_lora import *', ns)\n"
        "print(missing, not_listed, sorted(set(dl.__all__) - set(ns)))\n"
    )
    result = _python("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] [] []"


def test_lazy_names_are_the_defining_objects():
    from diffusion_lora import adapters, models, training

    assert dl.load_lora is adapters.load_lora
    assert dl.build_tiny_pipeline is models.build_tiny_pipeline
    assert dl.TINY_MODELS is models.TINY_MODELS
    assert dl.train is training.train
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        dl.not_a_name  # noqa: B018


def test_train_is_a_function_and_training_a_plain_module():
    assert inspect.isfunction(dl.train)
    module = sys.modules["diffusion_lora.training"]
    assert type(module) is types.ModuleType  # no __class__ swap to make the package callable
    assert not callable(module)


def test_cli_choices_come_from_the_registries():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("convert", "merge", "resize"):
        actions = {a.dest: a for a in commands[command]._actions}
        assert list(actions["family"].choices) == list(FAMILIES)
        assert list(actions["to"].choices) == [f.value for f in FileFormat]
