"""`make demo-vision` at a toy size: the before/after table, results.json, and `seekmoe analyze`'s per-modality
report of the grown vision-language model on the held-out pictures' chats."""

import json

import pytest
import torch

pytest.importorskip("PIL")

from seekmoe import from_pretrained  # noqa: E402
from seekmoe.analysis.sources import load_image_chats  # noqa: E402
from seekmoe.inference.tokenizer import Tokenizer  # noqa: E402
from seekmoe.vision import demo  # noqa: E402


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-vision")
    assert demo.main(["--out", str(out), "--scenes", "6", "--held-out", "2", "--text-steps", "2", "--align-steps",
                      "1", "--full-steps", "1", "--batch-size", "2"]) == 0
    return out


def test_demo_writes_table_and_modality_analysis(demo_out, capsys):
    results = json.loads((demo_out / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == ["text model + fresh tower (before)", "after align (projector)",
                                                     "after align + full"]
    for row in results["rows"]:
        assert all(0.0 <= row[k] <= 1.0 for k in ("all", "count", "position", "colour") if row[k] == row[k])
    assert results["held_out_questions"] == 6
    table = demo.table([(r["model"], r) for r in results["rows"]])
    assert table.splitlines()[0].startswith("| model | held-out accuracy |") and len(table.splitlines()) == 5

    analysis = json.loads((demo_out / "analysis" / "analysis.json").read_text())
    modality = analysis["modality"]
    vlm = from_pretrained(demo_out / "full" / "final", dtype=torch.float32)
    assert modality["image_token_id"] == vlm.config.image_token_id == vlm.config.text_config.media_placeholder_token_id
    # 84 x 84 pictures: 6 x 6 patches merged 2 x 2, 9 image tokens per question
    assert modality["tokens"]["image"] == 9 * 6 and modality["tokens"]["text"] > 0
    for layer in modality["layers"]:
        assert set(layer["load"]) == {"image", "text"}
        assert abs(sum(layer["load"]["image"]) - 1) < 1e-6 and abs(sum(layer["load"]["text"]) - 1) < 1e-6
    assert (demo_out / "analysis" / "report.html").is_file()
    pytest.importorskip("matplotlib")
    assert (demo_out / "modality.png").stat().st_size > 0


def test_image_chats_batches_match_one_chat_at_a_time(demo_out):
    """analyze batches chats of equal length with their pictures: each row's logits are its chat's alone."""
    folder = demo_out / "full" / "final"
    model = from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = Tokenizer(folder, model.config.bos_token_id, model.config.eos_token_id)
    chats = load_image_chats(demo_out / "data" / "held-out" / "data.jsonl", tokenizer, model.config, 10 ** 6)
    assert len(chats.rows) == 6 and chats.tokens == sum(len(ids) for ids, _, _ in chats.rows)
    seen = 0
    with torch.no_grad():
        for ids, inputs in chats.batches(4):
            got = model(ids, **inputs).logits
            for b in range(ids.shape[0]):
                row = next(r for r in chats.rows if len(r[0]) == ids.shape[1] and torch.equal(r[0], ids[b]))
                alone = model(row[0][None], pixel_values=row[1], image_grid_thw=row[2]).logits[0]
                torch.testing.assert_close(got[b], alone, rtol=1e-4, atol=1e-5)
                seen += 1
    assert seen == 6
