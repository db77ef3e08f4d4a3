"""Checking a model before anything is allocated: config.json read with limits (size, nesting, a JSON object), its
sizes held to bounds, and the memory its weights (or a training run's state) need held against what this machine
has, with the arithmetic in the refusal. checkpoint.py then compares the safetensors headers with the config on the
meta device, so a hostile or mismatched folder never allocates a tensor.

Who calls it: `ModelConfig.from_json_file` (every command reading a folder), `from_pretrained` (checkpoint.py),
`load_run_config` and the Trainer (train/).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from .config import ModelConfig

MAX_CONFIG_BYTES = 1 << 20  # a DeepSeek config.json is ~2 KB; a vision-language one ~10 KB
MAX_JSON_DEPTH = 32  # DeepSeek's configs nest 3 deep (quantization_config, rope_scaling)

# Upper bounds far past every published model (DeepSeek-V3: 61 layers, 1 MTP layer, hidden 7168, 256 experts,
# vocab 129280, 128 heads) that keep the meta-device skeleton of a hostile config.json a fraction of a second away.
BOUNDS = {
    "num_hidden_layers": 1024,
    "num_nextn_predict_layers": 32,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "vocab_size": 1 << 23,
    "num_attention_heads": 4096,
    "index_n_heads": 4096,
    "index_head_dim": 1 << 14,
    "index_topk": 1 << 24,
    "n_routed_experts": 1 << 14,
    "n_shared_experts": 1024,
    "num_experts_per_tok": 1 << 14,
    "n_group": 1 << 14,
    "topk_group": 1 << 14,
    "kv_lora_rank": 1 << 16,
    "q_lora_rank": 1 << 16,
    "qk_rope_head_dim": 1 << 12,
    "qk_nope_head_dim": 1 << 12,
    "v_head_dim": 1 << 12,
    "first_k_dense_replace": 1024,
    "max_position_embeddings": 1 << 26,
    # DeepSeek-V4 (V4-Pro: head_dim 512, 16 output groups, 64 indexer heads, window 128, 4 streams)
    "head_dim": 1 << 12,
    "o_groups": 4096,
    "o_lora_rank": 1 << 16,
    "index_n_heads": 4096,
    "index_head_dim": 1 << 12,
    "hc_mult": 64,
    "hc_sinkhorn_iters": 1000,
    "sliding_window": 1 << 26,
}

# Bytes a parameter costs in a training run: fp32 weight, fp32 gradient, AdamW's two fp32 moments.
TRAINING_BYTES_PER_PARAM = 16

_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)


def read_config_json(path: str | os.PathLike) -> dict:
    """The JSON object in `path` (a config.json), refused with one clear line when it is too big, nests deeper
    than MAX_JSON_DEPTH, is not JSON, or is not an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is {size:,} bytes: expected a config.json of at most {MAX_CONFIG_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    depth = _max_depth(text)
    if depth > MAX_JSON_DEPTH:
        # json.loads recurses once per level: checked first, so a 100,000-deep file is no RecursionError.
        raise ValueError(f"{path} nests more than {MAX_JSON_DEPTH} levels deep: expected a config.json of at most "
                         f"{MAX_JSON_DEPTH}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}: expected an object of config fields "
                         f'({{"hidden_size": ..., "num_hidden_layers": ...}})')
    return data


def _max_depth(text: str, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep brackets nest in the JSON `text`, strings skipped (one pass, no recursion); the scan stops at the
    first bracket past `limit` and reports that depth."""
    depth = deepest = 0
    for m in _JSON_TOKEN.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                return depth
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of `path` (a config.json or a folder holding one), read safely and held to BOUNDS (of a
    vision-language folder: its language model's)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    raw = read_config_json(path)
    if raw.get("model_type") == "kimi_k25":  # a vision-language folder: its language model's config
        from .vision.config import text_config_dict

        raw = text_config_dict(raw, str(path))
    elif raw.get("model_type") == "deepseek_ocr2":
        from .vision.ocr2_config import ocr2_text_config_dict

        raw = ocr2_text_config_dict(raw, str(path))
    return config_from_dict(raw, str(path))


def config_from_dict(raw: dict, source: str) -> ModelConfig:
    """ModelConfig.from_dict of a config.json dict from `source`, held to BOUNDS before and after."""
    check_config_bounds(raw, source)
    try:
        config = ModelConfig.from_dict(raw)
    except (TypeError, AttributeError) as e:  # a field of the wrong JSON type (rope_scaling a list, say)
        raise ValueError(f"{source}: {e}") from None
    check_config_bounds(config, source)
    return config


def check_config_bounds(config: ModelConfig | dict, source: str = "ModelConfig") -> None:
    """Raise ValueError naming the first field of `config` (a ModelConfig, or a config.json dict not yet read into
    one, whose own checks may loop over every layer) above its BOUNDS entry."""
    for name, limit in BOUNDS.items():
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit:
            raise ValueError(f"{source}: {name}={value:,} is out of bounds: expected at most {limit:,} (far past "
                             f"every published model)")


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free for new tensors on `device`, where the figure comes from)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages"
    except (ValueError, OSError, AttributeError):
        return 1 << 62, "unknown (not checked)"


def ranks_on_this_machine() -> int:
    """Processes of this run sharing this machine's memory (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_fits_memory(config: ModelConfig, bytes_per_param: int, what: str, device: torch.device,
                      shards: int = 1, ranks_here: int = 1, source: str = "the config") -> None:
    """Refuse, with the arithmetic, a model whose `bytes_per_param` x parameters, split over `shards` ranks, cannot
    fit `device`'s free memory (on a CPU shared by `ranks_here` ranks of the run)."""
    from .info import parameter_count

    check_config_bounds(config, source)  # counting walks the layers once: bounded first
    params = parameter_count(config)
    total = params * bytes_per_param
    per_rank = math.ceil(total / shards)
    shared = ranks_here if device.type != "cuda" else 1
    need = per_rank * shared
    have, origin = available_memory(device)
    if need <= have:
        return
    arithmetic = f"{_count(params)} parameters x {bytes_per_param} bytes ({what}) = {_bytes(total)}"
    if shards > 1:
        arithmetic += f", / {shards} ranks = {_bytes(per_rank)} a rank"
    if shared > 1:
        arithmetic += f", x {shared} ranks on this machine = {_bytes(need)}"
    raise ValueError(f"{source} does not fit in memory: {arithmetic}, but {device.type} has {_bytes(have)} "
                     f"available ({origin}); use a machine with more memory, or shard it over more machines with "
                     f"torchrun")


def _count(n: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _bytes(n: float) -> str:
    for scale, suffix in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n:.0f} B"
