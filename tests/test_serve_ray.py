"""Ray Serve scale-out: a real local Ray instance on 127.0.0.1, two replicas, routing by adapter stack.

Images equal `diffusion-lora generate`'s; a stack id goes back to the replica that holds it; two ids are
spread over the two replicas; a replica holding more stacks than max_stacks lets Ray evict the least
recently used one, which unpins its adapters in that replica's engine cache.
"""

from __future__ import annotations

import base64
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import diffusion_lora as dl
from diffusion_lora.cli import main
from diffusion_lora.serve.stack_id import STACK_ID_HEADER, stack_id, stack_names

from .serve_files import cli_image, write_adapters

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

NAMES = ("ink", "neon", "moss", "rust", "fog", "sun")
MAX_STACKS = 2
KEY = "test-key-5e1f"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-loras")
    write_adapters(folder, list(NAMES), seed=80, text_encoder=NAMES[1::2])
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app(lora_dir):
    from diffusion_lora.serve.ray_app import ray_deployment

    port = _free_port()
    # On a loaded machine a replica can answer the router's queue-length probe later than Ray's 0.1 s default;
    # Ray then retries among the replicas holding the fewest stacks rather than the one holding the id.
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "2")
    mp.setenv("RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "5")
    ray.init(address="local", include_dashboard=False, num_cpus=2, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = ray_deployment("tiny-sd15", [str(lora_dir)], replicas=2, max_batch=4, max_stacks=MAX_STACKS,
                             ray_actor_options={"num_cpus": 1}, batch_window=0.05, api_key=KEY)
        handle = serve.run(app, name="diffusion-lora", route_prefix="/")
        yield f"http://127.0.0.1:{port}", handle
    finally:
        serve.shutdown()
        ray.shutdown()
        mp.undo()


def _body(prompt, seed, loras=()):
    return {"prompt": prompt, "steps": 3, "width": 32, "height": 32, "seed": seed,
            "loras": [{"name": n, "weight": w} for n, w in loras]}


def _post(url, body, key=None, auth=f"Bearer {KEY}"):
    headers = {STACK_ID_HEADER: key} if key else {}
    if auth is not None:
        headers["Authorization"] = auth
    return httpx.post(f"{url}/v1/generate", json=body, headers=headers, timeout=120)


def _pixels(b64):
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    return np.asarray(image.convert("RGB")).astype(int), image.text["parameters"]


def test_stack_id_is_canonical():
    assert stack_id(["neon", "ink", "neon"]) == stack_id(["ink", "neon"]) == "ink+neon"
    odd = ["a+b", "dir/c", "é"]
    assert stack_names(stack_id(odd)) == sorted(odd, key=lambda n: stack_id([n]))
    assert stack_id(odd).isascii() and stack_id(["a+b"]) != stack_id(["a", "b"])
    for bad in ("neon+ink", "ink++neon", "%ff", "a b"):
        with pytest.raises(dl.ConfigError):
            stack_names(bad)


def test_http_routing_by_stack_matches_cli(ray_app, lora_dir, tmp_path):
    url, _ = ray_app
    a = ("a red circle <lora:ink:0.8>", 21)
    b = ("a blue square <lora:neon:1> <lora:moss:-0.5>", 22)
    first_a = _post(url, _body(*a), "ink")
    assert first_a.status_code == 200, first_a.text
    time.sleep(1.0)  # the replica pushes the ids it holds every 0.1 s; let the proxy's router hear it
    first_b = _post(url, _body(*b), "moss+neon")
    assert first_b.status_code == 200, first_b.text
    replica_a, replica_b = first_a.json()["replica"], first_b.json()["replica"]
    assert replica_a != replica_b  # a new id goes to the replica holding the fewest stacks
    assert "state" not in first_a.json()  # what other clients loaded is not shown over HTTP
    time.sleep(1.0)
    with ThreadPoolExecutor(4) as pool:  # concurrent requests: each id still goes to its replica
        again = list(pool.map(lambda args: _post(url, _body(*args[0]), args[1]),
                              [(a, "ink"), (b, "moss+neon"), (a, "ink"), (b, "moss+neon")]))
    assert [r.json()["replica"] for r in again] == [replica_a, replica_b, replica_a, replica_b]
    base = _post(url, _body("a green triangle", 23))  # no adapters: no id, any replica
    assert base.status_code == 200, base.text
    unrouted = _post(url, _body(*b))  # no header: the id comes from the body, any replica; same image
    assert unrouted.status_code == 200, unrouted.text
    worst, reference = 0, {}
    for (prompt, seed), response in ((a, first_a), (b, first_b), (a, again[2]), (b, unrouted),
                                     (("a green triangle", 23), base)):
        data = response.json()
        assert data["seeds"] == [seed]
        served, text = _pixels(data["images"][0])
        assert data["parameters"] == [text]
        if seed not in reference:
            reference[seed] = cli_image(tmp_path / f"cli-{seed}", lora_dir, prompt, seed)
        pixels, cli_text = reference[seed]
        worst = max(worst, int(np.abs(served - pixels).max()))
        assert text == cli_text
    print(f"worst pixel difference to diffusion-lora generate: {worst}/255")
    assert worst <= 1
    unknown = _post(url, {**_body(*a), "stepz": 3}, "ink")
    assert unknown.status_code == 422 and "stepz" in unknown.json()["detail"]
    garbage = httpx.post(f"{url}/v1/generate", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert garbage.status_code == 422 and "not JSON" in garbage.json()["detail"]
    wrong = _post(url, _body(*a), "neon")
    assert wrong.status_code == 422 and STACK_ID_HEADER in wrong.json()["detail"]
    missing = _post(url, _body("x <lora:nothere:1>", 1), "nothere")
    assert missing.status_code == 404 and "nothere" in missing.json()["detail"]
    for auth in (None, "Bearer wrong", f"Basic {KEY}"):
        assert _post(url, _body(*a), "ink", auth=auth).status_code == 401


def test_eviction_beyond_max_stacks_unpins(ray_app):
    _, handle = ray_app
    stacks = [("ink",), ("neon",), ("moss", "rust"), ("fog",), ("sun", "ink"), ("rust",)]
    seen: dict[str, list[dict]] = {}
    for i, names in enumerate(stacks):
        key = stack_id(names)
        body = _body(f"shape {i}", 40 + i, [(n, 0.7) for n in names])
        out = handle.options(multiplexed_model_id=key).generate.remote(body, state=True).result(timeout_s=120)
        state = out["state"]
        assert key in state["stacks"] and len(state["stacks"]) <= MAX_STACKS
        held = {n for k in state["stacks"] for n in stack_names(k)}
        for adapter, pins in state["adapters"].items():
            assert (pins > 0) == (adapter in held), (adapter, state)  # pinned exactly while a held stack names it
        seen.setdefault(out["replica"], []).append(state)
    # six ids on two replicas holding two each: some replica dropped a stack it held before
    evicted = [k for states in seen.values() for j, s in enumerate(states) for k in s["stacks"]
               if any(k not in later["stacks"] for later in states[j + 1:])]
    assert evicted


def test_serve_ray_refuses_an_open_bind_without_key_and_a_cache_too_small(tmp_path, capsys):
    from diffusion_lora.serve.ray_app import ray_deployment

    assert main(["serve-ray", "--lora-dir", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host 0.0.0.0") and "--api-key" in err and err.count("\n") == 1
    with pytest.raises(dl.ConfigError, match="cache_size 7 cannot hold max_stacks"):
        ray_deployment("tiny-sd15", [str(tmp_path)], max_stacks=2, cache_size=7)
