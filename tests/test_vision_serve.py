"""`seekmoe serve` with a vision-language model: chat messages with image parts are answered as generate answers
them; hostile images (truncated, a bomb's header, not an image, too big, http, outside the allowed folder) get a 400
that says why, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import random

import pytest
from PIL import Image

from seekmoe.inference import Engine
from seekmoe.vision.images import ImageLimits
from test_server import KEY, raw, start, stop
from test_vision_images import huge_png_header
from test_vision_inference import vision_folder  # noqa: F401 (a fixture)


def png(w: int = 40, h: int = 30, rgb=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), rgb).save(buf, "PNG")
    return buf.getvalue()


def noise_png(side: int = 64) -> bytes:
    """A PNG of random pixels: it does not compress (about 12 KB)."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(0).randbytes(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(vision_folder):  # noqa: F811
    allowed = vision_folder / "allowed"
    allowed.mkdir(exist_ok=True)
    (allowed / "red.png").write_bytes(png())
    engine = Engine.from_pretrained(vision_folder / "vlm", max_batch_size=2, max_prefill_tokens=16, max_seq_len=128)
    server, thread = start(engine, api_key=KEY, allowed_image_dir=str(allowed),
                           image_limits=ImageLimits(max_bytes=4000, max_pixels=1000 * 1000))
    yield server
    stop(server, thread)


def ask(server, *parts, **fields):
    content = [{"type": "text", "text": "Which colour?"}, *parts]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 3,
            "temperature": 0, **fields}
    return raw(server, "POST", "/v1/chat/completions", body)


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_chat_with_image_parts_is_answered(server, vision_folder):  # noqa: F811
    status, answer = ask(server, image(data_url(png())))
    assert status == 200, answer
    by_file = ask(server, image(f"file://{vision_folder}/allowed/red.png"))
    assert by_file[0] == 200 and by_file[1]["choices"][0]["message"] == answer["choices"][0]["message"]
    assert answer["usage"]["prompt_tokens"] > 2  # the image's tokens count in the prompt
    status, text_only = raw(server, "POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2})
    assert status == 200, text_only


HOSTILE = {
    "truncated_png": (lambda d: data_url(png()[:-30]), "truncated or corrupt"),
    "png_20000x20000_header": (lambda d: data_url(huge_png_header()), "decompression bomb"),
    "non_image_bytes": (lambda d: "data:image/png;base64," + base64.b64encode(b"hello there").decode(),
                        "not a PNG, JPEG or WebP image"),
    "oversized_data_url": (lambda d: data_url(noise_png()), "at most 4,000"),
    "http_url": (lambda d: "http://169.254.169.254/latest/meta-data.png", "never fetched"),
    "file_outside_allowed": (lambda d: f"file://{d}/base/tokenizer.json", "outside the allowed image folder"),
}


def test_hostile_images_get_a_400_saying_why_and_the_server_keeps_serving(server, vision_folder):  # noqa: F811
    for name, (make, reason) in sorted(HOSTILE.items()):
        status, answer = ask(server, image(make(vision_folder)))
        assert status == 400, (name, answer)
        assert reason in answer["error"]["message"] and answer["error"]["param"] == "messages", name
    assert ask(server, image(data_url(png())))[0] == 200
    assert raw(server, "GET", "/health")[0] == 200
