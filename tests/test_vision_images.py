"""Images in: Kimi-K2.5's preprocessing (against transformers' processor where it imports, and against Pillow's
resize everywhere), and hostile bytes and URLs refused with one clear reason."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from seekmoe.vision.images import ImageLimits, decode_image, load_image_file, load_image_url
from seekmoe.vision.preprocess import ImageProcessor


def drawn(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A w x h image of smooth gradients plus noise (resampling has edges and texture to get wrong)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    channels = [(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)), ((x + y) * 7) % 256]
    rgb = np.stack(channels, -1) + rng.integers(-20, 20, (h, w, 3))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, (h, w)).astype(np.uint8)))
    return image.convert(mode) if mode not in ("RGB", "RGBA") else image


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


# (image, processor): as it is; shrunk by the patch budget; shrunk by the per-side limit; transparency; grey.
CASES = [((70, 42, "RGB"), ImageProcessor()),
         ((150, 100, "RGB"), ImageProcessor(max_patches=20)),
         ((97, 33, "RGB"), ImageProcessor(max_patches_per_side=4)),
         ((30, 45, "RGBA"), ImageProcessor()),
         ((29, 16, "L"), ImageProcessor(patch_size=8))]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_preprocessing_matches_transformers_kimi_k25_processor(case):
    try:
        from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor
    except Exception as e:  # its torchvision backend is missing or does not load beside this torch
        pytest.skip(f"transformers' Kimi-K2.5 image processor does not import here: {type(e).__name__}")
    (w, h, mode), ours = CASES[case]
    image = drawn(w, h, mode, seed=case)
    ref = Kimi_K25ImageProcessor(patch_size=ours.patch_size, merge_size=ours.merge_size,
                                 max_patches=ours.max_patches,
                                 size={"max_height": ours.max_patches_per_side, "max_width": ours.max_patches_per_side})
    expected = ref(images=[image, drawn(40, 40)], return_tensors="pt")
    pixel_values, grid = ours([image, drawn(40, 40)])
    assert torch.equal(grid, expected["image_grid_thw"])
    torch.testing.assert_close(pixel_values, expected["pixel_values"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_preprocessing_resizes_pads_and_patchifies_like_pillow(case):
    """Independent of transformers: the grid from Kimi-K2.5's budget arithmetic, and the pixels equal to Pillow's
    bicubic resize (within one 8-bit level: torch's uint8 kernel rounds its fixed-point sums on its own), zero-padded
    to [-1] and cut into patches in raster order."""
    (w, h, mode), proc = CASES[case]
    image = drawn(w, h, mode, seed=case)
    pixel_values, grid = proc([image])
    (rh, rw), (ph, pw) = proc.target_size(h, w)
    p = proc.patch_size
    assert grid.tolist() == [[1, ph // p, pw // p]]
    assert ph % (p * proc.merge_size) == 0 and pw % (p * proc.merge_size) == 0
    assert (rh // p) * (rw // p) <= proc.max_patches * 1.01  # Kimi-K2.5's budget, before padding
    rgb = image.convert("RGBA") if mode == "RGBA" else image
    if mode == "RGBA":
        rgb = Image.alpha_composite(Image.new("RGBA", rgb.size, (255, 255, 255, 255)), rgb)
    expected = np.asarray(rgb.convert("RGB").resize((rw, rh), Image.BICUBIC), dtype=np.float32)
    gh, gw = grid[0, 1:].tolist()
    restored = pixel_values.view(gh, gw, 3, p, p).permute(2, 0, 3, 1, 4).reshape(3, gh * p, gw * p)
    assert torch.all(restored[:, rh:, :] == -1) and torch.all(restored[:, :, rw:] == -1)
    levels = (restored[:, :rh, :rw] * 127.5 + 127.5).permute(1, 2, 0)
    assert (levels - torch.from_numpy(expected)).abs().max() <= 1.0 + 1e-4


def test_target_size_never_enlarges_and_keeps_the_patch_budget():
    proc = ImageProcessor()
    assert proc.target_size(28, 56) == ((28, 56), (28, 56))
    assert proc.target_size(10, 10) == ((10, 10), (28, 28))
    (h, w), _ = proc.target_size(4000, 3000)
    # Kimi-K2.5 counts whole patches (floors) before scaling: the budget holds to a fraction of a percent.
    assert (h // 14) * (w // 14) <= 16384 * 1.01 and abs(h / w - 4 / 3) < 0.01
    assert proc.placeholders([1, 4, 6]) == 6


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def huge_png_header(w: int = 20000, h: int = 20000) -> bytes:
    """A few hundred bytes claiming a w x h RGB image (a decompression bomb's header)."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


HOSTILE = {
    "truncated_png": (lambda: encoded(drawn(40, 30))[:-30], "truncated or corrupt"),
    "png_20000x20000_header": (huge_png_header, "decompression bomb"),
    "png_8000x8000_header": (lambda: huge_png_header(8000, 8000), "8000x8000 = 64,000,000 pixels"),
    "non_image_bytes": (lambda: b"definitely not an image", "not a PNG, JPEG or WebP image"),
    "gif": (lambda: encoded(drawn(8, 8), "GIF"), "not a PNG, JPEG or WebP image"),
    "empty": (lambda: b"", "not a PNG, JPEG or WebP image"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_bytes_are_one_clear_value_error(name):
    make, reason = HOSTILE[name]
    with pytest.raises(ValueError, match=reason):
        decode_image(make())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_decode(fmt):
    from PIL import features

    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP codec")
    image = decode_image(encoded(drawn(21, 13), fmt))
    assert image.size == (21, 13)


def test_data_urls_decode_within_their_size_cap():
    data = encoded(drawn(20, 10))
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert load_image_url(url).size == (20, 10)
    with pytest.raises(ValueError, match="expected an image of at most 100"):
        load_image_url(url, limits=ImageLimits(max_bytes=100))
    with pytest.raises(ValueError, match="not valid base64"):
        load_image_url("data:image/png;base64,@@@@")
    with pytest.raises(ValueError, match="media type 'image/gif'"):
        load_image_url("data:image/gif;base64,R0lGODlh")


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://example.com/cat.png"])
def test_http_urls_are_never_fetched(url):
    with pytest.raises(ValueError, match="never fetched"):
        load_image_url(url, allowed_dir="/")


def test_file_urls_only_inside_the_allowed_folder(tmp_path):
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(encoded(drawn(12, 12)))
    (tmp_path / "secret.png").write_bytes(encoded(drawn(12, 12)))
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    assert load_image_url(f"file://{allowed}/a.png", allowed_dir=allowed).size == (12, 12)
    for url in (f"file://{tmp_path}/secret.png", f"file://{allowed}/../secret.png", f"file://{allowed}/link.png"):
        with pytest.raises(ValueError, match="outside the allowed image folder"):
            load_image_url(url, allowed_dir=allowed)
    with pytest.raises(ValueError, match="no allowed image folder"):
        load_image_url(f"file://{allowed}/a.png")
    with pytest.raises(ValueError, match="names no file"):
        load_image_url(f"file://{allowed}/missing.png", allowed_dir=allowed)
    with pytest.raises(ValueError, match=r"a\.txt: not a PNG"):
        (allowed / "a.txt").write_text("hello")
        load_image_file(allowed / "a.txt")
