"""Training runs that get killed: kill -9 anywhere, Ctrl-C, then --resume gives the same bits."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_lora.training.checkpoint import latest_checkpoint, load_checkpoint

from .test_train import make_dataset

pytestmark = pytest.mark.slow

STEPS = 14


def _write_config(root: Path, data: Path, name: str) -> Path:
    out = root / name
    cfg = root / f"{name}.toml"
    cfg.write_text(
        f"""
[model]
name = "tiny-sd15"
[data]
path = "{data.as_posix()}"
resolution = 64
min_bucket = 64
max_bucket = 128
bucket_step = 32
[lora]
rank = 4
[train]
steps = {STEPS}
learning_rate = 1e-3
batch_size = 2
[checkpoint]
every = 1
keep = 2
[output]
dir = "{out.as_posix()}"
name = "style"
[log]
tensorboard = false
every = 1
"""
    )
    return cfg


def _start(cfg: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "diffusion_lora.cli", "train", str(cfg)] + (["--resume"] if resume else [])
    # A child inherits an ignored SIGINT (e.g. when the suite runs in the background of a script):
    # give it the default disposition, as a program started from a terminal has.
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _assert_checkpoints_readable(out: Path) -> None:
    """Every checkpoint folder on disk (and the one ``latest`` leads to) loads completely."""
    root = out / "checkpoints"
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".tmp")):
        if (folder / "state.pt").is_file():
            assert load_checkpoint(folder)["step"] == int(folder.name.split("-")[-1])
    chosen = latest_checkpoint(root)
    if chosen is not None:
        load_checkpoint(chosen)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = make_dataset(root / "data")
    cfg = _write_config(root, data, "straight")
    code, err = _finish(_start(cfg, resume=False))
    assert code == 0, err
    return root, data, load_file(str(root / "straight" / "style.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_at_random_points_then_resume_is_bit_identical(reference):
    root, data, expected = reference
    cfg = _write_config(root, data, "killed")
    out = root / "killed"
    rng = random.Random(7)
    kills = 0
    for attempt in range(12):
        proc = _start(cfg, resume=attempt > 0)
        if kills < 5:
            # Startup takes a few seconds, then each step writes a checkpoint: the delays land in
            # imports, in steps and inside checkpoint writes.
            time.sleep(rng.uniform(2.0, 12.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        code, err = _finish(proc)
        _assert_checkpoints_readable(out)
        if code == 0:
            break
        assert code == -signal.SIGKILL, err
    assert kills >= 1 and code == 0
    _assert_same(load_file(str(out / "style.safetensors")), expected)


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes_bit_identically(reference):
    root, data, expected = reference
    cfg = _write_config(root, data, "interrupted")
    out = root / "interrupted"
    proc = _start(cfg, resume=False)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "checkpoint-00000003").exists():  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # one Ctrl-C
    code, err = _finish(proc)
    assert code == 130, err
    assert "--resume" in err and "Traceback" not in err
    saved = latest_checkpoint(out / "checkpoints")
    assert saved is not None and 3 <= load_checkpoint(saved)["step"] < STEPS
    assert not (out / "style.safetensors").exists()
    code, err = _finish(_start(cfg, resume=True))
    assert code == 0, err
    _assert_same(load_file(str(out / "style.safetensors")), expected)


def test_interrupts_deferred_holds_ctrl_c_until_the_block_ends_and_respects_an_ignored_sigint():
    from diffusion_lora.training.interrupts import interrupts_deferred

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as started from a terminal
    try:
        finished = []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler has run by now: recorded, not raised
                finished.append(True)
        assert finished == [True] and signal.getsignal(signal.SIGINT) is signal.default_int_handler

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job of a script
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # still ignored, nothing raised
    finally:
        signal.signal(signal.SIGINT, previous)
