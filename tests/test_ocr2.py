"""DeepSeek-OCR-2 (transformers `deepseek_ocr2`): SAM + the query encoder + projector in front of the multi-head
DeepSeek-V2 MoE. Folders transformers writes load with its logits (fp32, images with local crops included), ours
load back in transformers with the same logits, greedy decoding with an image equals its generate, and the
preprocessing equals its image processor's."""

import json

import numpy as np
import pytest
import torch

import seekmoe
from hf_oracle import rel_error

pytest.importorskip("transformers")
TOL = 2e-4
VOCAB = 300  # room for a byte-level tokenizer (the generate test's)
IMAGE_TOKEN = VOCAB - 1
# patch 4 keeps the views small: a 208-pixel global view is a 52x52 SAM grid, 13x13 after the convolutions (> 144:
# the 256 queries of a 1024-pixel view), a 128-pixel tile 8x8 (the 144 queries of a 768-pixel tile).
GLOBAL, TILE = 208, 128


def hf_config(**text_overrides):
    from transformers import DeepseekOcr2Config

    text = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=2,
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


def images(seed=1, side=GLOBAL, tile=TILE):
    """Two images: the first with two local crops, the second with one (views of other sizes than the config's
    resample SAM's position grid and relative positions)."""
    g = torch.Generator().manual_seed(seed)
    return dict(pixel_values=torch.randn(2, 3, side, side, generator=g),
                pixel_values_local=torch.randn(3, 3, tile, tile, generator=g),
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


# Placeholders of the two images: their crops' 144 features each, the global view's 256, one separator.
N_TOKENS = [2 * 144 + 256 + 1, 144 + 256 + 1]
# Smaller views for the slower tests: 96-pixel global views (24x24 grids: 144 queries), 64-pixel tiles.
SMALL = dict(side=96, tile=64)
N_SMALL = [3 * 144 + 1, 2 * 144 + 1]


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
    assert counts == N_TOKENS
    ids, pix = prompt_ids(counts), images()
    with torch.no_grad():
        want = ref(input_ids=ids, **pix).logits
        got = ours(ids, **pix).logits
    at_images = want[ids == IMAGE_TOKEN]
    assert (at_images - at_images.mean(0)).abs().max() > 0.1 * at_images.abs().max()  # features differ by token
    err = rel_error(got, want)
    print(f"largest relative logit error [transformers -> seekmoe, with images]: {err:.2e}")
    assert err < TOL


def test_saved_model_reloads_in_transformers_with_equal_logits(hf_folder, tmp_path):
    from transformers import DeepseekOcr2ForConditionalGeneration

    ours = seekmoe.from_pretrained(hf_folder[0], dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():  # weights of our own, so that nothing of transformers' folder is simply copied back
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "deepseek_ocr2" and saved["text_config"]["model_type"] == "deepseek_ocr2_text"
    theirs = DeepseekOcr2ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager",
                                                                  dtype=torch.float32).eval()
    ids, pix = prompt_ids(N_SMALL, seed=4), images(seed=6, **SMALL)
    with torch.no_grad():
        want = ours(ids, **pix).logits
        err = rel_error(theirs(input_ids=ids, **pix).logits, want)
        back = rel_error(seekmoe.from_pretrained(tmp_path, dtype=torch.float32)(ids, **pix).logits, want)
    print(f"largest relative logit error [seekmoe save -> transformers, with images]: {err:.2e}")
    assert err < TOL and back == 0


def test_greedy_decoding_with_an_image_equals_transformers_generate(hf_folder):
    """The engine's path: the image packed into the request's two tensors, its features computed once at add,
    scattered in the prefill; then decoding through our multi-head cache."""
    from seekmoe.inference import Engine, Request, SamplingParams
    from seekmoe.vision.ocr2_model import pack_views

    path, ref = hf_folder
    ours = seekmoe.from_pretrained(path, dtype=torch.float32)
    pix = images(seed=7, **SMALL)
    one = dict(pixel_values=pix["pixel_values"][:1], pixel_values_local=pix["pixel_values_local"][:2],
               num_local_patches=torch.tensor([2]))
    prompt = prompt_ids(N_SMALL, seed=8)[:1, :-2]
    with torch.no_grad():
        want = ref.generate(input_ids=prompt, **one, max_new_tokens=14, do_sample=False)[0, prompt.shape[1]:]
    flat, layout = pack_views(one["pixel_values"], one["pixel_values_local"], one["num_local_patches"])
    engine = Engine(ours, max_batch_size=1)
    request = engine.add(Request(prompt[0].tolist(), SamplingParams(max_new_tokens=14, temperature=0,
                                                                    ignore_eos=True),
                                 pixel_values=flat, image_grid_thw=layout))
    while not request.done:
        engine.step()
    assert request.output_ids == want.tolist()


def test_preprocessing_equals_transformers_image_processor():
    from PIL import Image
    from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil

    from seekmoe.vision.ocr2_preprocess import Ocr2ImageProcessor

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
                ((40, 150), (97, 61), (30, 30), (130, 90))]
    pictures.append(Image.fromarray(rng.integers(0, 256, (70, 50, 4), dtype=np.uint8), "RGBA"))
    theirs = DeepseekOcr2ImageProcessorPil(size={"height": 80, "width": 80}, tile_size=48)
    ours = Ocr2ImageProcessor(image_size=80, tile_size=48)
    want, got = theirs(pictures, return_tensors="pt"), ours(pictures)
    assert got["num_local_patches"].tolist() == want["num_local_patches"].tolist() == [4, 6, 0, 6, 6]
    for key in ("pixel_values", "pixel_values_local"):
        assert got[key].shape == want[key].shape
        assert (got[key] - want[key]).abs().max() < 1e-5, key


def test_default_config_builds_transformers_parameter_count():
    """transformers' default DeepseekOcr2Config, both built on the meta device. Two defaults are filled in: its
    mlp_layer_types (None: transformers cannot build the language model) and the encoder's width (4096, where SAM
    hands it 896-channel tokens: transformers builds that but cannot run it; we refuse it, naming the field)."""
    from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration

    from seekmoe.vision.ocr2_checkpoint import read_ocr2_config
    from seekmoe.vision.ocr2_model import Ocr2Model

    config = DeepseekOcr2Config()
    config.text_config.mlp_layer_types = ["dense"] + ["sparse"] * (config.text_config.num_hidden_layers - 1)
    config.text_config.num_experts_per_tok = 6
    with pytest.raises(ValueError, match=r"downsample_channels\[1\]=896: expected encoder_config.hidden_size=4096"):
        read_ocr2_config(config.to_dict(), "default")
    config.vision_config.encoder_config.hidden_size = 896
    with torch.device("meta"):
        theirs = DeepseekOcr2ForConditionalGeneration(config)
        ours = Ocr2Model(read_ocr2_config(config.to_dict(), "default"))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    vision = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("language_model."))
    assert vision == sum(p.numel() for n, p in theirs.model.named_parameters() if not n.startswith("language_model"))


def test_config_and_input_errors_name_the_value(hf_folder, tmp_path):
    from seekmoe.vision.ocr2_checkpoint import read_ocr2_config

    raw = json.loads((hf_folder[0] / "config.json").read_text())
    for section, key, value, match in (("sam_config", "hidden_act", "relu", "hidden_act"),
                                       ("sam_config", "downsample_channels", [20, 25], "downsample_channels"),
                                       ("encoder_config", "num_key_value_heads", 3, "num_key_value_heads"),
                                       ("encoder_config", "use_sliding_window", True, "use_sliding_window"),
                                       ("sam_config", "hidden_size", 1 << 20, "hidden_size")):
        bad = json.loads(json.dumps(raw))
        bad["vision_config"][section][key] = value
        with pytest.raises(ValueError, match=match):
            read_ocr2_config(bad, "config.json")
    from safetensors.torch import load_file, save_file

    state = load_file(hf_folder[0] / "model.safetensors")
    del state["model.view_seperator"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((hf_folder[0] / "config.json").read_bytes())
    with pytest.raises(ValueError, match="lacks tensors the vision config requires: model.view_seperator"):
        seekmoe.from_pretrained(tmp_path)
    ours = seekmoe.from_pretrained(hf_folder[0], dtype=torch.float32)
    ids = prompt_ids(N_SMALL)
    with pytest.raises(ValueError, match="placeholders"):
        ours(torch.cat([ids, torch.full((2, 1), IMAGE_TOKEN)], 1), **images(**SMALL))
    with pytest.raises(ValueError, match="num_local_patches"):
        ours(ids, **{**images(**SMALL), "num_local_patches": torch.tensor([1, 1])})
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(ids)


def test_generate_with_an_image_on_a_deepseek_ocr2_folder(hf_folder, tmp_path, capsys):
    """`seekmoe generate --image`: the image preprocessed (a global view and two crops), its placeholders in the
    prompt, decoded; a folder transformers wrote plus a tokenizer."""
    import shutil

    from PIL import Image

    from seekmoe.cli import main
    from seekmoe.data import train_tokenizer
    from seekmoe.inference.tokenizer import write_tokenizer_files

    folder = tmp_path / "ocr2"
    shutil.copytree(hf_folder[0], folder)
    write_tokenizer_files(train_tokenizer(["Read the page: 12 apples"] * 10, IMAGE_TOKEN), folder, 2048)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 300, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    args = ["generate", "--model", str(folder), "--max-new-tokens", "3", "--ignore-eos", "--temperature", "0"]
    assert main(args + ["--prompt", "<image>Read the page:", "--image", str(tmp_path / "p.png")]) == 0
    assert capsys.readouterr().out.strip()
