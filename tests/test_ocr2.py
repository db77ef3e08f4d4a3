"""DeepSeek-OCR-2 (transformers `deepseek_ocr2`): SAM + the query encoder + projector in front of the multi-head
DeepSeek-V2 MoE. Folders transformers writes load with its logits (fp32, images with local crops included), ours
load back in transformers with the same logits, greedy decoding with an image equals its generate, and the
preprocessing equals its image processor's."""

import json

import pytest
import torch

import seekmoe
from hf_oracle import rel_error

pytest.importorskip("transformers")
TOL = 2e-4
IMAGE_TOKEN = 95
# patch 4 keeps the views small: a 208-pixel global view is a 52x52 SAM grid, 13x13 after the convolutions (> 144:
# the 256 queries of a 1024-pixel view), a 128-pixel tile 8x8 (the 144 queries of a 768-pixel tile).
GLOBAL, TILE = 208, 128


def hf_config(**text_overrides):
    from transformers import DeepseekOcr2Config

    text = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                mlp_layer_types=["dense", "sparse"], max_position_embeddings=2048, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    text.update(text_overrides)
    sam = dict(hidden_size=16, output_channels=12, num_hidden_layers=2, num_attention_heads=2, image_size=GLOBAL,
               patch_size=4, window_size=7, global_attn_indexes=[1], downsample_channels=[20, 24])
    encoder = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = DeepseekOcr2Config(text_config=text, vision_config=dict(sam_config=sam, encoder_config=encoder),
                                image_token_id=IMAGE_TOKEN)
    config._attn_implementation = "eager"
    return config


def hf_model(config=None, seed=0):
    """transformers' DeepseekOcr2ForConditionalGeneration with every weight random (its own init leaves SAM ~0)."""
    from transformers import DeepseekOcr2ForConditionalGeneration

    torch.manual_seed(seed)
    model = DeepseekOcr2ForConditionalGeneration(config or hf_config()).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1 or "rel_pos" in name or "pos_embed" in name or "query_" in name:
                p.normal_(0, 0.2 if p.dim() == 1 else 0.5)
            else:
                p.normal_(0, p[0].numel() ** -0.5)
    return model


def images(seed=1):
    """Two images: the first with two local crops, the second with one."""
    g = torch.Generator().manual_seed(seed)
    return dict(pixel_values=torch.randn(2, 3, GLOBAL, GLOBAL, generator=g),
                pixel_values_local=torch.randn(3, 3, TILE, TILE, generator=g),
                num_local_patches=torch.tensor([2, 1]))


def prompt_ids(n_tokens_per_image, seed=2):
    """[2, S]: each row text, its image's placeholders, text (rows padded by text to one length)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    longest = max(n_tokens_per_image)
    for n in n_tokens_per_image:
        before = torch.randint(0, IMAGE_TOKEN, (3,), generator=g)
        after = torch.randint(0, IMAGE_TOKEN, (5 + longest - n,), generator=g)
        rows.append(torch.cat([before, torch.full((n,), IMAGE_TOKEN), after]))
    return torch.stack(rows)


def n_tokens(config):
    from seekmoe.vision.ocr2_config import Ocr2Config  # noqa: F401  (the arithmetic under test below)

    return [256 + 2 * 144 + 1, 256 + 144 + 1]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ocr2")
    ref = hf_model()
    ref.save_pretrained(path)
    return path, ref


def test_transformers_folder_loads_with_equal_logits(hf_folder):
    path, ref = hf_folder
    ours = seekmoe.from_pretrained(path, dtype=torch.float32)
    assert type(ours).__name__ == "Ocr2Model" and not ours.config.text_config.use_mla
    counts = [ours.config.image_tokens(GLOBAL, TILE, n) for n in (2, 1)]
    assert counts == n_tokens(None)
    ids, pix = prompt_ids(counts), images()
    with torch.no_grad():
        want = ref(input_ids=ids, **pix).logits
        got = ours(ids, **pix).logits
    err = rel_error(got, want)
    print(f"largest relative logit error [transformers -> seekmoe, with images]: {err:.2e}")
    assert err < TOL
