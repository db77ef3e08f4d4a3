"""DeepSeek-OCR-2 folders beyond loading: the image processor's preprocessor_config.json read (else the defaults, said
in a log line) and written back so transformers' processor loads our folder; `seekmoe analyze` per modality on image
chats; `/image` in `seekmoe chat`; an image part in a `seekmoe serve` chat request. A folder transformers wrote, its
processor set to small views (96-pixel global views, 64-pixel tiles) so that everything stays quick."""

import base64
import io
import json
import logging
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

import seekmoe  # noqa: E402
from seekmoe.vision.ocr2_checkpoint import DefaultPreprocessingWarning  # noqa: E402
from test_ocr2 import IMAGE_TOKEN, hf_model  # noqa: E402

MEAN, STD = [0.4, 0.5, 0.6], [0.3, 0.5, 0.7]  # not transformers' defaults: a file read is a file used
# A picture within one 64-pixel tile: no crops, the 96-pixel global view's 144 query features and the separator.
PLACEHOLDERS = 144 + 1


def transformers_processor(**overrides):
    from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil

    return DeepseekOcr2ImageProcessorPil(**{"size": {"height": 96, "width": 96}, "tile_size": 64,
                                            "image_mean": MEAN, "image_std": STD, **overrides})


def picture(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from seekmoe.data import train_tokenizer
    from seekmoe.inference.tokenizer import write_tokenizer_files

    root = tmp_path_factory.mktemp("ocr2cli")
    hf_model().save_pretrained(root / "ocr2")
    transformers_processor().save_pretrained(root / "ocr2")
    texts = ["User: What does the page say?\n\nAssistant: 12 apples and 3 pears."] * 10
    write_tokenizer_files(train_tokenizer(texts, IMAGE_TOKEN), root / "ocr2", 2048)
    picture(30, 40).save(root / "page.png")
    return root


def test_preprocessor_config_is_read_and_written_back_for_transformers(folder, tmp_path, caplog):
    from transformers import AutoImageProcessor

    from seekmoe.vision.ocr2_model import pack_views

    with caplog.at_level(logging.INFO, logger="seekmoe.vision.ocr2_checkpoint"):
        ours = seekmoe.from_pretrained(folder / "ocr2", dtype=torch.float32)
    assert "preprocessor_config.json: DeepSeek-OCR-2 preprocessing: global views 96px, tiles 64px" in caplog.text
    settings = ours.config.processor
    assert (settings.image_size, settings.tile_size, list(settings.image_mean)) == (96, 64, MEAN)
    pictures = [picture(50, 150, seed=1), picture(40, 30, seed=2)]  # three crops and a global view; a global view
    want = transformers_processor()(pictures, return_tensors="pt")
    flat, layout = ours.config.image_processor()(pictures)
    expected = pack_views(want["pixel_values"], want["pixel_values_local"], want["num_local_patches"])
    assert layout.tolist() == expected[1].tolist() == [[3, 96, 64], [0, 96, 0]]
    assert (flat - expected[0]).abs().max() < 1e-5

    ours.save_pretrained(tmp_path / "saved")
    theirs = AutoImageProcessor.from_pretrained(tmp_path / "saved")
    assert (theirs.tile_size, list(theirs.image_std)) == (64, STD)
    again = theirs(pictures, return_tensors="pt")
    assert all(torch.equal(again[k], want[k]) for k in ("pixel_values", "pixel_values_local", "num_local_patches"))

    (tmp_path / "saved" / "preprocessor_config.json").unlink()  # a folder without one: the defaults, said so
    with pytest.warns(DefaultPreprocessingWarning, match=r"no preprocessor_config.json: default DeepSeek-OCR-2 "
                      r"preprocessing \(global views 208px, tiles 156px"):
        bare = seekmoe.from_pretrained(tmp_path / "saved", device="meta")
    assert (bare.config.processor.image_size, bare.config.processor.tile_size) == (208, 156)
    for key, value, match in (("tile_size", 0, "tile_size=0"), ("resample", 2, "resample=2: expected 3"),
                              ("size", {"height": 96, "width": 64}, "square global views"),
                              ("image_std", [0.5, 0, 0.5], "image_std")):
        (tmp_path / "saved" / "preprocessor_config.json").write_text(json.dumps({key: value}))
        with pytest.raises(ValueError, match=match):
            seekmoe.from_pretrained(tmp_path / "saved", device="meta")


def test_analyze_reports_routing_per_modality_on_image_chats(folder, tmp_path, capsys):
    from seekmoe.cli import main

    chats = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                         {"type": "text", "text": "What does the page say?"}]},
                          {"role": "assistant", "content": "12 apples."}]}
            for url in ("file://" + str(tmp_path / "page.png"), data_url(folder / "page.png"))]
    shutil.copy(folder / "page.png", tmp_path / "page.png")
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["analyze", "--model", str(folder / "ocr2"), "--data", str(chats), "--out", str(out),
                 "--no-progress"]) == 0
    assert f"{2 * PLACEHOLDERS} image and" in capsys.readouterr().out
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["probes"]["tokens"] > 2 * PLACEHOLDERS  # the ablation probes ran on the chats, pictures included
    modality = analysis["modality"]
    assert modality["image_token_id"] == IMAGE_TOKEN and modality["tokens"]["image"] == 2 * PLACEHOLDERS
    (layer,) = modality["layers"]  # the tiny model's one MoE layer
    assert abs(sum(layer["load"]["image"]) - 1) < 1e-6 and abs(sum(layer["load"]["text"]) - 1) < 1e-6
    assert "Image token id" in (out / "report.html").read_text()


def test_analyzed_chats_batched_equal_each_chat_given_transformers_inputs(folder, tmp_path):
    """analyze batches chats of equal length with their images packed (image_grid_thw); each row's logits are
    those of its chat alone, its image as transformers' processor passes it."""
    from seekmoe.analysis.sources import load_image_chats
    from seekmoe.inference.tokenizer import Tokenizer

    model = seekmoe.from_pretrained(folder / "ocr2", dtype=torch.float32)
    pictures = [picture(30, 40, seed=3), picture(64, 20, seed=4)]  # within a tile: equal placeholder counts
    for i, p in enumerate(pictures):
        p.save(tmp_path / f"{i}.png")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(tmp_path / f"{i}.png")}}]},
        {"role": "assistant", "content": "apples"}]}) + "\n" for i in range(2)))
    tokenizer = Tokenizer(folder / "ocr2", model.config.bos_token_id, model.config.eos_token_id)
    ((ids, inputs),) = load_image_chats(chats, tokenizer, model.config, 10 ** 6).batches(2)
    assert ids.shape[0] == 2 and (ids == IMAGE_TOKEN).sum(1).tolist() == [PLACEHOLDERS] * 2
    with torch.no_grad():
        got = model(ids, **inputs).logits
        for b, p in enumerate(pictures):
            theirs = transformers_processor()([p], return_tensors="pt")
            want = model(ids[b:b + 1], pixel_values=theirs["pixel_values"],
                         num_local_patches=theirs["num_local_patches"]).logits[0]
            torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-5)
    assert (got[0] - got[1]).abs().max() > 1e-3  # the two pictures make different logits


def test_chat_image_command_on_an_ocr2_folder(folder, capsys, monkeypatch):
    from seekmoe.cli import main
    from seekmoe.inference import Engine

    seen = []
    stream = Engine.stream

    def spy(self, ids, params, **images):  # what the chat hands the engine
        seen.append((ids, images))
        return stream(self, ids, params, **images)

    monkeypatch.setattr(Engine, "stream", spy)
    lines = f"/image {folder / 'page.png'}\nWhat does the page say?\nAnd then?\n\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["chat", "--model", str(folder / "ocr2"), "--max-new-tokens", "2", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2 and not captured.err  # both messages answered
    for ids, images in seen:  # the image stays in the conversation: its placeholders and views each turn
        assert ids.count(IMAGE_TOKEN) == PLACEHOLDERS and images["image_grid_thw"].tolist() == [[0, 96, 0]]


def test_serve_answers_a_chat_with_an_image_part_on_an_ocr2_folder(folder):
    from seekmoe.inference import Engine
    from test_server import KEY, raw, start, stop

    engine = Engine.from_pretrained(folder / "ocr2", max_batch_size=2, max_seq_len=512)
    server, thread = start(engine, api_key=KEY)
    try:
        content = [{"type": "text", "text": "What does the page say?"},
                   {"type": "image_url", "image_url": {"url": data_url(folder / "page.png")}}]
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 3,
                "temperature": 0}
        status, answer = raw(server, "POST", "/v1/chat/completions", body)
        assert status == 200, answer
        assert answer["usage"]["prompt_tokens"] > PLACEHOLDERS  # the image's placeholders count in the prompt
        status, answer = raw(server, "POST", "/v1/chat/completions", {**body, "max_tokens": 500})
        assert status == 400 and "context" in answer["error"]["message"], answer  # image tokens fill the context
        assert raw(server, "GET", "/health")[0] == 200
    finally:
        stop(server, thread)
