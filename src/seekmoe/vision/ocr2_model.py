"""DeepSeek-OCR-2 (transformers `deepseek_ocr2`): SAM + the query encoder + a linear projector in front of seekmoe's
CausalLM (a multi-head DeepSeek-V2 MoE), unchanged.

Each image is a global view (padded square, `image_size` pixels) and, when large, local crops (`tile` pixels,
row by row). Its features are laid out as every local crop's query features in crop order, then the global view's,
then one learned `view_separator` vector; they replace the embeddings of the image's placeholder tokens
(`config.image_token_id`) in order, as in vision/model.py's VisionLanguageModel.

Inputs as transformers names them: `pixel_values` [images, 3, S, S], `pixel_values_local` [crops, 3, T, T],
`num_local_patches` [images]. The inference engine carries an image in two tensors (`pixel_values`,
`image_grid_thw`); for this model they are `pack_views`'s flat pixels and per-image layout rows.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import CausalLM, CausalLMOutput
from .ocr2_config import Ocr2Config
from .ocr2_encoder import Ocr2VisionTower


def pack_views(pixel_values: torch.Tensor, pixel_values_local: torch.Tensor | None,
               num_local_patches) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat pixels, layout [images, 3] = (local crops, global side, tile side)): every image's views in one 1-D
    tensor (its crops, then its global view), the form the inference engine carries (`unpack_views` inverts it)."""
    counts = [int(n) for n in (num_local_patches if num_local_patches is not None else [0] * len(pixel_values))]
    tile = int(pixel_values_local.shape[-1]) if pixel_values_local is not None else 0
    parts, start = [], 0
    for image, n in zip(pixel_values, counts):
        if n:
            parts.append(pixel_values_local[start:start + n].reshape(-1))
            start += n
        parts.append(image.reshape(-1))
    layout = torch.tensor([[n, int(pixel_values.shape[-1]), tile if n else 0] for n in counts], dtype=torch.long)
    return torch.cat(parts), layout


def unpack_views(flat: torch.Tensor, layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """(pixel_values, pixel_values_local or None, num_local_patches) of `pack_views`'s form. ValueError when the
    pixels and the layout disagree in size, or the images' views differ in size."""
    rows = [tuple(int(v) for v in row) for row in layout.tolist()]
    need = sum(3 * (n * t * t + g * g) for n, g, t in rows)
    if flat.dim() != 1 or flat.numel() != need or not rows:
        raise ValueError(f"packed DeepSeek-OCR-2 pixels hold {flat.numel()} values, the layout {rows} needs {need}")
    if len({g for _, g, _ in rows}) > 1 or len({t for n, _, t in rows if n}) > 1:
        raise ValueError(f"images of one request must share the global view and tile sizes, got layout {rows}")
    globals_, locals_, start = [], [], 0
    for n, g, t in rows:
        if n:
            locals_.append(flat[start:start + 3 * n * t * t].view(n, 3, t, t))
            start += 3 * n * t * t
        globals_.append(flat[start:start + 3 * g * g].view(3, g, g))
        start += 3 * g * g
    return torch.stack(globals_), (torch.cat(locals_) if locals_ else None), [n for n, _, _ in rows]


class Ocr2Model(nn.Module):
    """`model(input_ids, pixel_values=, pixel_values_local=, num_local_patches=)` -> CausalLMOutput; with `labels`,
    the loss (placeholder tokens are never predicted)."""

    def __init__(self, config: Ocr2Config, language_model: CausalLM | None = None):
        super().__init__()
        self.config = config
        self.vision_tower = Ocr2VisionTower(config.sam_config, config.encoder_config)
        self.projector = nn.Linear(config.encoder_config.hidden_size, config.text_config.hidden_size)
        self.view_separator = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.language_model = language_model if language_model is not None else CausalLM(config.text_config)

    def moe_layers(self):
        """The language model's MoE layers (the encoders have none)."""
        return self.language_model.moe_layers()

    def view_features(self, views: torch.Tensor) -> torch.Tensor:
        """[views, queries, text hidden]: square views [views, 3, S, S] through both encoders and the projector."""
        return self.projector(self.vision_tower(views))

    def images_features(self, pixel_values: torch.Tensor, pixel_values_local: torch.Tensor | None = None,
                        num_local_patches=None) -> torch.Tensor:
        """[tokens, text hidden]: each image's crops' features, its global view's, and the view separator, images in
        order."""
        counts = [int(n) for n in num_local_patches] if num_local_patches is not None else [0] * len(pixel_values)
        if len(counts) != len(pixel_values):
            raise ValueError(f"num_local_patches has {len(counts)} entries for {len(pixel_values)} images")
        n_local = 0 if pixel_values_local is None else pixel_values_local.shape[0]
        if sum(counts) != n_local:
            raise ValueError(f"num_local_patches sums to {sum(counts)} but pixel_values_local holds {n_local} crops")
        global_features = self.view_features(pixel_values)
        local = self.view_features(pixel_values_local).split(counts) if n_local else [None] * len(counts)
        separator = self.view_separator[None].to(global_features.dtype)
        out = []
        for g, crops in zip(global_features, local):
            if crops is not None and crops.shape[0]:
                out.append(crops.reshape(-1, crops.shape[-1]))
            out += [g, separator]
        return torch.cat(out)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """images_features of the engine's packed form (`pack_views`: flat pixels, layout rows)."""
        return self.images_features(*unpack_views(pixel_values, image_grid_thw))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              pixel_values_local: torch.Tensor | None = None, num_local_patches=None,
              image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S, hidden]: token embeddings with image features over the placeholders; the images as transformers
        passes them, or packed (`image_grid_thw`: pack_views's layout, `pixel_values` its flat pixels). ValueError
        when the placeholders and the images' features differ in number."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if image_grid_thw is not None and pixel_values is not None:
            if pixel_values_local is not None or num_local_patches is not None:
                raise ValueError("image_grid_thw (packed images) given with pixel_values_local or num_local_patches: "
                                 "expected one form of the images")
            pixel_values, pixel_values_local, num_local_patches = unpack_views(pixel_values, image_grid_thw)
        is_image = input_ids == self.config.image_token_id
        embeds = self.language_model.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        n_placeholders = int(is_image.sum())
        if pixel_values is None:
            if n_placeholders:
                raise ValueError(f"input_ids hold {n_placeholders} image placeholder tokens (id "
                                 f"{self.config.image_token_id}) but no pixel_values were given")
            return embeds
        features = self.images_features(pixel_values, pixel_values_local, num_local_patches)
        if features.shape[0] != n_placeholders:
            raise ValueError(f"the images make {features.shape[0]} tokens but input_ids hold {n_placeholders} image "
                             f"placeholders (id {self.config.image_token_id})")
        return embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                pixel_values_local: torch.Tensor | None = None, num_local_patches=None,
                labels: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutput:
        """input_ids [B, S] with each image's placeholders; the images as `embed` takes them (so
        `model(ids, pixel_values=, image_grid_thw=)` with config.image_processor()'s output, as for Kimi-K2.5);
        other keywords go to CausalLM.forward."""
        embeds = self.embed(input_ids, pixel_values, pixel_values_local, num_local_patches, image_grid_thw)
        if labels is not None:
            labels = labels.masked_fill(labels == self.config.image_token_id, -100)
        return self.language_model(input_ids, labels=labels, inputs_embeds=embeds, **kwargs)

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        """Write a DeepSeek-OCR-2 folder (config.json, safetensors in DeepSeek's released key layout) that
        transformers' DeepseekOcr2ForConditionalGeneration loads."""
        from .ocr2_checkpoint import save_ocr2

        save_ocr2(self, path, max_shard_bytes=max_shard_bytes)
