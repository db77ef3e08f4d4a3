"""The vision-language model equals transformers' Kimi_K25ForConditionalGeneration on tiny random folders (fp32),
and what it saves transformers loads with the same logits."""

import re

import pytest
import torch

import seekmoe
from hf_oracle import hf_config, rel_error

pytest.importorskip("transformers")
TOL = 2e-4
IMAGE_TOKEN = 96  # inside the tiny text vocabulary (97), as Kimi-K2.5's placeholder is inside its own
VISION = dict(patch_size=4, pos_emb_height=6, pos_emb_width=6, pos_emb_time=4, num_attention_heads=2,
              num_hidden_layers=2, hidden_size=16, intermediate_size=24, merge_kernel_size=[2, 2])


def hf_kimi_k25(tie: bool = False, seed: int = 0):
    """A random tiny Kimi_K25ForConditionalGeneration (fp32, eager), with nonzero biases, LayerNorm affines, position
    grid and V3 selection bias so that every term is exercised."""
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    config = Kimi_K25Config(text_config=hf_config("deepseek_v3").to_dict(), vision_config=dict(VISION),
                            projection_hidden_size=VISION["hidden_size"], image_token_id=IMAGE_TOKEN,
                            tie_word_embeddings=tie)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Kimi_K25ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias") or "position_embeddings" in name:
                p.copy_(0.5 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.05)
    return model


def vision_inputs(grid: list[list[int]], text: int = 10, seed: int = 1):
    """input_ids [1, S] with each image's placeholders in a run after some text, pixel_values and image_grid_thw."""
    g = torch.Generator().manual_seed(seed)
    grid_thw = torch.tensor(grid)
    p = VISION["patch_size"]
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), 3, p, p, generator=g)
    pieces = []
    for t, h, w in grid:
        pieces += [torch.randint(0, IMAGE_TOKEN, (3,), generator=g), torch.full((t * h * w // 4,), IMAGE_TOKEN)]
    pieces.append(torch.randint(0, IMAGE_TOKEN, (text,), generator=g))
    return torch.cat(pieces)[None], pixel_values, grid_thw


# 4x6 and 8x8 resample the 6x6 position grid (down and up), 6x6 uses it as it is.
GRIDS = [[1, 4, 6], [1, 8, 8], [1, 6, 6]]


@pytest.mark.parametrize("tie", [False, True], ids=["separate_head", "tied_head"])
def test_kimi_k25_folder_logits_match_transformers(tie, tmp_path):
    ref_model = hf_kimi_k25(tie=tie)
    ref_model.save_pretrained(tmp_path)
    ours = seekmoe.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(ours).__name__ == "VisionLanguageModel"
    ids, pixel_values, grid = vision_inputs(GRIDS)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid).logits
        got = ours(ids, pixel_values=pixel_values, image_grid_thw=grid).logits
    err = rel_error(got, ref)
    print(f"largest relative logit error [kimi_k25 {'tied' if tie else 'untied'}]: {err:.2e}")
    assert err < TOL


def test_saved_folder_loads_in_transformers_with_the_same_logits(tmp_path):
    from transformers import Kimi_K25ForConditionalGeneration

    ref_model = hf_kimi_k25(seed=3)
    ref_model.save_pretrained(tmp_path / "hf")
    ours = seekmoe.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ours.save_pretrained(tmp_path / "ours")
    assert "projection_output_norm" not in (tmp_path / "ours" / "config.json").read_text()  # seekmoe's own towers'
    back = Kimi_K25ForConditionalGeneration.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids, pixel_values, grid = vision_inputs([[1, 2, 4], [1, 6, 6]], seed=4)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid).logits
        got = back(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid).logits
        again = seekmoe.from_pretrained(tmp_path / "ours")(ids, pixel_values=pixel_values, image_grid_thw=grid).logits
    assert rel_error(got, ref) < TOL
    assert rel_error(again, ref) < TOL
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    sharded = Kimi_K25ForConditionalGeneration.from_pretrained(tmp_path / "sharded", attn_implementation="eager")
    with torch.no_grad():
        assert rel_error(sharded.eval()(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid).logits,
                         ref) < TOL


def test_text_only_input_runs_the_language_model_alone(tmp_path):
    ref_model = hf_kimi_k25()
    ref_model.save_pretrained(tmp_path)
    ours = seekmoe.from_pretrained(tmp_path)
    ids = torch.randint(0, IMAGE_TOKEN, (2, 12))
    with torch.no_grad():
        assert rel_error(ours(ids).logits, ref_model(input_ids=ids).logits) < TOL
        assert torch.equal(ours(ids).logits, ours.language_model(ids).logits)


def test_placeholders_and_image_tokens_must_agree_in_number(tmp_path):
    hf_kimi_k25().save_pretrained(tmp_path)
    ours = seekmoe.from_pretrained(tmp_path)
    ids, pixel_values, grid = vision_inputs([[1, 4, 4]])
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[(ids[0] == IMAGE_TOKEN).nonzero()[0]] = False  # one placeholder fewer than the image's 4 tokens
    with pytest.raises(ValueError, match="4 tokens but input_ids hold 3 image placeholders"):
        ours(ids[:, keep], pixel_values=pixel_values, image_grid_thw=grid)
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(ids)
    with pytest.raises(ValueError, match="image_grid_thw describes 16 patches but pixel_values holds 15"):
        ours(ids, pixel_values=pixel_values[:15], image_grid_thw=grid)
    with pytest.raises(ValueError, match="multiples of the merge kernel"):
        ours(ids, pixel_values=pixel_values[:15], image_grid_thw=torch.tensor([[1, 3, 5]]))


def test_placeholder_tokens_are_never_predicted(tmp_path):
    """Labels at image placeholders count as ignored: the loss equals the one with those labels set to -100."""
    hf_kimi_k25().save_pretrained(tmp_path)
    ours = seekmoe.from_pretrained(tmp_path)
    ids, pixel_values, grid = vision_inputs([[1, 4, 4]])
    masked = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    with torch.no_grad():
        a = ours(ids, pixel_values=pixel_values, image_grid_thw=grid, labels=ids).lm_loss
        b = ours(ids, pixel_values=pixel_values, image_grid_thw=grid, labels=masked).lm_loss
    assert torch.equal(a, b)


def test_inputs_embeds_equal_the_token_embedding_path(tiny_config):
    model = seekmoe.build_model(tiny_config.replace(num_nextn_predict_layers=1)).train()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 16))
    a = model(ids, labels=ids)
    b = model(ids, labels=ids, inputs_embeds=model.model.embed_tokens(ids))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(ids, inputs_embeds=torch.zeros(2, 15, tiny_config.hidden_size))


def test_info_reads_the_language_model_of_a_vision_folder(tmp_path):
    from seekmoe.model_folder import read_model_config

    hf_kimi_k25().save_pretrained(tmp_path)
    config = read_model_config(tmp_path)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (48, 3, 97)


def test_vision_config_mismatch_is_one_clear_error(tmp_path):
    import json

    hf_kimi_k25().save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["vision_config"]["intermediate_size"] = 20
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="has shape .* the model expects .* vision_config"):
        seekmoe.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"merge_kernel_size": "2x2"}, "merge_kernel_size='2x2': expected two positive integers"),
    ({"hidden_size": 15}, "head size divisible by 4"),
    ({"pos_emb_height": 10**6}, "pos_emb_height=1000000: expected an integer in"),
    ({"rope_parameters": {"rope_type": "yarn"}}, "expected {'rope_type': 'axial'"),
])
def test_hostile_vision_config_is_one_clear_error(tmp_path, change, message):
    import json

    hf_kimi_k25().save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["vision_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=re.escape(message)):
        seekmoe.from_pretrained(tmp_path)


def test_a_fresh_position_grid_is_a_sum_of_a_row_and_a_column_part_and_tells_every_cell_apart():
    from seekmoe.vision.config import VisionConfig, VisionLanguageConfig
    from seekmoe.vision.model import VisionLanguageModel
    from seekmoe.vision.tower import sincos_position_grid

    table = sincos_position_grid(16, 16, 32)  # [rows, columns, channels]
    assert table.shape == (16, 16, 32) and table.abs().max() <= 1
    rows, cols = table[..., :16], table[..., 16:]
    assert torch.equal(rows, rows[:, :1].expand_as(rows)) and torch.equal(cols, cols[:1].expand_as(cols))
    assert torch.equal(rows[:, 0], cols[0])  # the same code along either axis
    # resampled as the tower resamples it to a 6 x 6 patch grid, every cell still differs from every other
    small = torch.nn.functional.interpolate(table.permute(2, 0, 1)[None], size=(6, 6), mode="bicubic",
                                            align_corners=False)[0].flatten(1).T  # [36, 32]
    distances = torch.cdist(small, small) + torch.eye(36) * 1e9
    assert distances.min() > 1.0  # a normal(0, 0.02) grid: ~0.1

    text = seekmoe.ModelConfig.preset("tiny")
    model = VisionLanguageModel(VisionLanguageConfig(text, VisionConfig.preset("tiny")))
    assert torch.equal(model.vision_tower.patch_embed.pos_emb.weight, sincos_position_grid(16, 16, 32))
