"""Untrusted image bytes and URLs -> Pillow images, or one ValueError saying why not.

Only PNG, JPEG and WebP are decoded (told by their magic bytes, then by Pillow restricted to those formats); the
pixel count in the header is held to `max_pixels` before a single pixel is decoded (a 20000 x 20000 PNG of a few
KB never allocates its 1.2 GB), and a truncated or corrupt file is an error, not a half-grey image. URLs are
OpenAI-style image parts: `data:image/...;base64,...` (size-capped before decoding), `file://` only inside an
allowed folder (symlinks resolved), and http(s) never fetched: a server must not be made to reach other hosts.

Who calls it: the SFT data reader (posttrain/sft_data.py), `seekmoe generate --image`, the server's chat handler.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

FORMATS = ("PNG", "JPEG", "WEBP")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))
_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?((?:;[^,;]*)*?);base64,", re.I)
_MIME = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}


@dataclass(frozen=True)
class ImageLimits:
    """What an untrusted image may cost: encoded bytes and decoded pixels (width x height). The defaults admit a
    7168 x 7168 photo (Kimi-K2.5's largest before it shrinks one) and nothing near a decompression bomb."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 7168 * 7168


def image_format(data: bytes) -> str:
    """'PNG', 'JPEG' or 'WEBP' from the first bytes of `data`; ValueError for anything else."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    head = data[:8].hex(" ") if data else "nothing"
    raise ValueError(f"not a PNG, JPEG or WebP image (it starts with {head})")


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """The fully decoded RGB(A) Pillow image in `data` (PNG, JPEG or WebP), within `limits`. ValueError with the
    reason for anything else: too many bytes or pixels, another format, a truncated or corrupt file."""
    if len(data) > limits.max_bytes:
        raise ValueError(f"image is {len(data):,} bytes: expected at most {limits.max_bytes:,}")
    kind = image_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[kind])
            w, h = image.size
            if w < 1 or h < 1 or w * h > limits.max_pixels:
                raise ValueError(f"{kind} image is {w}x{h} = {w * h:,} pixels: expected at most "
                                 f"{limits.max_pixels:,} (a decompression bomb, or a photo too large to use)")
            if kind == "PNG":  # chunk CRCs up to IEND: Pillow decodes a PNG cut inside its last chunk silently
                Image.open(io.BytesIO(data), formats=[kind]).verify()
            image.load()  # decode now: a truncated file fails here, not later inside preprocessing
    except ValueError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # Pillow's own guard, at open
        raise ValueError(f"{kind} image refused as a decompression bomb ({str(e)[:160]}): expected at most "
                         f"{limits.max_pixels:,} pixels") from None
    except (OSError, SyntaxError, EOFError, MemoryError) as e:
        raise ValueError(f"{kind} image could not be decoded ({str(e)[:120] or type(e).__name__}): truncated or "
                         f"corrupt") from None
    return image


def load_image_url(url: str, allowed_dir: str | os.PathLike | None = None,
                   limits: ImageLimits = ImageLimits()) -> Image.Image:
    """The image an OpenAI-style `image_url.url` names: a base64 data URL, or a file:// URL under `allowed_dir`
    (None: file URLs refused). http(s) URLs are never fetched. ValueError saying why for anything refused."""
    if not isinstance(url, str) or not url:
        raise ValueError("image_url.url must be a non-empty string (a data: or file:// URL)")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_image(_data_url_bytes(url, limits), limits)
    if scheme == "file":
        return decode_image(_file_url_bytes(url, allowed_dir, limits), limits)
    if scheme in ("http", "https"):
        raise ValueError(f"{scheme} image URLs are never fetched: send the image inline as a "
                         f"data:image/png;base64,... URL")
    raise ValueError(f"image URL scheme {scheme or url[:20]!r} is not supported: expected data: or file://")


def _data_url_bytes(url: str, limits: ImageLimits) -> bytes:
    m = _DATA_URL.match(url)
    if not m:
        raise ValueError("data URL is not base64 image data: expected data:image/png;base64,... (or jpeg, webp)")
    mime = (m.group(1) or "").lower()
    if mime not in _MIME:
        raise ValueError(f"data URL media type {mime or 'none'!r}: expected one of {sorted(_MIME)}")
    payload = url[m.end():]
    # Checked on the encoded text, before decoding allocates anything: 4 characters carry 3 bytes.
    if len(payload) > (limits.max_bytes + 2) // 3 * 4 + 4:
        raise ValueError(f"data URL holds about {len(payload) * 3 // 4:,} bytes: expected an image of at most "
                         f"{limits.max_bytes:,}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("data URL is not valid base64") from None


def _file_url_bytes(url: str, allowed_dir: str | os.PathLike | None, limits: ImageLimits) -> bytes:
    if allowed_dir is None:
        raise ValueError("file:// image URLs are refused here (no allowed image folder was configured)")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"file URL names host {parsed.netloc!r}: expected file:///absolute/path")
    root = Path(allowed_dir).resolve()
    path = Path(unquote(parsed.path)).resolve()  # symlinks and .. resolved before the check
    if path != root and root not in path.parents:
        raise ValueError(f"file URL {url[:200]} is outside the allowed image folder {root}")
    if not path.is_file():
        raise ValueError(f"file URL {url[:200]} names no file")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ValueError(f"image file {path} is {size:,} bytes: expected at most {limits.max_bytes:,}")
    with open(path, "rb") as f:
        return f.read(limits.max_bytes + 1)


def load_image_file(path: str | os.PathLike, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """The image in a local file the user named (a command-line argument): same format and size checks."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    if path.stat().st_size > limits.max_bytes:
        raise ValueError(f"image file {path} is {path.stat().st_size:,} bytes: expected at most {limits.max_bytes:,}")
    try:
        return decode_image(path.read_bytes(), limits)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
