"""The HTTP server, through HTTP: a real uvicorn server on 127.0.0.1 in front of a real engine (tiny-sd15).

Images served (A1111 and native API, concurrent requests with different adapter stacks in one batch) equal
`diffusion-lora generate` alone; every limit, hostile adapter name or file, auth and body-size failure is a
4xx naming what was wrong, and fails only its own request.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import diffusion_lora as dl
from diffusion_lora.serve import Engine, ServeLimits

from .serve_files import cli_image, wait_for_stats, write_adapters

uvicorn = pytest.importorskip("uvicorn")
from diffusion_lora.serve.http import create_app  # noqa: E402 - after the importorskip
from diffusion_lora.serve.server import bind, url_of  # noqa: E402

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAMES = ("ink", "neon", "moss", "rust")
SMALL = {"steps": 3, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    outside = tmp_path_factory.mktemp("outside")
    write_adapters(folder, list(NAMES), seed=60, text_encoder=NAMES[1::2])
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    dl.add_lora(pipe, "ink", rank=4, alpha=4)
    dl.save_lora(pipe, "ink", outside / "away.safetensors")
    (folder / "away.safetensors").symlink_to(outside / "away.safetensors")  # a symlink leading out
    torch.save({"x": torch.zeros(2)}, folder / "pickled.safetensors")  # a pickle named .safetensors
    torch.save({"x": torch.zeros(2)}, folder / "evil.ckpt")
    data = (folder / "ink.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    other = dl.build_tiny_pipeline("tiny-sd3")  # an adapter of another family
    dl.add_lora(other, "sd3", rank=4, alpha=4)
    dl.save_lora(other, "sd3", folder / "sd3.safetensors")
    return folder


LIMITS = ServeLimits(max_steps=12, max_pixels=48 * 48, max_images=6, max_adapters=3, max_prompt_chars=300,
                     max_queue=8)


@pytest.fixture(scope="module")
def server(lora_dir):
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    engine = Engine(pipe, [str(lora_dir)], limits=LIMITS, max_batch=8, batch_window=0.4)
    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, api_key=KEY), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    with httpx.Client(base_url=url_of(sock), headers=AUTH, timeout=120) as client:
        yield client
    srv.should_exit = True
    thread.join(10)
    engine.close(drain=False)
    sock.close()


def _txt2img(client, prompt, seed, **extra):
    return client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "seed": seed, **SMALL, **extra})


def _png(b64):
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    return np.asarray(image.convert("RGB")).astype(int), image.text["parameters"]


def _batches(client):
    return client.get("/v1/stats").json()["batches"]


def _concurrently(calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


JOBS = [
    ("a red circle <lora:ink:0.8>", 11),
    ("a blue square <lora:neon:1> <lora:moss:-0.5>", 12),
    ("a green triangle", 13),
    ("two dots <lora:rust:0.6:1.2> <lora:ink:0.3>", 14),
]


def test_concurrent_mixed_stacks_share_a_batch_and_match_cli_generate(server, lora_dir, tmp_path):
    before = _batches(server)
    responses = _concurrently([lambda p=p, s=s: _txt2img(server, p, s) for p, s in JOBS])
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert _batches(server) == before + 1  # the four requests ran in one pipeline call
    worst = 0
    for (prompt, seed), response in zip(JOBS, responses):
        pixels, text = cli_image(tmp_path / f"cli-{seed}", lora_dir, prompt, seed)
        served, served_text = _png(response.json()["images"][0])
        worst = max(worst, int(np.abs(served - pixels).max()))
        assert served_text == text
        assert json.loads(response.json()["info"])["infotexts"] == [text]
    print(f"worst pixel difference, served vs CLI: {worst}/255")
    assert worst <= 1


def test_a1111_response_shape_random_seed_and_batch_seeds(server):
    r = _txt2img(server, "a red circle <lora:ink:0.5>", -1, batch_size=2, n_iter=2, cfg_scale=6.5,
                 unknown_field_of_a_newer_client=1, hr_scale=2, eta=0.3,  # unknown / unused fields are ignored
                 negative_prompt=None, styles=None, sampler_name=None)  # null: A1111's "the default"
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"]["seed"] == -1 and body["parameters"]["batch_size"] == 2  # the request, as sent
    assert "unknown_field_of_a_newer_client" not in body["parameters"]
    info = json.loads(body["info"])
    seed = info["seed"]
    assert 0 <= seed < 2**32
    assert info["all_seeds"] == [seed, seed + 1, seed + 2, seed + 3]
    assert info["all_prompts"] == ["a red circle <lora:ink:0.5>"] * 4
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (32, 32, 3, 6.5)
    assert len(body["images"]) == 4 and len(info["infotexts"]) == 4
    for i, (b64, text) in enumerate(zip(body["images"], info["infotexts"])):
        pixels, png_text = _png(b64)
        assert pixels.shape == (32, 32, 3)
        assert png_text == text and f"Seed: {seed + i}," in text and "CFG scale: 6.5" in text
    assert "ink" in info["extra_generation_params"]["Lora hashes"]
    # the native API with the same stack as an explicit list gives the same images and texts
    native = server.post("/v1/generate", json={"prompt": "a red circle", "loras": [{"name": "ink", "weight": 0.5}],
                                               "seed": seed, "count": 4, "guidance": 6.5, **SMALL})
    assert native.status_code == 200, native.text
    assert native.json()["seeds"] == info["all_seeds"]
    assert native.json()["parameters"] == info["infotexts"]
    for a, b in zip(native.json()["images"], body["images"]):
        assert np.abs(_png(a)[0] - _png(b)[0]).max() <= 1


@pytest.mark.parametrize(("change", "named"), [
    ({"steps": 13}, "max_steps"),
    ({"width": 56, "height": 48}, "max_pixels"),
    ({"batch_size": 4, "n_iter": 2}, "max_images"),
    ({"prompt": "x " * 200}, "max_prompt_chars"),
    ({"prompt": "<lora:ink> <lora:neon> <lora:moss> <lora:rust>"}, "max_adapters"),
    ({"width": 30}, "width"),
    ({"seed": -5}, "seed"),
    ({"enable_hr": True}, "enable_hr"),
    ({"alwayson_scripts": {"controlnet": {"args": [{}]}}}, "alwayson_scripts"),
    ({"init_images": ["aGVsbG8="]}, "init_images"),
    ({"subseed_strength": 0.3}, "subseed_strength"),
    ({"override_settings": {"sd_model_checkpoint": "other-model"}}, "sd_model_checkpoint"),
    ({"steps": "many"}, "steps"),
])
def test_limits_and_unsupported_fields_are_422_naming_them(server, change, named):
    r = server.post("/sdapi/v1/txt2img", json={"prompt": "a circle", "seed": 1, **SMALL, **change})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and named in detail


def test_native_api_limits_and_typos_are_422(server):
    r = server.post("/v1/generate", json={"prompt": "x", "loras": [{"name": n} for n in NAMES], **SMALL})
    assert r.status_code == 422 and "max_adapters" in r.json()["detail"]
    r = server.post("/v1/generate", json={"prompt": "x", "loras": [{"name": "ink"}, {"name": "ink"}], **SMALL})
    assert r.status_code == 422 and "ink" in r.json()["detail"] and "twice" in r.json()["detail"]
    r = server.post("/v1/generate", json={"prompt": "x", "stpes": 3})
    assert r.status_code == 422 and "stpes" in r.json()["detail"]
    r = server.post("/v1/generate", json={"prompt": "x", "loras": [{"name": "ink", "weight": 1e9}], **SMALL})
    assert r.status_code == 422 and "weight" in r.json()["detail"]


@pytest.mark.parametrize(("tag", "status", "named"), [
    ("../loras/ink", 422, "'..'"),
    ("/etc/passwd", 422, "/etc/passwd"),
    ("away", 422, "outside"),
    ("evil.ckpt", 404, "evil.ckpt"),
    ("nosuch", 404, "nosuch"),
])
def test_adapter_names_resolve_only_inside_the_folder(server, tag, status, named):
    r = _txt2img(server, f"a circle <lora:{tag}:1>", 1)
    assert r.status_code == status, r.text
    assert named in r.json()["detail"]
    r = server.post("/v1/generate", json={"prompt": "a circle", "loras": [{"name": tag}], **SMALL})
    assert r.status_code == status and named in r.json()["detail"]


def test_broken_adapter_files_fail_only_their_request_in_a_shared_batch(server):
    bad = ["pickled", "truncated", "sd3"]
    before = _batches(server)
    calls = [lambda n=n: _txt2img(server, f"a circle <lora:{n}:1>", 5) for n in bad]
    calls.append(lambda: _txt2img(server, "a blue square <lora:neon:0.7>", 21))
    *failed, good = _concurrently(calls)
    for name, r in zip(bad, failed):
        assert r.status_code == 422, r.text
        assert f"{name}.safetensors" in r.json()["detail"]
        assert "Traceback" not in r.text
    assert good.status_code == 200, good.text
    assert _batches(server) == before + 1  # the good request ran in the batch the broken ones were taken with
    alone = _txt2img(server, "a blue square <lora:neon:0.7>", 21)
    assert np.abs(_png(alone.json()["images"][0])[0] - _png(good.json()["images"][0])[0]).max() <= 1
    names = {entry["name"] for entry in server.get("/sdapi/v1/loras").json()}
    assert set(NAMES) <= names and "away" not in names and "pickled" not in names


def test_auth(server):
    url = "/sdapi/v1/sd-models"
    assert httpx.get(str(server.base_url.join(url))).status_code == 401
    assert httpx.get(str(server.base_url.join(url)), headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(str(server.base_url.join(url)), headers={"Authorization": KEY}).status_code == 401
    assert httpx.get(str(server.base_url.join(url)), auth=("user", "nope")).status_code == 401
    assert httpx.get(str(server.base_url.join(url)), auth=("user", KEY)).status_code == 200  # A1111 --api-auth
    assert httpx.get(str(server.base_url.join("/openapi.json"))).status_code == 401
    assert httpx.get(str(server.base_url.join("/v1/health"))).json() == {"status": "ok"}
    r = server.get(url)
    assert r.status_code == 200 and r.json()[0]["model_name"] == "tiny-sd15"


def test_oversized_bodies_are_413(server):
    r = server.post("/sdapi/v1/txt2img", content=b"{" + b" " * (2 << 20) + b"}",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b" " * 65536

    r = server.post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_openapi_describes_the_native_api(server):
    schema = server.get("/openapi.json").json()
    for path in ("/v1/generate", "/v1/loras", "/v1/stats", "/sdapi/v1/txt2img"):
        assert path in schema["paths"]
    assert "loras" in schema["components"]["schemas"]["GenerateRequest"]["properties"]


def test_options_models_and_progress(server):
    title = server.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert title == server.get("/sdapi/v1/sd-models").json()[0]["title"]
    assert server.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).status_code == 200
    r = server.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl-base"})
    assert r.status_code == 422 and "sd_model_checkpoint" in r.json()["detail"]
    assert server.post("/sdapi/v1/refresh-loras").status_code == 200
    p = server.get("/sdapi/v1/progress").json()
    assert {"progress", "eta_relative", "state", "current_image", "textinfo"} <= set(p)
    assert {"job_count", "sampling_step", "sampling_steps"} <= set(p["state"])


def test_full_queue_is_429_and_progress_reports_the_run(server):
    slow = {"prompt": "a slow one <lora:ink:1>", "steps": 8, "width": 32, "height": 32}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(server.post, "/v1/generate", json={**slow, "count": 6})
        wait_for_stats(server, lambda s: s["running"] == 6 and s["steps"] == 8)
        progress = server.get("/sdapi/v1/progress").json()
        assert progress["state"]["sampling_steps"] == 8 and progress["state"]["job_count"] >= 6
        for _ in range(2000):  # until a sample falls inside the run (steps 1-7 of 8)
            progress = server.get("/sdapi/v1/progress").json()
            if 0 < progress["progress"] < 1:
                break
        assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0  # A1111: seconds left, estimated
        queued = pool.submit(server.post, "/v1/generate", json={**slow, "count": 6})
        wait_for_stats(server, lambda s: s["queued"] == 6)
        r = server.post("/v1/generate", json={**slow, "count": 3})  # 6 + 3 > max_queue 8
        assert r.status_code == 429 and "queue" in r.json()["detail"] and r.headers["Retry-After"]
        assert running.result().status_code == 200 and queued.result().status_code == 200


def test_a1111_samplers_list_and_sampler_name_in_txt2img(server, lora_dir, tmp_path):
    names = {item["name"] for item in server.get("/sdapi/v1/samplers").json()}
    # A1111's names for an SD1.5 model, written by hand; Restart has no diffusers equivalent and is not listed
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= names and "Restart" not in names
    assert "Karras" in {item["label"] for item in server.get("/sdapi/v1/schedulers").json()}
    response = _txt2img(server, "a red circle <lora:ink:0.8>", 21, sampler_name="Euler a")
    assert response.status_code == 200, response.text
    pixels, text = _png(response.json()["images"][0])
    cli_pixels, cli_text = cli_image(tmp_path / "cli-euler-a", lora_dir, "a red circle <lora:ink:0.8>", 21,
                                     "--sampler", "Euler a")
    assert "Sampler: Euler a" in text and text == cli_text
    assert np.abs(pixels - cli_pixels).max() <= 1
    assert _txt2img(server, "x", 1, sampler_name="Restart").status_code == 422


def test_lora_list_is_read_once_and_again_on_refresh(server, lora_dir):
    import shutil

    before = {entry["name"] for entry in server.get("/sdapi/v1/loras").json()}
    shutil.copy(lora_dir / "ink.safetensors", lora_dir / "ink_copy.safetensors")
    try:
        assert {entry["name"] for entry in server.get("/v1/loras").json()} == before  # the cached list
        assert server.post("/sdapi/v1/refresh-loras").status_code == 200
        assert {entry["name"] for entry in server.get("/sdapi/v1/loras").json()} == before | {"ink_copy"}
        # a request resolves names on disk, refreshed or not
        assert _txt2img(server, "a red circle <lora:ink_copy:0.5>", 3).status_code == 200
    finally:
        (lora_dir / "ink_copy.safetensors").unlink()
        server.post("/sdapi/v1/refresh-loras")
