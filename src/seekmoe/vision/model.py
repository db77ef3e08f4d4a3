"""The vision-language model: MoonViT and its projector in front of seekmoe's DeepSeek-MoE CausalLM, unchanged.

Image features take the place of the embeddings of the image-placeholder tokens (`config.image_token_id`), one
placeholder per merged patch, in order; the language model then runs on those embeddings (`inputs_embeds`) and
still sees the token ids (routers read them: modality-aware routing tells image tokens by the placeholder id).
Kimi-K2.5 is this model: `vision/checkpoint.py` loads and saves its folders.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import CausalLM, CausalLMOutput
from ..model.transformer import init_module
from .config import VisionLanguageConfig
from .tower import Projector, VisionTower, sincos_position_grid


class VisionLanguageModel(nn.Module):
    """`model(input_ids, pixel_values=, image_grid_thw=)` -> CausalLMOutput (logits [B, S, vocab]); with `labels`,
    the loss (placeholder tokens are never predicted: their labels count as -100)."""

    def __init__(self, config: VisionLanguageConfig, language_model: CausalLM | None = None):
        """A fresh tower and projector in front of `language_model` (default: a fresh CausalLM of text_config)."""
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision_config)
        self.mm_projector = Projector(config)
        self.language_model = language_model if language_model is not None else CausalLM(config.text_config)
        self.reset_vision_parameters()

    def moe_layers(self):
        """The language model's MoE layers (the tower has none)."""
        return self.language_model.moe_layers()

    @torch.no_grad()
    def reset_vision_parameters(self) -> None:
        """Fresh tower and projector: normal(0, initializer_range) matrices, zero biases, unit LayerNorms, the
        position grid a 2-D sine-cosine table (`sincos_position_grid`), and the projector's output RMSNorm (if any)
        at the RMS of the language model's token embeddings (the language model keeps whatever it holds)."""
        std = self.config.text_config.initializer_range
        for module in list(self.vision_tower.modules()) + list(self.mm_projector.modules()):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            else:
                init_module(module, std)
        # A fresh tower stays frozen in LLaVA's stages, so its grid is what tells the language model where a patch
        # is: with a random normal(0, 0.02) one `make demo-vision` answered 75% of its position questions, with this
        # unit-amplitude table 95% (benchmarks/README.md).
        grid = self.vision_tower.patch_embed.pos_emb.weight
        grid.copy_(sincos_position_grid(*grid.shape).to(grid.device, grid.dtype))
        if self.mm_projector.post_norm is not None:
            table = self.language_model.model.embed_tokens.weight
            self.mm_projector.post_norm.weight.copy_(table.float().pow(2).mean().sqrt().expand(table.shape[1]))

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """[tokens, hidden_text]: every image's merged patches projected to the language model, images in order."""
        return self.mm_projector(self.vision_tower(pixel_values, image_grid_thw))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S, hidden]: token embeddings with image features scattered over the placeholder tokens. ValueError
        when the placeholders and the images' tokens differ in number."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        is_image = input_ids == self.config.image_token_id
        # The placeholder id may lie past the text vocabulary (Kimi-K2.5's does not, a grown model's may).
        embeds = self.language_model.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        n_placeholders = int(is_image.sum())
        if pixel_values is None:
            if n_placeholders:
                raise ValueError(f"input_ids hold {n_placeholders} image placeholder tokens (id "
                                 f"{self.config.image_token_id}) but no pixel_values were given")
            return embeds
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw: expected one (t, h, w) row per image")
        features = self.image_features(pixel_values, image_grid_thw)
        if features.shape[0] != n_placeholders:
            raise ValueError(f"the images make {features.shape[0]} tokens but input_ids hold {n_placeholders} "
                             f"image placeholders (id {self.config.image_token_id}): expected one per merged patch")
        return embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutput:
        """input_ids [B, S] with one placeholder per image token; pixel_values [patches, 3, p, p] and image_grid_thw
        [images, 3] as vision/preprocess.py makes them; other keywords go to CausalLM.forward."""
        embeds = self.embed(input_ids, pixel_values, image_grid_thw)
        if labels is not None:
            labels = labels.masked_fill(labels == self.config.image_token_id, -100)
        return self.language_model(input_ids, labels=labels, inputs_embeds=embeds, **kwargs)

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        """Write a Kimi-K2.5 folder (config.json with text_config and vision_config, safetensors in Kimi-K2.5's
        key layout) that transformers' Kimi_K25ForConditionalGeneration loads."""
        from .checkpoint import save_vision_language

        save_vision_language(self, path, max_shard_bytes=max_shard_bytes)
