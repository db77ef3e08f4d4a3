"""Images through the inference engine: a prompt with images decodes as the full vision-language forward predicts
(greedy, token by token), chunked prefill included; mismatched or unwanted images are one clear error."""

from __future__ import annotations

import pytest
import torch

from seekmoe import ModelConfig
from seekmoe.inference.engine import Engine, Request
from seekmoe.inference.sampling import SamplingParams
from seekmoe.vision import VisionConfig, VisionLanguageConfig, VisionLanguageModel


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    text = ModelConfig.preset("tiny", num_nextn_predict_layers=0)
    config = VisionLanguageConfig(text, VisionConfig.preset("tiny"), image_token_id=text.vocab_size)
    model = VisionLanguageModel(config).eval()
    with torch.no_grad():  # a visible image: the projector's output at the scale of the token embeddings and more
        model.mm_projector.proj[2].weight.mul_(50)
    return model


def prompt_with_images(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 4, 2], [1, 2, 2]])
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 3, 14, 14, generator=g)
    img = model.config.image_token_id
    ids = [1, 5, 9] + [img] * 2 + [7, 3] + [img] + torch.randint(2, 200, (4,), generator=g).tolist()
    return ids, pixel_values, grid


def greedy_reference(model, ids, pixel_values, grid, n: int) -> list[int]:
    """n greedy tokens from full forwards (no cache) of the vision-language model."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids + out])
            out.append(int(model(x, pixel_values=pixel_values, image_grid_thw=grid).logits[0, -1].argmax()))
    return out


def run(engine: Engine, request: Request) -> Request:
    engine.add(request)
    while not request.done:
        engine.step()
    return request


@pytest.mark.parametrize("chunk", [64, 3], ids=["one_prefill", "chunked_prefill"])
def test_engine_with_images_decodes_as_the_full_forward(vlm, chunk):
    """Images enter at prefill only (chunked: their features split across chunks); decoding is the text path."""
    ids, pixel_values, grid = prompt_with_images(vlm)
    engine = Engine(vlm, max_batch_size=2, max_seq_len=32, max_prefill_tokens=chunk)
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    r = run(engine, Request(ids, greedy, pixel_values=pixel_values, image_grid_thw=grid))
    assert r.output_ids == greedy_reference(vlm, ids, pixel_values, grid, 4)
    # A repetition penalty skips the placeholder id (past the vocabulary); a text request shares the engine.
    penalized = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True, repetition_penalty=1.3)
    assert run(engine, Request(ids, penalized, pixel_values=pixel_values, image_grid_thw=grid)).finish_reason == \
        "length"
    assert run(engine, Request(ids[:3], greedy)).finish_reason == "length"


def test_images_must_match_their_placeholders(vlm):
    ids, pixel_values, grid = prompt_with_images(vlm)
    engine = Engine(vlm, max_batch_size=1, max_seq_len=64)
    with pytest.raises(ValueError, match="make 3 tokens but the prompt holds 2"):
        engine.add(Request(ids[:7] + ids[8:], SamplingParams(), pixel_values=pixel_values, image_grid_thw=grid))
    with pytest.raises(ValueError, match="is the image placeholder but the prompt comes with no images"):
        engine.add(Request(ids, SamplingParams()))
    assert engine.has_capacity  # nothing was taken


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    """A tiny vision-language folder (fresh tiny tower on a tiny text model) with its tokenizer, and a PNG."""
    import shutil

    from PIL import Image

    from seekmoe.posttrain.demo import make_base_model
    from seekmoe.vision.sft import attach_vision_tower

    root = tmp_path_factory.mktemp("vision_generate")
    base = make_base_model(root / "base", ["User: Which colour?\n\nAssistant: red blue"] * 10,
                           num_nextn_predict_layers=0)
    folder = root / "vlm"
    attach_vision_tower(base, "tiny").save_pretrained(folder)
    for f in base.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, folder / f.name)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "red.png")
    return root


def test_generate_with_an_image(vision_folder, capsys):
    from seekmoe.cli import main

    args = ["generate", "--model", str(vision_folder / "vlm"), "--max-new-tokens", "3", "--ignore-eos"]
    assert main(args + ["--prompt", "User: <image>Which colour?\n\nAssistant:",
                        "--image", str(vision_folder / "red.png")]) == 0
    capsys.readouterr()
    (vision_folder / "broken.png").write_bytes((vision_folder / "red.png").read_bytes()[:-40])
    assert main(args + ["--prompt", "x", "--image", str(vision_folder / "broken.png")]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "truncated or corrupt" in err and "Traceback" not in err
    assert main(["generate", "--model", str(vision_folder / "base"), "--prompt", "x",
                 "--image", str(vision_folder / "red.png")]) == 2
    assert "text model (no vision tower)" in capsys.readouterr().err


def test_chat_image_command(vision_folder, capsys, monkeypatch):
    import io

    from seekmoe.cli import main

    lines = f"/image {vision_folder / 'red.png'}\nWhich colour?\n/image {vision_folder / 'nope.png'}\nAnd now?\n\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["chat", "--model", str(vision_folder / "vlm"), "--max-new-tokens", "2", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "/image: image file" in captured.err and "nope.png does not exist" in captured.err
    assert len(captured.out.splitlines()) == 2  # both messages answered
