"""Images in the inference engine: each request's image features computed once when it is added, and scattered
over its placeholder tokens' embeddings in the prefill forwards (a chunked prefill takes them chunk by chunk).
Decoding never sees an image: after the prefill the cache holds everything, and decode steps are unchanged.

Who calls it: inference/engine.py (`Engine.add`, `Engine._forward`).
"""

from __future__ import annotations

import torch


def request_image_embeds(engine, request) -> torch.Tensor | None:
    """[placeholders, hidden] features of `request`'s images on the engine's device (None without images).
    ValueError when images and placeholders disagree, or the request asks for what images cannot give yet."""
    n = sum(t == engine.image_token_id for t in request.prompt_ids) if engine.image_token_id is not None else 0
    if request.pixel_values is None:
        if n:
            raise ValueError(f"the prompt holds {n} image tokens but no images")
        return None
    if engine.vision is None:
        raise ValueError("this model takes no images (it has no vision tower)")
    if engine.drafter is not None:
        raise ValueError("speculative decoding of a prompt with images is not supported: run without --speculative")
    if request.params.prompt_logprobs is not None:
        raise ValueError("prompt log-probabilities of a prompt with images are not supported")
    param = next(engine.vision.parameters())
    with torch.inference_mode():
        features = engine.vision.image_features(request.pixel_values.to(param.device, param.dtype),
                                                request.image_grid_thw.to(param.device))
    if features.shape[0] != n:
        raise ValueError(f"the images make {features.shape[0]} tokens but the prompt holds {n} image placeholders")
    request.pixel_values = None  # the features are all the engine needs from here on
    return features


def prefill_embeds(model, image_token_id: int, tokens: torch.Tensor, requests) -> torch.Tensor:
    """Input embeddings [B, S, hidden] of a prefill forward of `tokens` [B, S] (each request's next prompt tokens,
    from its `prefilled`): token embeddings, and each request's image features at its placeholders in this chunk."""
    is_image = tokens == image_token_id
    embeds = model.model.embed_tokens(tokens.masked_fill(is_image, 0))
    for i, r in enumerate(requests):
        if r._image_embeds is None:
            continue
        done = sum(t == image_token_id for t in r.prompt_ids[:r.prefilled])  # placeholders in earlier chunks
        k = int(is_image[i].sum())
        embeds[i, is_image[i]] = r._image_embeds[done:done + k].to(embeds.dtype)
    return embeds


IMAGE_TAG = "<image>"  # where `seekmoe generate --image` puts an image in a raw prompt


def image_prompt(text: str, images: list, tokenizer, config, add_bos: bool = True
                 ) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    """(token ids, pixel_values, image_grid_thw) of a prompt whose k-th vision.sft.IMAGE_MARK stands for images[k]
    (Pillow images): each becomes its image-token placeholders, preprocessed as the model's
    `config.image_processor()` does it (Kimi-K2.5's, or DeepSeek-OCR-2's packed views)."""
    from .sft import IMAGE_MARK, encode_with_images

    marks = text.count(IMAGE_MARK)
    if marks != len(images):
        raise ValueError(f"the prompt has {marks} image positions for {len(images)} images")
    if not images:
        return tokenizer.encode(text, add_bos=add_bos), None, None
    processor = config.image_processor()
    pixel_values, grid = processor(images)
    counts = [processor.placeholders(g) for g in grid.tolist()]
    return encode_with_images(text, tokenizer, counts, config.image_token_id, add_bos), pixel_values, grid


MAX_IMAGES = 16  # images in one request


def chat_prompt(engine, messages: list[dict], image_dir, limits) -> tuple[list[int], torch.Tensor | None,
                                                                          torch.Tensor | None]:
    """(ids, pixel_values, image_grid_thw) of chat messages whose contents may be OpenAI-style parts, through the
    chat template. ValueError saying why for a refused image (vision/images.py), too many images, or images sent
    to a model without a vision tower."""
    from ..inference.chat_template import format_chat
    from .sft import text_and_images

    n_images = sum(1 for m in messages if isinstance(m.get("content"), list)
                   for part in m["content"] if isinstance(part, dict) and part.get("type") == "image_url")
    if n_images and engine.vision is None:
        raise ValueError("this model takes no images (it has no vision tower): send text only")
    if n_images > MAX_IMAGES:
        raise ValueError(f"{n_images} images: expected at most {MAX_IMAGES} a request")
    flat, images = text_and_images(messages, image_dir, limits)
    text = format_chat(flat)
    if not images:
        return engine.tokenizer.encode(text), None, None
    return image_prompt(text, images, engine.tokenizer, engine.vision.config)
