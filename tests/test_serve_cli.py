"""`diffusion-lora serve` as a user runs it: a subprocess, the key from the environment, SIGTERM shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import diffusion_lora as dl

from .helpers import randomize
from .serve_files import wait_for_stats

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

KEY = "cli-key-987"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    dl.add_lora(pipe, "ink", rank=4, alpha=4)
    randomize(pipe, "ink", seed=3, std=0.15)
    dl.save_lora(pipe, "ink", folder / "ink.safetensors")
    return folder


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DIFFUSION_LORA_API_KEY"}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def _serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffusion_lora.cli", "serve", "--model", "tiny-sd15", *args]


def test_non_loopback_bind_without_key_is_refused_before_loading(lora_dir):
    start = time.monotonic()
    result = subprocess.run(_serve("--lora-dir", str(lora_dir), "--host", "0.0.0.0"), capture_output=True,
                            text=True, timeout=60, env=_env())
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --host 0.0.0.0") and "--api-key" in lines[0]
    assert time.monotonic() - start < 30  # refused before the model loaded


@pytest.mark.parametrize(("grace", "queued_status"), [("30", 200), ("0", 503)])
def test_sigterm_finishes_the_running_batch_then_drains_or_refuses_the_queue(lora_dir, grace, queued_status):
    proc = subprocess.Popen(
        _serve("--lora-dir", str(lora_dir), "--port", "0", "--max-batch", "2", "--batch-window", "0.05",
               "--grace", grace),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(DIFFUSION_LORA_API_KEY=KEY))
    try:
        line = proc.stdout.readline()  # printed once the server accepts connections
        assert line.startswith("serving tiny-sd15 on http://127.0.0.1:"), (line, proc.stderr.read())
        assert KEY not in " ".join(proc.args)
        url = line.split()[-1]
        with httpx.Client(base_url=url, timeout=120) as plain:
            assert plain.get("/sdapi/v1/loras").status_code == 401  # the key came from the environment
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        job = {"prompt": "a circle <lora:ink:0.9>", "steps": 4, "width": 32, "height": 32, "seed": 4, "count": 2}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(client.post, "/v1/generate", json=job)
            wait_for_stats(client, lambda s: s["running"] == 2)
            queued = pool.submit(client.post, "/v1/generate", json={**job, "seed": 9})
            wait_for_stats(client, lambda s: s["queued"] == 2)
            proc.send_signal(signal.SIGTERM)
            first, second = running.result(), queued.result()
        assert first.status_code == 200 and len(first.json()["images"]) == 2
        assert second.status_code == queued_status, second.text
        if queued_status == 503:
            assert "shut down" in second.json()["detail"]
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            client.get("/v1/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_help_imports_neither_torch_nor_the_web_stack():
    script = ("import runpy, sys\n"
              "sys.argv = ['diffusion-lora', 'serve', '--help']\n"
              "try:\n"
              "    runpy.run_module('diffusion_lora.cli', run_name='__main__', alter_sys=True)\n"
              "except SystemExit:\n"
              "    pass\n"
              "print(sorted(m for m in ('torch', 'diffusers', 'fastapi', 'uvicorn', 'starlette') if m in sys.modules),"
              " file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=_env())
    assert result.stdout.startswith("usage: diffusion-lora serve") and "--api-key" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "[]"
