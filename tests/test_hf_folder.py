"""Complete Hugging Face model folders both ways: transformers' own V3 checkpoints (which never hold an MTP layer)
load, and the folder seekmoe writes starts prompts with BOS, stops at EOS and formats chats in transformers as
seekmoe does."""

import json
import warnings

import pytest
import torch

import seekmoe
from seekmoe.checkpoint import MissingMTPWarning
from seekmoe.inference import Engine, SamplingParams
from seekmoe.inference.chat_template import format_chat
from seekmoe.inference.tokenizer import BOS_TOKEN, write_tokenizer_files
from hf_oracle import hf_config, hf_model, rel_error
from test_inference_tokenizer import train_tokenizer


def test_a_transformers_v3_checkpoint_without_its_mtp_layer_loads_with_one_warning(tmp_path):
    from transformers import DeepseekV3Config

    assert DeepseekV3Config().num_nextn_predict_layers == 1  # transformers declares one and never saves it
    reference = hf_model(hf_config(num_nextn_predict_layers=1))
    reference.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = seekmoe.from_pretrained(tmp_path, dtype=torch.float32)
    mtp_warnings = [w for w in caught if issubclass(w.category, MissingMTPWarning)]
    assert len(mtp_warnings) == 1 and "MTP" in str(mtp_warnings[0].message)
    assert ours.config.num_nextn_predict_layers == 0 and len(ours.model.mtp) == 0
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert rel_error(ours(ids).logits, reference(ids).logits) < 1e-4
    with pytest.raises(ValueError, match="MTP"):
        Engine(ours, None, max_batch_size=1, speculative="mtp")


def test_other_missing_tensors_stay_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model(hf_config()).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.1.self_attn.kv_a_layernorm.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks tensors.*kv_a_layernorm"):
        seekmoe.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A folder as `seekmoe train` writes final/: model, tokenizer.json, tokenizer_config.json,
    generation_config.json."""
    from tokenizers import Tokenizer

    path = tmp_path_factory.mktemp("final")
    torch.manual_seed(0)
    model = seekmoe.build_model(seekmoe.ModelConfig.preset("tiny", vocab_size=400))
    model.save_pretrained(path)
    train_tokenizer(path / "trained.json")
    write_tokenizer_files(Tokenizer.from_file(str(path / "trained.json")), path, 512)
    (path / "trained.json").unlink()
    return path


def test_transformers_pipeline_greedy_output_equals_seekmoe_generate(model_folder):
    from transformers import pipeline

    prompt = "def load(path):"
    engine = Engine.from_pretrained(model_folder, max_batch_size=1)
    ours = engine.generate([engine.tokenizer.encode(prompt)], SamplingParams(max_new_tokens=10, temperature=0))[0]
    generator = pipeline("text-generation", model=str(model_folder), dtype=torch.float32)
    assert generator.tokenizer(prompt)["input_ids"][0] == engine.tokenizer.bos_token_id
    assert generator.model.generation_config.eos_token_id == engine.tokenizer.eos_token_id
    theirs = generator(prompt, max_new_tokens=10, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert theirs == ours.text


def test_transformers_chat_template_equals_seekmoe_chat_formatting(model_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == BOS_TOKEN + format_chat(messages)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.model_max_length) == (BOS_TOKEN, "<|end_of_text|>", 512)


def test_the_folder_special_tokens_are_read_back(model_folder, tmp_path):
    from seekmoe.inference.tokenizer import Tokenizer

    config = json.loads((model_folder / "generation_config.json").read_text())
    tok = Tokenizer(model_folder)
    assert (tok.bos_token_id, tok.eos_token_id) == (config["bos_token_id"], config["eos_token_id"])
    # A DeepSeek-style folder: special tokens named only in tokenizer_config.json (as {"content": ...}).
    (tmp_path / "tokenizer.json").write_text((model_folder / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|end_of_text|>"}, "eos_token": {"content": "<|begin_of_text|>"}}))
    swapped = Tokenizer(tmp_path)
    assert (swapped.bos_token_id, swapped.eos_token_id) == (1, 0)
