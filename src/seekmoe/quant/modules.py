"""Quantized stand-ins for a model's linears, embeddings and routed experts, swapped in from outside the model.

`quantize_model(model, spec)` walks a CausalLM and replaces, in place:
- every RoutedExperts by a QuantizedExperts: each expert's gate/up and down matrices quantized on their own rows
  (per expert, per output channel or group), run by kernels.py with the same (rows, weights, plan) interface;
- every nn.Linear of attention, shared experts, dense MLPs and MTP projections by a QuantizedLinear, except MLA's
  kv_b_proj, whose weight the absorbed decoding attention reads directly (and which is small: kv_lora_rank wide);
- with `embeddings=True`, the token embedding and the output head too (by default they keep the model's dtype, as
  llama.cpp's Q4_K_M keeps its output tensor at 6 bits: they are where quantization error costs the most).
The routers and norms keep the model's dtype.

A provider of weight_providers (model/experts.py) hands dense [E, ...] stacks on to the experts' kernels; quantized
stacks are not dense weights and must never be dequantized whole per token, so quantized experts are a module of
their own, like the linears: no class swap, and the model classes are untouched.

Every width is checked against the scheme before anything is replaced, so an int4 group size that does not divide
a width fails with nothing changed. Quantize after the model has its final dtype: a later `.to(dtype)` casts the
float parts only (codes and scales keep their types), but the dequantized embedding's dtype and the experts'
backend were chosen for the dtype at quantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.experts import RoutedExperts, select_backend
from ..model.grouped_swiglu import grouped_swiglu
from .formats import QuantSpec, dequantize, quantize
from .kernels import DECODE_ROWS, gathered_quantized_swiglu, quantized_linear

# kv_b_proj is read as a matrix by the absorbed MLA decoding path; the lightning indexer's projections (V3.2, V4)
# pick which tokens attention sees, and int8 rounding there changes the picks (tiny-v32: logits 0.10 off, not 0.006).
UNQUANTIZED_LINEARS = ("kv_b_proj", "wq_b", "wk", "weights_proj")


class QuantizedTensor(nn.Module):
    """One quantized weight: buffers `qweight` and `scale` (formats.py's layout); the state-dict keys
    NAME.qweight and NAME.scale stand where NAME.weight (or the experts' NAME stack) stood."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def _apply(self, fn, recurse=True):
        # Moves only: a cast of the model (`.to(bfloat16)`) must not touch int4's fp16 scales or int8's fp32 ones.
        for name in ("qweight", "scale"):
            t = getattr(self, name)
            moved = fn(t)
            setattr(self, name, moved if moved.dtype == t.dtype else t.to(moved.device))
        return self


class QuantizedLinear(nn.Module):
    """y = x W^T (no bias) with W int8 or int4 (`weight.qweight`, `weight.scale`)."""

    def __init__(self, weight: QuantizedTensor, spec: QuantSpec, in_features: int, out_features: int):
        super().__init__()
        self.weight = weight
        self.spec, self.in_features, self.out_features = spec, in_features, out_features
        self.fused = False  # set by configure_quantized: compiled decoding multiplies in one fused loop

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: QuantSpec) -> "QuantizedLinear":
        if linear.bias is not None:
            raise ValueError("QuantizedLinear has no bias: every seekmoe linear is bias-free")
        return cls(QuantizedTensor(*quantize(linear.weight, spec)), spec, linear.in_features, linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fused multiply-and-sum pays for a few rows only (each row re-reads the codes): kernels.DECODE_ROWS.
        return quantized_linear(x, self.weight.qweight, self.weight.scale, self.spec.scheme, self.fused)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.spec.to_json()}"


class QuantizedEmbedding(nn.Module):
    """The token embedding with int8/int4 rows, dequantized on lookup to `dtype`."""

    def __init__(self, weight: QuantizedTensor, spec: QuantSpec, dtype: torch.dtype):
        super().__init__()
        self.weight, self.spec, self.dtype = weight, spec, dtype

    @classmethod
    def from_float(cls, embedding: nn.Embedding, spec: QuantSpec) -> "QuantizedEmbedding":
        return cls(QuantizedTensor(*quantize(embedding.weight, spec)), spec, embedding.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q, s = self.weight.qweight, self.weight.scale
        flat = ids.reshape(-1)
        rows = dequantize(q.index_select(0, flat), s.index_select(0, flat), self.spec.scheme, self.dtype)
        return rows.view(*ids.shape, -1)


class QuantizedExperts(nn.Module):
    """RoutedExperts with quantized stacks `gate_up_proj` (qweight/scale of [E, 2I, hidden]) and `down_proj`
    ([E, hidden, I]); forward(rows, weights, plan) as RoutedExperts'. Rows fewer than experts (decoding) go through
    their own experts only (gathered, fused when compiled); more (prefill) through the dequantized stacks and the
    grouped GEMM that RoutedExperts would choose."""

    def __init__(self, gate_up: QuantizedTensor, down: QuantizedTensor, spec: QuantSpec, n_experts: int,
                 hidden_size: int, intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up, down
        self.spec, self.dtype = spec, dtype  # dtype: the float weights' (what the activations arrive in)
        self.n_experts, self.hidden_size, self.intermediate_size = n_experts, hidden_size, intermediate_size
        self.fused = False
        self.select_backend()

    def select_backend(self) -> None:
        """The grouped GEMM for prefill and the bf16-in-fp32 choice, from experts.py's table, once per device (its
        probes must not run inside a compiled forward: issue 24's bug)."""
        device = self.gate_up_proj.qweight.device
        device = device if device.type != "meta" else torch.device("cpu")
        self.backend = select_backend(device, self.dtype, False, False, self.hidden_size, self.intermediate_size)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.select_backend()
        return out

    @classmethod
    def from_float(cls, experts: RoutedExperts, spec: QuantSpec) -> "QuantizedExperts":
        gate_up, down = experts.expert_weights()  # through the providers: what the experts really compute with
        return cls(QuantizedTensor(*quantize(gate_up, spec)), QuantizedTensor(*quantize(down, spec)), spec,
                   experts.n_experts, experts.hidden_size, experts.intermediate_size, gate_up.dtype)

    def forward(self, rows: torch.Tensor, weights: torch.Tensor, plan) -> torch.Tensor:
        device_type = rows.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else rows.dtype
        backend = self.backend
        compute = torch.float32 if backend.bf16_in_fp32 and dtype == torch.bfloat16 else dtype
        gu, dn = self.gate_up_proj, self.down_proj
        # Compiled decoding traces the fused loops (or, unfused, one graph for every shape); eager on a CPU, int8's
        # few rows take integer products and everything else converts each used expert on its own (_per_expert):
        # gathered or whole-stack conversions make [rows or E, out, in] float temporaries, ~10x slower per weight
        # at DeepSeek-V2-Lite's widths. Eager fused loops only for a few rows (their temporaries are [rows, out, in]).
        n, few, scheme = rows.shape[0], rows.shape[0] <= DECODE_ROWS, self.spec.scheme
        if torch.compiler.is_compiling():
            path = "gathered" if self.fused or n < self.n_experts else "grouped"  # a shape rule once compiled
        elif rows.device.type == "cpu":
            path = "gathered" if few and (self.fused or scheme == "int8") else "per_expert"
        else:
            path = "gathered" if n < self.n_experts else "grouped"
        with torch.autocast(device_type, enabled=False):
            if path == "gathered":
                y = gathered_quantized_swiglu(rows.to(compute), weights.float(), (gu.qweight, gu.scale),
                                              (dn.qweight, dn.scale), plan.expert, scheme, self.fused, compute)
            elif path == "grouped":
                layout = "ragged" if backend.many_rows == "grouped_mm" else "padded"
                y = grouped_swiglu(rows.to(compute), weights.float(), dequantize(gu.qweight, gu.scale, scheme, compute),
                                   dequantize(dn.qweight, dn.scale, scheme, compute), plan.offsets, layout)[0]
            else:
                y = self._per_expert(rows.to(compute), weights.float(), plan, compute)
        return y.to(dtype)

    def _per_expert(self, rows: torch.Tensor, weights: torch.Tensor, plan, compute: torch.dtype) -> torch.Tensor:
        """Eager on a CPU: each expert that has rows dequantized once, on its own, and applied to its rows
        (grouped in expert order by the dispatcher): only the experts in use are converted, and one expert's float
        weights at a time are alive, not the whole stack's (1.5 GB in fp32 for one DeepSeek-V2-Lite gate_up stack)."""
        gu, dn, scheme = self.gate_up_proj, self.down_proj, self.spec.scheme
        out = rows.new_empty(rows.shape[0], self.hidden_size)
        ends = plan.offsets.tolist()  # one host read of the group ends
        for e, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
            if end == start:
                continue
            gate, up = F.linear(rows[start:end], dequantize(gu.qweight[e], gu.scale[e], scheme, compute)).float() \
                .chunk(2, dim=-1)
            a = (F.silu(gate) * (up * weights[start:end, None])).to(compute)
            out[start:end] = F.linear(a, dequantize(dn.qweight[e], dn.scale[e], scheme, compute))
        return out

    def extra_repr(self) -> str:
        return f"{self.n_experts} experts, {self.spec.to_json()}"


def _targets(model: nn.Module, embeddings: bool):
    """(parent, attribute name, module, what) for every module quantize_model replaces."""
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, RoutedExperts):
                yield parent, name, child, full
            elif isinstance(child, nn.Linear) and name not in UNQUANTIZED_LINEARS and (embeddings or name != "lm_head"):
                yield parent, name, child, full
            elif isinstance(child, nn.Embedding) and embeddings:
                yield parent, name, child, full


def quantize_model(model: nn.Module, spec: QuantSpec, embeddings: bool = False) -> nn.Module:
    """Replace `model`'s routed experts and linears (and with `embeddings`, its embedding and head) by quantized
    ones, in place (see the module docstring); records the choice as `model.quantization`. Returns `model`."""
    targets = list(_targets(model, embeddings))
    for _, _, module, full in targets:  # every width first: a bad group size changes nothing
        if isinstance(module, RoutedExperts):
            spec.check_width(module.hidden_size, f"{full}.gate_up_proj")
            spec.check_width(module.intermediate_size, f"{full}.down_proj (moe_intermediate_size)")
        else:
            spec.check_width(module.weight.shape[1], f"{full}")
    for parent, name, module, _ in targets:
        if isinstance(module, RoutedExperts):
            new = QuantizedExperts.from_float(module, spec)
        elif isinstance(module, nn.Embedding):
            new = QuantizedEmbedding.from_float(module, spec)
        else:
            new = QuantizedLinear.from_float(module, spec)
        setattr(parent, name, new)
    model.quantization = {**spec.to_json(), "embeddings": embeddings}
    return model


def configure_quantized(model: nn.Module, compiled: bool) -> None:
    """Choose, once, how `model`'s quantized modules multiply: fused multiply-and-sum loops for compiled decoding,
    dense kernels on dequantized weights otherwise (kernels.py's docstring)."""
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, QuantizedExperts)):
            module.fused = compiled


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every quantized weight (codes and scales) of `model`."""
    return sum(t.qweight.nbytes + t.scale.nbytes for t in model.modules() if isinstance(t, QuantizedTensor))


