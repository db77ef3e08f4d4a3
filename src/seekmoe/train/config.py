"""TrainConfig: how a model is pretrained (data, objective schedules, optimizer, checkpoints), and reading a run's
model + training settings from a preset, a YAML/TOML file and `field=value` overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..model_folder import check_config_bounds
from ..config import ModelConfig

LR_SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")
PRECISIONS = ("auto", "fp32", "bf16", "fp8")  # fp8: CUDA only (quant/fp8.py)
BALANCE_SCOPES = ("global", "micro")

# DeepSeek-V3's stepwise schedules (section 4.2), as (fraction of training at which a phase starts, multiplier of
# the configured value): MTP weight lambda 0.3 for the first 10T of 14.8T tokens, then 0.1; bias update speed gamma
# 0.001 for the first 14.3T tokens, then 0.
V3_MTP_LOSS_WEIGHT_SCHEDULE = [[0.0, 1.0], [10.0 / 14.8, 1.0 / 3.0]]
V3_BIAS_UPDATE_SPEED_SCHEDULE = [[0.0, 1.0], [14.3 / 14.8, 0.0]]


@dataclass
class TrainConfig:
    """Settings of one pretraining run; every field can be set by `field=value` on the command line."""

    # data
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    val_fraction: float = 0.02  # share of documents held out for validation (chosen by a hash of their text)
    data_glob: str = "*"  # which files of a --data folder to read
    cache_dir: str | None = None  # tokenizer and token-shard cache; default $SEEKMOE_CACHE or ~/.cache/seekmoe
    min_file_bytes: int = 0  # skip files smaller than this (a context-extension stage wants long documents)
    # schedule of the run
    max_steps: int = 1000
    seed: int = 0
    # optimizer (AdamW)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule's final lr as a fraction of lr
    warmup_steps: int = 50
    lr_schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying at the end
    weight_decay: float = 0.1
    decay_norms_biases_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # optimizer=muon (issue 21): Muon (train/muon.py, Moonlight's recipe: update RMS matched to AdamW's, so the same
    # lr and weight_decay) on the hidden weight matrices, AdamW on embeddings, output head, norms and routers
    optimizer: str = "adamw"  # adamw | muon
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations per update
    # objective schedules: [[fraction of max_steps where a phase starts, multiplier of the config value], ...]
    mtp_loss_weight_schedule: list = field(default_factory=lambda: [list(p) for p in V3_MTP_LOSS_WEIGHT_SCHEDULE])
    bias_update_speed_schedule: list = field(default_factory=lambda: [list(p) for p in V3_BIAS_UPDATE_SPEED_SCHEDULE])
    # balancing: the batch the expert- and device-level balance losses count f_i over: every micro-batch of a step
    # on every data-parallel rank (global, "Demons in the Detail", Qwen 2025), or each micro-batch alone (micro)
    balance_scope: str = "global"
    # growing a model (seekmoe expand, grow/): which parameters train ("all", or names and globs such as
    # "new-experts,router", see train/freeze.py), and the selection-bias speed of the experts expand added, used
    # instead of bias_update_speed for the first new_expert_onboarding_steps steps (train/onboarding.py; 0 = off)
    trainable: str = "all"
    new_expert_bias_update_speed: float = 0.0
    new_expert_onboarding_steps: int = 0
    # speed
    precision: str = "auto"  # auto: bf16 autocast on a GPU or a CPU with native bf16, else fp32
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
    # bookkeeping
    eval_every: int = 100
    eval_batches: int = 8  # validation micro-batches per evaluation (the same ones every time)
    save_every: int = 500
    keep_checkpoints: int = 2
    save_hf_every: int = 0  # also write a Hugging Face folder OUT/hf/step-N/ every N steps (0: only final/)
    max_bad_steps: int = 5  # consecutive non-finite losses after which training stops
    # multi-process training under torchrun (`parallel.ep=2` on the command line): see seekmoe.parallel
    parallel: dict = field(default_factory=dict)
    # LoRA / QLoRA adapters instead of full fine-tuning (`--lora 8`, or `lora.rank=8 lora.targets=experts`): see
    # seekmoe.lora; empty = train the weights themselves
    lora: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot run."""

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}")

        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "save_every",
                     "keep_checkpoints", "max_bad_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "a positive integer")
        for name in ("warmup_steps", "num_threads", "seed", "min_file_bytes", "new_expert_onboarding_steps",
                     "save_hf_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(name, "a non-negative integer")
        # Every float here multiplies weights or gradients: inf or nan would pass a `> 0` check and turn the
        # weights non-finite after one step (lr=inf did, with exit 0), so each must be a finite number.
        for name in ("lr", "eps"):
            if not _finite_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "a finite number > 0")
        for name in ("min_lr_ratio", "decay_fraction", "beta1", "beta2"):
            if not _finite_number(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                raise bad(name, "a number in [0, 1]")
        if not _finite_number(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", "a number in [0, 1)")
        for name in ("weight_decay", "grad_clip", "new_expert_bias_update_speed"):
            if not _finite_number(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a finite number >= 0")
        if not isinstance(self.trainable, str) or not self.trainable.strip():
            raise bad("trainable", "'all' or a comma-separated list of parameter names and globs (see --train)")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"one of {OPTIMIZERS}")
        if not _finite_number(self.muon_momentum) or not 0 <= self.muon_momentum < 1:
            raise bad("muon_momentum", "a number in [0, 1)")
        steps = self.muon_ns_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps < 100:
            raise bad("muon_ns_steps", "an integer from 1 to 99")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"one of {LR_SCHEDULES}")
        if self.balance_scope not in BALANCE_SCOPES:
            raise bad("balance_scope", f"one of {BALANCE_SCOPES}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"one of {PRECISIONS}")
        if not isinstance(self.parallel, dict):
            raise bad("parallel", "a mapping of parallelism settings, e.g. parallel.ep=2")
        if not isinstance(self.lora, dict):
            raise bad("lora", "a mapping of LoRA settings, e.g. lora.rank=8 (or --lora 8)")
        if self.lora:
            from ..lora.config import LoRAConfig

            LoRAConfig.from_dict(self.lora)
        for name in ("mtp_loss_weight_schedule", "bias_update_speed_schedule"):
            phases = getattr(self, name)
            if (not isinstance(phases, list) or not phases
                    or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in phases)
                    or not all(_finite_number(p[0]) and _finite_number(p[1]) for p in phases)
                    or phases[0][0] != 0 or [p[0] for p in phases] != sorted(p[0] for p in phases)
                    or any(p[1] < 0 for p in phases)):
                raise bad(name, "a list of [start fraction, multiplier] pairs, the first starting at 0, "
                                "in increasing order, multipliers finite and >= 0")

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict."""
        return dataclasses.asdict(self)


def _finite_number(value) -> bool:
    """A real number (not a bool) that is neither infinite nor NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stepwise(phases: list, step: int, max_steps: int) -> float:
    """The multiplier of the phase that `step` (0-based) falls in, phases starting at fractions of `max_steps`."""
    value = phases[0][1]
    for start, multiplier in phases:
        if step >= start * max_steps:
            value = multiplier
    return float(value)


_MODEL_FIELDS = {f.name for f in fields(ModelConfig)} - {"extra"}
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


def load_run_config(preset: str | None = None, config_file: str | Path | None = None,
                    overrides: list[str] | dict | None = None, init_from: str | Path | None = None,
                    extend_context: int | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The model and training settings of a run: `preset` (or the file's `preset:` key), or the config.json of the
    `init_from` model folder, as the base, then the file's fields, then `overrides` (`field=value` strings, values
    parsed as YAML). Any ModelConfig or TrainConfig field may appear at the top level of the file.

    Pretraining from a preset whose published config carries YaRN scaling (deepseek-v2*, deepseek-v3) at a seq_len
    within the original context uses plain RoPE: YaRN belongs to a context-extension stage (`extend_context`, which
    needs `init_from`), as in DeepSeek-V3 (section 4.3).
    """
    settings: dict[str, Any] = {}
    if config_file is not None:
        settings.update(read_config_file(config_file))
    if isinstance(overrides, dict):
        settings.update(overrides)
    else:
        settings.update(parse_overrides(overrides or []))
    base = settings.pop("preset", None) or preset
    if base is None and init_from is None:
        raise ValueError("no model given: pass --preset NAME, --init-from DIR or a --config file with a 'preset:' "
                         "key")
    if extend_context is not None and init_from is None:
        raise ValueError("--extend-context needs --init-from DIR: context extension continues a trained model")
    unknown = set(settings) - _MODEL_FIELDS - _TRAIN_FIELDS
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)}: expected ModelConfig fields "
                         f"({', '.join(sorted(_MODEL_FIELDS))}) or TrainConfig fields "
                         f"({', '.join(sorted(_TRAIN_FIELDS))})")
    model_fields = {k: v for k, v in settings.items() if k in _MODEL_FIELDS}
    train_fields = {k: v for k, v in settings.items() if k in _TRAIN_FIELDS}
    train_defaults = dict(PRESET_TRAINING.get(base, {})) if init_from is None else {}
    if init_from is not None:
        model = ModelConfig.from_json_file(init_from)
        model = model.replace(**model_fields) if model_fields else model
    else:
        model = ModelConfig.preset(base, **model_fields)
    check_config_bounds(model, "the run's model config")  # before anything counts or builds its layers
    seq_len = train_fields.get("seq_len", train_defaults.get("seq_len", TrainConfig.seq_len))
    if init_from is None and model.rope_scaling and "rope_scaling" not in model_fields:
        original = model.rope_scaling["original_max_position_embeddings"]
        if seq_len <= original:
            print(f"pretraining at seq_len={seq_len} within the preset's original context {original}: plain RoPE "
                  f"(the preset's YaRN scaling belongs to a later --extend-context stage)")
            model = model.replace(rope_scaling=None, max_position_embeddings=original)
    if extend_context is not None:
        model = extended_context_config(model, extend_context)
        # DeepSeek-V3's extension phases: constant lr at pretraining's final lr, long sequences of long documents.
        final_lr = TrainConfig.lr * TrainConfig.min_lr_ratio
        train_defaults.update(seq_len=extend_context, lr=final_lr, warmup_steps=0, min_lr_ratio=1.0,
                              min_file_bytes=4 * extend_context)
    train = TrainConfig(**{**train_defaults, **train_fields})
    return model, train


def extended_context_config(model: ModelConfig, length: int) -> ModelConfig:
    """`model` with YaRN scaling from its original context to `length` tokens (DeepSeek-V3 section 4.3: beta_fast
    32, beta_slow 1, sqrt(t) = 0.1 ln s + 1). A model that already has YaRN keeps its original context and its
    beta/mscale settings; only the factor grows."""
    current = dict(model.rope_scaling or {})
    original = current.get("original_max_position_embeddings", model.max_position_embeddings)
    if not isinstance(length, int) or length <= original:
        raise ValueError(f"--extend-context {length} is invalid: expected more tokens than the model's original "
                         f"context ({original})")
    scaling = {"type": "yarn", "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, **current,
               "factor": length / original, "original_max_position_embeddings": original}
    return model.replace(rope_scaling=scaling, max_position_embeddings=length)


def read_config_file(path: str | Path) -> dict:
    """A YAML (.yaml/.yml) or TOML (.toml) file's top-level mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {path} is not valid TOML: {e}") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path} is not valid YAML: {e}") from None
    else:
        raise ValueError(f"--config {path}: expected a .yaml, .yml or .toml file")
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of field: value at the top level")
    return data


def parse_overrides(items: list[str]) -> dict:
    """`["lr=1e-3", "num_nextn_predict_layers=1"]` -> {"lr": 0.001, ...}; values are read as YAML scalars/lists."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is invalid: expected field=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; a user means the number
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        section, dot, name = key.partition(".")
        if dot:  # `parallel.ep=2` sets field ep of the section `parallel`
            if not name or not isinstance(out.setdefault(section, {}), dict):
                raise ValueError(f"override {item!r} is invalid: expected section.field=value")
            out[section][name] = parsed
        else:
            out[key] = parsed
    return out


# Training settings that go with a model preset (a file or field=value overrides them).
PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "tiny": dict(seq_len=64, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20, save_every=50),
    "small": dict(seq_len=128, batch_size=16, lr=3e-3, warmup_steps=20, max_steps=600, eval_every=50,
                  save_every=100),
}
PRESET_TRAINING["tiny-dense"] = PRESET_TRAINING["tiny"]
PRESET_TRAINING["small-dense"] = PRESET_TRAINING["small"]
PRESET_TRAINING["tiny-v32"] = PRESET_TRAINING["tiny"]
