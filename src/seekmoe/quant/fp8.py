"""FP8 training (`precision=fp8`): the linears of attention, dense MLPs and shared experts multiply in float8 through
torchao, on CUDA GPUs with float8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell).

Scaling, finest first where the GPU and widths allow it:
- "blockwise": DeepSeek-V3's fine-grained scaling (1 x 128 tiles of activations, 128 x 128 blocks of weights), torchao's
  Float8BlockwiseLinear (a prototype: Hopper, compute capability 9.x, widths multiples of 128, triton);
- "rowwise": one scale per row of each operand (torchao's ROWWISE recipe, scales rounded to powers of two);
everything else in bf16 autocast. As in DeepSeek-V3, the embedding, the output head, the routers and the norms stay
in higher precision; so do the routed experts, whose grouped GEMMs torchao's linear conversion does not reach (its
moe_training prototype's fp8 grouped GEMM would be the next step). The swapped modules are nn.Linear subclasses
with the same `weight`, so checkpoints keep their layout.
"""

from __future__ import annotations

import torch
from torch import nn

RECIPES = ("blockwise", "rowwise")
_KEEP = ("lm_head", "kv_b_proj")  # the head stays high precision; kv_b_proj is read as a matrix by absorbed MLA


def check_fp8_training(device: torch.device) -> None:
    """ValueError, in one line, unless FP8 training can run on `device` (CUDA, capability 8.9+, torchao)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"precision=fp8 needs a CUDA GPU with float8 tensor cores (compute capability 8.9+), but "
                         f"this run is on {device.type}: expected precision=bf16, fp32 or auto")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"precision=fp8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell): this GPU "
                         f"has {capability[0]}.{capability[1]}; expected precision=bf16")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ValueError("precision=fp8 needs torchao: pip install 'seekmoe[quant]' (torchao>=0.12)") from None


def _eligible(module: nn.Module, name: str, multiple: int) -> bool:
    return (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in _KEEP
            and module.in_features % multiple == 0 and module.out_features % multiple == 0)


def fp8_recipe(model: nn.Module, device: torch.device) -> str:
    """The finest scaling this GPU and these widths allow: blockwise on Hopper when every eligible linear's widths
    are multiples of 128, rowwise otherwise."""
    if torch.cuda.get_device_capability(device)[0] != 9:
        return "rowwise"
    try:
        from torchao.prototype.blockwise_fp8_training.linear import Float8BlockwiseLinear  # noqa: F401
    except ImportError:
        return "rowwise"
    linears = [(n, m) for n, m in model.named_modules() if _eligible(m, n, 16)]
    return "blockwise" if linears and all(_eligible(m, n, 128) for n, m in linears) else "rowwise"


def convert_to_fp8_training(model: nn.Module, device: torch.device, recipe: str | None = None) -> str:
    """Swap the eligible linears of `model` for torchao's float8 training linears, in place; returns the recipe
    used (`recipe` None = fp8_recipe's choice). Call before parallelizing and compiling."""
    check_fp8_training(device)
    recipe = recipe or fp8_recipe(model, torch.device(device))
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r} is unknown: expected one of {RECIPES}")
    if recipe == "blockwise":
        from torchao.prototype.blockwise_fp8_training.linear import Float8BlockwiseLinear

        for parent_name, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                full = f"{parent_name}.{name}" if parent_name else name
                if _eligible(child, full, 128):
                    setattr(parent, name, Float8BlockwiseLinear.from_float(child))
        return recipe
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    # torch._scaled_mm needs both widths divisible by 16.
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("rowwise"),
                               module_filter_fn=lambda m, name: _eligible(m, name, 16))
    return recipe
