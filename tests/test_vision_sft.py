"""`seekmoe sft --vision-tower`: chats with image parts rendered with their placeholders (never trained), LLaVA's
stages training only what they say, and a vision-language final/ that loads back."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

import seekmoe
from seekmoe.cli import main
from seekmoe.inference.tokenizer import Tokenizer
from seekmoe.posttrain.demo import make_base_model
from seekmoe.posttrain.sft_data import IGNORE
from seekmoe.vision.config import VisionConfig, VisionLanguageConfig
from seekmoe.vision.preprocess import ImageProcessor
from seekmoe.vision.sft import render_vision_example

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
RUN = ["--no-progress", "seq_len=96", "batch_size=2", "eval_every=2", "num_threads=1", "warmup_steps=1", "lr=1e-2"]


def data_url(rgb, size=(28, 42)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def colour_record(name: str) -> dict:
    parts = [{"type": "text", "text": "Which colour?"},
             {"type": "image_url", "image_url": {"url": data_url(COLOURS[name])}}]
    return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": name}]}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """A tiny text model (with one MTP layer) and a JSONL of 'which colour?' chats about single-colour images."""
    folder = tmp_path_factory.mktemp("vision_sft")
    base = make_base_model(folder / "base", ["User: Which colour?\n\nAssistant: red blue green"] * 20)
    (folder / "train.jsonl").write_text("".join(json.dumps(colour_record(c)) + "\n" for c in list(COLOURS) * 4))
    return folder, base


def test_image_placeholders_sit_in_the_prompt_and_are_never_labelled(colours):
    folder, base = colours
    config = seekmoe.ModelConfig.from_json_file(base)
    tokenizer = Tokenizer(base, config.bos_token_id, config.eos_token_id)
    vlm = VisionLanguageConfig(config, VisionConfig.preset("tiny"), image_token_id=config.vocab_size)
    processor = ImageProcessor()
    record = colour_record("red")
    record["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": data_url((1, 2, 3), (60, 30))}})
    ex = render_vision_example(record, tokenizer, vlm, processor)
    expected = [processor.placeholders(g) for g in ex.image_grid_thw.tolist()]
    assert expected == [2, 6]  # 28 wide x 42 high -> a 4x2 patch grid (padded), 60x30 -> 4x6; 2x2 merged
    image_at = [i for i, t in enumerate(ex.ids) if t == vlm.image_token_id]
    assert len(image_at) == sum(expected) and ex.pixel_values.shape[0] == 4 * sum(expected)
    assert all(ex.labels[i] == IGNORE for i in image_at)
    trained = [t for t in ex.labels if t != IGNORE]
    assert tokenizer.decode(trained[:-1]).strip() == "red" and trained[-1] == tokenizer.eos_token_id


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_align_then_full_train_only_their_parts_and_save_a_vision_folder(colours, tmp_path, monkeypatch):
    monkeypatch.setattr("seekmoe.train.trainer.plot_run", lambda out: [])  # matplotlib: most of the time, not tested
    folder, base = colours
    data = str(folder / "train.jsonl")
    assert main(["sft", "--model", str(base), "--data", data, "--out", str(tmp_path / "align"), "--vision-tower",
                 "tiny", "--stage", "align", "--max-steps", "2", *RUN]) == 0
    aligned = seekmoe.from_pretrained(tmp_path / "align" / "final")
    text = seekmoe.from_pretrained(base)
    for key, value in text.state_dict().items():  # the language model (router biases included) is untouched
        assert torch.equal(aligned.language_model.state_dict()[key], value), key
    assert aligned.config.image_token_id == text.config.vocab_size

    before = _weights(aligned)
    assert main(["sft", "--model", str(tmp_path / "align" / "final"), "--data", data, "--out", str(tmp_path / "full"),
                 "--max-steps", "2", *RUN]) == 0
    full = seekmoe.from_pretrained(tmp_path / "full" / "final")
    after = full.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"language_model", "mm_projector"}  # the tower stays frozen by default
    metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] == m["loss"] for m in metrics if "loss" in m)  # finite (no NaN)


def test_hostile_images_in_the_data_are_one_line_and_exit_2(colours, tmp_path, capsys):
    folder, base = colours
    record = colour_record("red")
    record["messages"][0]["content"][1]["image_url"]["url"] = "https://example.com/cat.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record) + "\n")
    assert main(["sft", "--model", str(base), "--data", str(bad), "--out", str(tmp_path / "out"), "--vision-tower",
                 "tiny", "--max-steps", "1", *RUN]) == 2
    err = capsys.readouterr().err
    assert "never fetched" in err and "Traceback" not in err
    assert main(["sft", "--model", str(base), "--data", str(bad), "--out", str(tmp_path / "out2"), "--vision-tower",
                 "huge", "--max-steps", "1", *RUN]) == 2
    assert "expected small or tiny" in capsys.readouterr().err


def test_a_stopped_vision_run_resumes_exactly(colours, tmp_path, monkeypatch):
    from conftest import assert_resume_is_exact

    monkeypatch.setattr("seekmoe.train.trainer.plot_run", lambda out: [])
    folder, base = colours
    args = ["sft", "--model", str(base), "--data", str(folder / "train.jsonl"), "--vision-tower", "tiny",
            "--max-steps", "2", *RUN, "save_every=1"]
    assert_resume_is_exact(main, args, tmp_path, stop_at=1)


def test_a_fresh_tower_enters_at_the_text_embeddings_scale_and_keeps_its_output_norm_on_disk(colours, tmp_path):
    """A preset tower's projector ends in an RMSNorm whose gain is the text embeddings' RMS, so image tokens start
    at the scale of the tokens around them; the field and the gain survive save and load."""
    from seekmoe.vision.sft import attach_vision_tower

    _, base = colours
    vlm = attach_vision_tower(base, "tiny").eval()
    assert vlm.config.projection_output_norm
    table = vlm.language_model.model.embed_tokens.weight
    pixel_values, grid = ImageProcessor()([Image.new("RGB", (56, 28), (200, 40, 40))])
    with torch.no_grad():
        features = vlm.image_features(pixel_values, grid)  # [2, hidden]
    assert torch.allclose(features.pow(2).mean(-1).sqrt(), table.pow(2).mean().sqrt().expand(2), rtol=0.02)  # eps

    vlm.save_pretrained(tmp_path / "grown")
    assert json.loads((tmp_path / "grown" / "config.json").read_text())["projection_output_norm"] is True
    back = seekmoe.from_pretrained(tmp_path / "grown", dtype=torch.float32)
    assert back.config.projection_output_norm
    assert torch.equal(back.mm_projector.post_norm.weight, vlm.mm_projector.post_norm.weight)
    with torch.no_grad():
        assert torch.equal(back.image_features(pixel_values, grid), features)


def test_projection_output_norm_must_be_a_boolean():
    config = seekmoe.ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="projection_output_norm='yes': expected true or false"):
        VisionLanguageConfig(config, VisionConfig.preset("tiny"), projection_output_norm="yes")
