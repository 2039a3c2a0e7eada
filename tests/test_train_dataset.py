"""Training data: image loading and validation, folder scanning, buckets, captions, the bucketed dataset."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion_lora as dl
from diffusion_lora.training.buckets import assign_bucket, make_buckets, resize_and_crop
from diffusion_lora.training.captions import process_caption, tag_frequency
from diffusion_lora.training.dataset import BucketedDataset, bucket_batches
from diffusion_lora.training.images import image_size, load_image, validate_images
from diffusion_lora.training.scan import ImageItem, scan_images


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    array = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)


def save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


# ------------------------------------------------------------------------------------------ loading


def test_load_image_composites_transparency_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.putpixel((0, 0), 0)
    la = Image.new("LA", (8, 8), (0, 0))

    got_rgba = load_image(save(tmp_path / "rgba.png", rgba))
    got_p = load_image(save(tmp_path / "p.png", palette, transparency=0))
    got_la = load_image(save(tmp_path / "la.png", la))

    assert got_rgba.mode == got_p.mode == got_la.mode == "RGB"
    assert got_rgba.getpixel((0, 0)) == (255, 255, 255) and got_rgba.getpixel((1, 1)) == (255, 0, 0)
    assert got_p.getpixel((0, 0)) == (255, 255, 255) and got_p.getpixel((1, 1)) == (0, 255, 0)
    assert got_la.getpixel((3, 3)) == (255, 255, 255)


def test_load_image_scales_gray_and_converts_cmyk(tmp_path: Path) -> None:
    gray16 = Image.fromarray(np.array([[0, 100 * 257, 65535, 65535]], dtype=np.uint16))
    assert gray16.mode.startswith("I;16")
    got16 = load_image(save(tmp_path / "g16.png", gray16))
    got_l = load_image(save(tmp_path / "l.png", Image.new("L", (4, 4), 100)))
    got_cmyk = load_image(save(tmp_path / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95))

    assert [got16.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]
    assert got_l.mode == "RGB" and got_l.getpixel((0, 0)) == (100, 100, 100)
    red, green, blue = got_cmyk.getpixel((8, 8))
    assert got_cmyk.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90° clockwise
    path = save(tmp_path / "rotated.jpg", img, exif=exif, quality=95)

    loaded = load_image(path)

    assert loaded.size == (20, 40) == image_size(path)
    assert loaded.getpixel((17, 3))[0] > 200  # the marker is now top-right
    assert loaded.getpixel((3, 3))[2] > 200


def test_bomb_guard_is_a_parameter_not_a_global(tmp_path: Path) -> None:
    path = save(tmp_path / "big.png", noise_image(64, 64))
    limit_before = Image.MAX_IMAGE_PIXELS

    with pytest.raises(dl.DatasetError, match="over the limit of 1000") as info:
        load_image(path, max_pixels=1000)

    assert str(path) in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == limit_before
    assert load_image(path).size == (64, 64)


# ---------------------------------------------------------------------------------- scan + validate


def build_messy_dataset(root: Path) -> dict[str, Path]:
    """Good images and one of every problem; returns the interesting paths by role."""
    paths = {
        "good_a": save(root / "a.png", noise_image(96, 96, 1)),
        "good_b": save(root / "sub" / "b.jpg", noise_image(96, 128, 2)),
        "big": save(root / "big.png", noise_image(220, 220, 3)),
        "tiny": save(root / "tiny.png", Image.new("RGB", (1, 1))),
        "zero": root / "zero.png",
        "text": root / "text.jpg",
        "bad_caption": save(root / "badcap.png", noise_image(96, 96, 4)),
    }
    truncated = save(root / "truncated.png", noise_image(96, 96, 5))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    paths["truncated"] = truncated
    paths["zero"].write_bytes(b"")
    paths["text"].write_text("this is not a JPEG")
    (root / "badcap.txt").write_bytes("caf\xe9, latin-1".encode("latin-1"))
    paths["loop"] = root / "sub" / "loop"
    os.symlink(root, paths["loop"])  # a folder linked to its own parent
    return paths


def test_validate_reports_every_problem_in_one_error(tmp_path: Path) -> None:
    paths = build_messy_dataset(tmp_path / "data")
    items = scan_images(tmp_path / "data")

    with pytest.raises(dl.DatasetError) as info:
        validate_images(items, min_side=256, skip_bad=False, max_pixels=200 * 200)

    message = str(info.value)
    assert message.startswith("7 problem(s)")
    for role in ("big", "tiny", "zero", "text", "truncated", "bad_caption", "loop"):
        assert f"{paths[role]}: " in message, role
    assert "symlink loop" in message and "not valid UTF-8" in message and "too small" in message
    assert str(paths["good_a"]) + ":" not in message and str(paths["good_b"]) + ":" not in message


def test_validate_skip_bad_returns_the_good_items(tmp_path: Path) -> None:
    paths = build_messy_dataset(tmp_path / "data")

    good, problems = validate_images(scan_images(tmp_path / "data"), min_side=256, skip_bad=True, max_pixels=200 * 200)

    assert [item.path for item in good] == [paths["good_a"], paths["good_b"]]
    assert len(problems) == 7 and all(": " in line for line in problems)
    tiny = ImageItem(paths["tiny"], "", 1, "data")
    kept, tiny_problems = validate_images([tiny], min_side=0, skip_bad=True)
    assert kept == [] and "too small" in tiny_problems[0]  # 1x1 is refused even with no minimum side


def test_scan_reads_captions_metadata_and_repeat_folders(tmp_path: Path) -> None:
    root = tmp_path / "data"
    save(root / "10_mystyle" / "x.PNG", noise_image(8, 8))
    (root / "10_mystyle" / "x.txt").write_text("ink, cat", encoding="utf-8")
    save(root / "10_mystyle" / "deeper" / "y.webp", noise_image(8, 8))
    (root / "10_mystyle" / "deeper" / "y.txt").write_bytes(b"")  # empty caption -> instance prompt
    save(root / "meta" / "m1.jpg", noise_image(8, 8))
    save(root / "meta" / "m2.jpg", noise_image(8, 8))
    (root / "meta" / "metadata.jsonl").write_text(json.dumps({"file_name": "m1.jpg", "text": "from metadata"}) + "\n")
    (root / "notes.md").write_text("ignored: not an image")

    items = scan_images(root, instance_prompt="sks style", default_repeats=2)

    assert [item.path.relative_to(root).as_posix() for item in items] == [
        "10_mystyle/deeper/y.webp",
        "10_mystyle/x.PNG",
        "meta/m1.jpg",
        "meta/m2.jpg",
    ]
    by_name = {item.path.name: item for item in items}
    assert (by_name["x.PNG"].caption, by_name["x.PNG"].repeats, by_name["x.PNG"].folder) == ("ink, cat", 10, "mystyle")
    assert (by_name["y.webp"].caption, by_name["y.webp"].repeats, by_name["y.webp"].folder) == (
        "sks style",
        10,
        "mystyle",
    )
    assert (by_name["m1.jpg"].caption, by_name["m1.jpg"].repeats, by_name["m1.jpg"].folder) == (
        "from metadata",
        2,
        "meta",
    )
    assert by_name["m2.jpg"].caption == "sks style"
    assert not any(item.problems for item in items)


# ------------------------------------------------------------------------------------------ buckets


@pytest.mark.parametrize(("resolution", "step"), [(512, 64), (1024, 64), (768, 32)])
def test_make_buckets_invariants(resolution: int, step: int) -> None:
    buckets = make_buckets(resolution, step, min_side=256, max_side=2048)

    assert buckets == sorted(set(buckets)) and (resolution, resolution) in buckets
    assert all(w * h <= resolution**2 and w % step == 0 and h % step == 0 for w, h in buckets)
    assert all(256 <= side <= 2048 for bucket in buckets for side in bucket)
    assert {(h, w) for w, h in buckets} == set(buckets)  # tall and wide alike
    ratios = [w / h for w, h in buckets]
    assert min(ratios) < 0.3 and max(ratios) > 3.5

    # kohya's rule: each bucket is some width's tallest height within the area (or that, transposed)
    def tallest(width: int) -> int:
        return min(2048, resolution**2 // width // step * step)

    assert all(h == tallest(w) or w == tallest(h) for w, h in buckets if w != h)
    assert {(w, tallest(w)) for w in range(256, 2049, step) if tallest(w) >= 256} <= set(buckets)


def test_make_buckets_rejects_misaligned_resolution() -> None:
    with pytest.raises(dl.ConfigError, match="resolution"):
        make_buckets(1000, 64)


def test_assign_bucket_picks_nearest_aspect_ratio() -> None:
    buckets = make_buckets(1024)
    rng = random.Random(0)
    for _ in range(200):
        size = (rng.randint(100, 4000), rng.randint(100, 4000))
        chosen = assign_bucket(size, buckets)
        distance = abs(math.log(chosen[0] / chosen[1]) - math.log(size[0] / size[1]))
        assert all(distance <= abs(math.log(w / h) - math.log(size[0] / size[1])) + 1e-12 for w, h in buckets)
    assert assign_bucket((1000, 1000), buckets) == (1024, 1024)
    assert assign_bucket((300, 300), [(128, 128), (256, 256)]) == (256, 256)  # tie -> larger area


def test_assign_bucket_no_upscale_never_upscales() -> None:
    buckets = make_buckets(1024)
    rng = random.Random(1)
    for _ in range(200):
        width, height = rng.randint(64, 3000), rng.randint(64, 3000)
        w, h = assign_bucket((width, height), buckets, no_upscale=True)
        assert w % 64 == 0 and h % 64 == 0
        assert max(w / width, h / height) <= 1.0  # covering the bucket needs no enlargement
        assert w * h <= 1024 * 1024
    assert assign_bucket((300, 200), buckets, no_upscale=True) == (256, 192)
    assert assign_bucket((300, 200), buckets) != (256, 192)


def test_resize_and_crop_geometry() -> None:
    img = noise_image(300, 200)
    center = resize_and_crop(img, (128, 128), center=True, rng=None)
    first = resize_and_crop(img, (128, 128), center=False, rng=random.Random(5))
    again = resize_and_crop(img, (128, 128), center=False, rng=random.Random(5))

    assert center.image.size == (128, 128) and center.target_size == (128, 128)
    assert center.original_size == (200, 300) and center.resized_size == (128, 192)
    assert center.crop_top_left == (0, 32)
    assert first.crop_top_left == again.crop_top_left and first.image.tobytes() == again.image.tobytes()
    with pytest.raises(dl.ConfigError, match="rng"):
        resize_and_crop(img, (128, 128), center=False, rng=None)


# ----------------------------------------------------------------------------------------- captions


def test_caption_keep_tokens_and_shuffle_determinism() -> None:
    caption = "a, b, c, d, e, f, g, h"
    results = {process_caption(caption, shuffle=True, keep_tokens=2, rng=random.Random(s)) for s in range(30)}

    assert all(r.startswith("a, b, ") and sorted(r.split(", ")) == list("abcdefgh") for r in results)
    assert len(results) > 5
    same = [process_caption(caption, shuffle=True, keep_tokens=2, rng=random.Random(7)) for _ in range(2)]
    assert same[0] == same[1]
    assert process_caption("  plain text, as written ", rng=random.Random(0)) == "plain text, as written"


def test_caption_trigger_word_is_first_once_and_kept() -> None:
    rng = random.Random(0)
    assert process_caption("cat, sks, dog", trigger_word="sks", rng=rng) == "sks, cat, dog"
    assert process_caption("", trigger_word="sks", rng=rng) == "sks"
    for seed in range(20):
        got = process_caption("a, b, c, d", trigger_word="sks", shuffle=True, keep_tokens=2, rng=random.Random(seed))
        tags = got.split(", ")
        assert tags[:2] == ["sks", "a"] and tags.count("sks") == 1 and sorted(tags[2:]) == ["b", "c", "d"]
    with pytest.raises(dl.ConfigError, match="trigger_word"):
        process_caption("a", trigger_word="x, y", rng=rng)


def test_caption_dropout_rate() -> None:
    rng = random.Random(3)
    dropped = sum(process_caption("a, b", trigger_word="sks", dropout=0.3, rng=rng) == "" for _ in range(2000))
    assert abs(dropped / 2000 - 0.3) < 0.04
    assert all(process_caption("a", dropout=0.0, rng=rng) == "a" for _ in range(50))


def test_tag_frequency_kohya_shape() -> None:
    got = tag_frequency({"mystyle": ["Cat, dog", "cat, , tree "], "other": []})
    assert got == {"mystyle": {"cat": 2, "dog": 1, "tree": 1}, "other": {}}


# ------------------------------------------------------------------------------------------ dataset


@pytest.fixture
def small_items(tmp_path: Path) -> list[ImageItem]:
    sizes = [(160, 160), (256, 96), (96, 256), (200, 150), (150, 150)]
    items = []
    for i, (w, h) in enumerate(sizes):
        path = save(tmp_path / f"img{i}.png", noise_image(w, h, seed=i))
        items.append(ImageItem(path, f"tag{i}, x, y, z", repeats=1 + i % 3, folder="f", is_class=i == 4))
    return items


def make_dataset(items: list[ImageItem], **overrides) -> BucketedDataset:
    options = {"resolution": 128, "bucket_step": 32, "min_bucket": 64, "max_bucket": 256, "seed": 11}
    return BucketedDataset(items, **{**options, **overrides})


def test_dataset_sample_shape_range_and_geometry(small_items: list[ImageItem]) -> None:
    dataset = make_dataset(small_items, trigger_word="sks")
    assert len(dataset) == sum(item.repeats for item in small_items)

    for index in range(len(dataset)):
        sample = dataset[index]
        width, height = sample["bucket"]
        assert sample["pixel_values"].shape == (3, height, width) and sample["pixel_values"].dtype == torch.float32
        assert -1.0 <= sample["pixel_values"].min() and sample["pixel_values"].max() <= 1.0
        assert sample["target_size"] == (height, width) and width * height <= 128 * 128
        assert sample["caption"].startswith("sks, ") != sample["is_class"]  # no trigger word on class images
    assert dataset[0]["original_size"] == (160, 160) and dataset[0]["bucket"] == (128, 128)


def test_dataset_is_deterministic_per_seed_epoch_index(small_items: list[ImageItem]) -> None:
    options = {"center_crop": False, "flip": True, "shuffle_caption": True}
    first, second = make_dataset(small_items, **options), make_dataset(small_items, **options)
    second.set_epoch(3)
    second.set_epoch(0)

    epoch0 = [first[i] for i in range(len(first))]
    for index in reversed(range(len(second))):  # order and history do not matter
        assert torch.equal(second[index]["pixel_values"], epoch0[index]["pixel_values"])
        assert second[index]["caption"] == epoch0[index]["caption"]
        assert second[index]["crop_top_left"] == epoch0[index]["crop_top_left"]

    first.set_epoch(1)
    changed = sum(
        not torch.equal(first[i]["pixel_values"], epoch0[i]["pixel_values"])
        or first[i]["caption"] != epoch0[i]["caption"]
        for i in range(len(first))
    )
    assert changed >= len(first) - 2


def test_flip_mirrors_the_crop_offset(small_items: list[ImageItem]) -> None:
    dataset = make_dataset(small_items[1:2], center_crop=True, flip=True)  # 256x96 -> one wide bucket
    offsets = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        offsets.add(dataset[0]["crop_top_left"])
    center = resize_and_crop(load_image(small_items[1].path), dataset.item_buckets[0], center=True, rng=None)
    top, left = center.crop_top_left
    assert offsets == {(top, left), (top, center.resized_size[1] - left - dataset.item_buckets[0][0])}


def test_bucket_batches_cover_each_sample_once_in_single_bucket_batches(small_items: list[ImageItem]) -> None:
    dataset = make_dataset(small_items)
    batches = bucket_batches(dataset, 2, seed=1, epoch=0)

    flat = sorted(index for batch in batches for index in batch)
    assert flat == list(range(len(dataset)))
    assert all(len({dataset.item_buckets[dataset.item_index(i)] for i in batch}) == 1 for batch in batches)
    counts = [sum(dataset.item_index(i) == item_idx for i in flat) for item_idx in range(len(small_items))]
    assert counts == [item.repeats for item in small_items]
    assert batches == bucket_batches(dataset, 2, seed=1, epoch=0)
    assert any(bucket_batches(dataset, 2, seed=1, epoch=e) != batches for e in range(1, 6))
