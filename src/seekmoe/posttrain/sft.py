"""`seekmoe sft`: supervised fine-tuning of a model folder on chats or prompt/completion pairs.

The run is pretraining's `Trainer` (LR schedule, balancing, checkpoints, exact resume, metrics.jsonl, plots,
final/) given `SFTData` for its data and `sft_forward` for its objective: loss on the assistant's tokens only, several
examples packed per sequence without attention across them (one a row for a model whose attention cannot keep them
apart: DeepSeek-V4). Router biases keep moving by the auxiliary-loss-free
rule unless `--freeze-router-bias`, and the balance losses of the model's config stay on.
"""

from __future__ import annotations

from pathlib import Path

# SFT's settings where they differ from pretraining's: a lower, briefly warmed-up lr (the model already knows the
# language), and the evaluation/checkpoint rhythm of a short run. field=value overrides every one.
SFT_DEFAULTS = dict(lr=3e-4, warmup_steps=10, max_steps=300, eval_every=50, save_every=100, seq_len=256,
                    batch_size=8, val_fraction=0.05)
FROZEN_BIAS_SCHEDULE = [[0.0, 0.0]]  # bias_update_speed x 0 for the whole run


def sft(model_dir: str | Path, data: list[str | Path], out: str | Path, overrides: dict | None = None,
        resume: bool | str = False, stop_at: int | None = None, progress: bool = True,
        freeze_router_bias: bool = False, vision_tower: str | None = None, stage: str = "full",
        train_vision_tower: bool = False, image_dir: str | Path | None = None) -> dict:
    """Fine-tune the model folder `model_dir` on the JSONL files `data` into `out`; returns the run summary.

    With `vision_tower` (or a vision-language `model_dir`) the chats may hold images and the run is vision/sft.py's:
    a fresh tower ('tiny', 'small', or a Kimi-K2.5 folder's) in front of the model, trained in LLaVA's `stage`
    ('align': the projector alone; 'full': projector and language model, the tower too if `train_vision_tower`);
    file:// images are read only under `image_dir` (default: the first data file's folder)."""
    from ..inference.tokenizer import Tokenizer
    from ..model.attention_choice import supports_packed_masks
    from ..train.config import load_run_config
    from ..train.trainer import Trainer
    from .sft_data import SFTData, sft_forward

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json (expected a model folder, e.g. a final/)")
    from ..vision.sft import is_vision_folder

    vision = vision_tower is not None or is_vision_folder(model_dir)
    if not vision and (stage != "full" or train_vision_tower):
        raise ValueError("--stage and --train-vision-tower apply to a vision-language model: give --vision-tower")
    settings = {**SFT_DEFAULTS, **(overrides or {})}
    if freeze_router_bias or (vision and stage == "align"):  # aligning leaves the language model as it is
        settings["bias_update_speed_schedule"] = FROZEN_BIAS_SCHEDULE
    model_config, config = load_run_config(overrides=settings, init_from=model_dir)
    tokenizer = Tokenizer(model_dir, model_config.bos_token_id, model_config.eos_token_id)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {model_dir}: the tokenizer has no end-of-text token to end assistant turns with")
    if vision:
        return _vision_sft(model_dir, data, out, config, model_config, tokenizer, resume, stop_at, progress,
                           vision_tower, stage, train_vision_tower, image_dir)
    packed = supports_packed_masks(model_config)  # DeepSeek-V4: one example a row
    trainer = Trainer(model_config, config, out, resume=resume, stop_at=stop_at, progress=progress,
                      init_from=model_dir, forward=sft_forward,
                      make_data=lambda hf, rank, size: SFTData(data, tokenizer, config, hf, rank, size, packed=packed))
    return trainer.run()


def _vision_sft(model_dir, data, out, config, model_config, tokenizer, resume, stop_at, progress, vision_tower,
                stage, train_vision_tower, image_dir) -> dict:
    """The vision-language run: the model built first (its image token and patch size shape the data), one
    process, the tower's fresh weights drawn from the run's seed."""
    import torch

    from ..train.trainer import Trainer
    from ..vision.sft import VisionSFTData, apply_stage, attach_vision_tower, vision_sft_forward

    if config.lora:
        raise ValueError("--lora with a vision-language model is not supported yet: use --stage align|full")
    torch.manual_seed(config.seed)
    model = attach_vision_tower(model_dir, vision_tower)
    line = apply_stage(model, stage, train_vision_tower)
    print(line, flush=True)
    trainer = Trainer(model_config, config, out, resume=resume, stop_at=stop_at, progress=progress,
                      init_from=model_dir, forward=vision_sft_forward, make_model=lambda: model,
                      make_data=lambda hf, rank, size: VisionSFTData(data, tokenizer, config, model.config, hf,
                                                                     image_dir))
    return trainer.run()
