"""Teaching a text model to see: a fresh vision tower and projector attached to a seekmoe text model, and SFT on
chats whose user turns hold OpenAI-style parts, in LLaVA's stages.

Data: the records of posttrain/sft_data.py, where a user message's `content` may be a list of parts
`{"type": "text", "text": "..."}` and `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..." |
"file:///..."}}`. Each image becomes `placeholders` copies of the image token in the prompt (never trained: they are
prompt tokens, and the model ignores labels at them too), its pixels kept beside the packed row.

Stages (LLaVA): `align` trains the projector alone (language model, routers' biases and tower frozen); `full` trains
the projector and the language model, the tower frozen unless `train_vision_tower`. The balancing recipe is the
model's own, image and text tokens counted alike (both reach the routers).

Who calls it: posttrain/sft.py (`seekmoe sft --vision-tower`, or a model folder that is already vision-language).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..inference.chat_template import format_chat
from ..posttrain.sft_data import IGNORE, PackedBatch, SFTData, SFTExample, collate, record_messages
from .config import VISION_PRESETS, VisionConfig, VisionLanguageConfig
from .images import ImageLimits, load_image_url
from .model import VisionLanguageModel
from .preprocess import ImageProcessor

STAGES = ("align", "full")
IMAGE_MARK = "\ue000"  # a private-use character standing for one image while a chat is rendered as text


def is_vision_folder(path: str | os.PathLike) -> bool:
    """Whether the model folder `path` holds a vision-language model (model_type kimi_k25)."""
    from ..model_folder import read_config_json

    return read_config_json(Path(path) / "config.json").get("model_type") == "kimi_k25"


def attach_vision_tower(model_dir: str | os.PathLike, tower: str | None) -> VisionLanguageModel:
    """The vision-language model to train from the folder `model_dir`: a text model with a fresh `tower` ('tiny',
    'small', or a Kimi-K2.5 folder whose tower is copied) and a fresh projector in front; or, when `model_dir` is
    already vision-language and `tower` is None, that model. The image token is the text model's
    media_placeholder_token_id where it has one, else one id past the text vocabulary: no text token can be it, and
    it needs no embedding row. A fresh projector of a preset tower ends in an RMSNorm at the text embeddings'
    scale (`projection_output_norm`)."""
    from ..checkpoint import from_pretrained

    if is_vision_folder(model_dir):
        if tower is not None:
            raise ValueError(f"--vision-tower {tower}: {model_dir} already has a vision tower (leave the flag out "
                             f"to keep training it)")
        return from_pretrained(model_dir, dtype=torch.float32)
    if tower is None:
        raise ValueError(f"{model_dir} is a text model: give --vision-tower tiny|small|DIR to attach one")
    text = from_pretrained(model_dir, dtype=torch.float32)
    donor = None
    if tower in VISION_PRESETS:
        vision = VisionConfig.preset(tower)
    elif (Path(tower) / "config.json").is_file() and is_vision_folder(tower):
        donor = from_pretrained(tower, dtype=torch.float32)
        vision = donor.config.vision_config
    else:
        raise ValueError(f"--vision-tower {tower}: expected {' or '.join(sorted(VISION_PRESETS))}, or a "
                         f"Kimi-K2.5 (kimi_k25) model folder whose tower to copy")
    # A text model that keeps an id for the image placeholder (media_placeholder_token_id, as modality-aware
    # routing reads it) keeps it; otherwise the image token is one id past its vocabulary.
    image_token_id = text.config.media_placeholder_token_id
    # seekmoe's own towers end the projector in an RMSNorm at the text embeddings' scale (see VisionLanguageConfig);
    # a donor's projector keeps its own form, so Kimi-K2.5's stays exact.
    config = VisionLanguageConfig(text_config=text.config, vision_config=vision,
                                  image_token_id=text.config.vocab_size if image_token_id is None else image_token_id,
                                  projection_output_norm=donor.config.projection_output_norm if donor else True)
    model = VisionLanguageModel(config, language_model=text)
    if donor is not None:
        model.vision_tower.load_state_dict(donor.vision_tower.state_dict())
        if donor.config.text_config.hidden_size == text.config.hidden_size:  # same widths: its projector fits too
            model.mm_projector.load_state_dict(donor.mm_projector.state_dict())
    return model


def apply_stage(model: VisionLanguageModel, stage: str, train_vision_tower: bool = False) -> str:
    """Set which parameters train in `stage` ('align': the projector; 'full': projector and language model, plus
    the tower when `train_vision_tower`); returns a line saying so."""
    if stage not in STAGES:
        raise ValueError(f"--stage {stage!r}: expected one of {list(STAGES)}")
    trains = {"mm_projector"} | ({"language_model"} if stage == "full" else set())
    if train_vision_tower:
        trains.add("vision_tower")
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".", 1)[0] in trains)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"stage {stage}: training {', '.join(sorted(trains))} ({n / 1e6:.2f}M parameters)"


@dataclass
class VisionExample(SFTExample):
    """An SFTExample whose prompt holds image placeholders, and those images' pixel_values and image_grid_thw."""

    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None


@dataclass
class VisionBatch(PackedBatch):
    """PackedBatch plus the rows' images, in the order of their placeholders (None without images)."""

    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    def to(self, device: torch.device) -> "VisionBatch":
        moved = [None if t is None else t.to(device, non_blocking=True) for t in
                 (self.input_ids, self.labels, self.position_ids, self.attn_mask, self.pixel_values,
                  self.image_grid_thw)]
        return VisionBatch(*moved)


def text_and_images(messages: list[dict], image_dir: str | os.PathLike | None,
                    limits: ImageLimits) -> tuple[list[dict], list]:
    """The messages with each list-of-parts content rendered as text (IMAGE_MARK for each image, user turns only),
    and the images, decoded within `limits` (file:// URLs only under `image_dir`)."""
    flat, images = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str) and IMAGE_MARK in content:
            raise ValueError(f"messages[{i}] holds U+E000, which stands for images here: remove it")
        if not isinstance(content, list):
            flat.append(m)
            continue
        text = ""
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str) and IMAGE_MARK not in part["text"]:
                text += part["text"]
            elif kind == "image_url" and m.get("role") != "user":
                raise ValueError(f"messages[{i}].content[{j}]: an image in a {m.get('role')!r} turn: expected "
                                 f"images in user turns only")
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                try:
                    images.append(load_image_url(url, image_dir, limits))
                except ValueError as e:
                    raise ValueError(f"messages[{i}].content[{j}]: {e}") from None
                text += IMAGE_MARK
            else:
                raise ValueError(f"messages[{i}].content[{j}]={str(part)[:80]!r}: expected {{'type': 'text', "
                                 f"'text': ...}} or {{'type': 'image_url', 'image_url': {{'url': ...}}}}")
        flat.append({**m, "content": text})
    return flat, images


def encode_with_images(text: str, tokenizer, counts: list[int], image_token_id: int, add_bos: bool) -> list[int]:
    """Token ids of `text` whose k-th IMAGE_MARK becomes counts[k] image tokens (text between marks tokenized
    piece by piece, as generation prompts are)."""
    pieces = text.split(IMAGE_MARK)
    if len(pieces) - 1 != len(counts):
        raise ValueError(f"{len(pieces) - 1} image marks for {len(counts)} images")
    ids: list[int] = tokenizer.encode(pieces[0], add_bos=add_bos) if pieces[0] or add_bos else []
    for n, piece in zip(counts, pieces[1:]):
        ids += [image_token_id] * n
        if piece:
            ids += tokenizer.encode(piece, add_bos=False)
    return ids


def render_vision_example(record: dict, tokenizer, config: VisionLanguageConfig, processor: ImageProcessor,
                          image_dir: str | os.PathLike | None = None,
                          limits: ImageLimits = ImageLimits()) -> VisionExample:
    """render_example for chats with images: assistant turns labelled, images' placeholders in the prompt."""
    messages, images = text_and_images(record_messages(record), image_dir, limits)
    format_chat(messages)  # validates roles and contents
    pixel_values, grid = processor(images) if images else (None, None)
    counts = [processor.placeholders(g) for g in grid.tolist()] if images else []
    ids: list[int] = []
    labels: list[int] = []
    rendered, used = "", 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError(f"record {str(record)[:80]!r} starts with an assistant turn: expected a prompt first")
        prompt = format_chat(messages[:i])
        piece = prompt[len(rendered):]
        n_marks = piece.count(IMAGE_MARK)
        piece_ids = encode_with_images(piece, tokenizer, counts[used:used + n_marks], config.image_token_id,
                                       add_bos=not rendered)
        used += n_marks
        completion_ids = tokenizer.encode(" " + m["content"], add_bos=False) + [tokenizer.eos_token_id]
        ids += piece_ids + completion_ids
        labels += [IGNORE] * len(piece_ids) + completion_ids
        rendered = prompt + " " + m["content"]
    if not labels:
        raise ValueError(f"record {str(record)[:80]!r} has no assistant turn: nothing to train on")
    if used != len(images):  # images after the last assistant turn would sit in no trained prompt
        raise ValueError(f"record {str(record)[:80]!r} has images after its last assistant turn")
    return VisionExample(ids, labels, pixel_values, grid)


class VisionSFTData(SFTData):
    """SFTData of chats with images: rows packed as for text, each micro-batch carrying its rows' images."""

    def __init__(self, paths, tokenizer, config, model_config: VisionLanguageConfig, hf_tokenizer=None,
                 image_dir: str | os.PathLike | None = None):
        kernel = model_config.vision_config.merge_kernel_size
        if kernel[0] != kernel[1]:
            raise ValueError(f"merge_kernel_size {list(kernel)}: the image processor merges square blocks")
        processor = ImageProcessor(patch_size=model_config.vision_config.patch_size, merge_size=kernel[0])
        # Relative file:// URLs are not URLs; absolute ones are read only under image_dir (default: the data's
        # own folder).
        image_dir = image_dir if image_dir is not None else Path(paths[0]).resolve().parent
        super().__init__(paths, tokenizer, config, hf_tokenizer, render=lambda record: render_vision_example(
            record, tokenizer, model_config, processor, image_dir))
        self.meta["images"] = sum(0 if e.image_grid_thw is None else len(e.image_grid_thw)
                                  for row in self.train for e in row)

    def collate(self, rows: list[list[VisionExample]]) -> VisionBatch:
        batch = collate(rows, self.config.seq_len, self.pad_id)
        examples = [e for row in rows for e in row if e.pixel_values is not None]
        if not examples:
            return VisionBatch(batch.input_ids, batch.labels, batch.position_ids, batch.attn_mask)
        return VisionBatch(batch.input_ids, batch.labels, batch.position_ids, batch.attn_mask,
                           torch.cat([e.pixel_values for e in examples]),
                           torch.cat([e.image_grid_thw for e in examples]))


def vision_sft_forward(model, batch: VisionBatch, device: torch.device, window, mtp_loss_weight: float | None = None):
    """sft_forward with the rows' images in front of the language model."""
    b = batch.to(device)
    return model(b.input_ids, pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw, labels=b.labels,
                 position_ids=b.position_ids, attn_mask=b.attn_mask, balance_window=window,
                 mtp_loss_weight=mtp_loss_weight)
