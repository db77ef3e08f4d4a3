"""Matrix products with int8/int4 weights (formats.py), for decoding on a CPU where reading the weights is the cost.

Decoding multiplies a few rows by each weight once per token, so its time is the bytes of weights read: the point
of 1- and 0.5-byte weights is to read only those bytes. Which product runs is chosen once per module (`fused`, set
for compiled decoding) and by the rows' count (DECODE_ROWS: decoding's few rows, or prefill's many):

- fused (compiled decoding): the product is written as elementwise multiply-and-sum with the dequantization inside
  it, so that inductor fuses the gather of the experts' codes, their conversion and the reduction into one loop
  that reads each code byte once and never materializes a float weight. int4 uses llama.cpp's Q4_0 nibble order
  (formats.py) so both nibbles meet contiguous inputs. At the 289M model's expert shapes (benchmarks/README.md,
  `quant_decode.py --kernels`, 1 thread) this runs 2.4x (int8) and 1.6x (int4) faster than compiled fp32.
  What limits it is arithmetic, not bandwidth: inductor's loop converts every code to fp32 (no integer dot
  products), so int8 reads ~14 GB/s and int4 ~9 G weights/s (5 GB/s) a thread, where fp32 reads 20-25.
- eager int8 on a CPU, few rows: the rows are rounded to int8 (one scale a row) and multiplied by the codes in
  integers (torch._int_mm: oneDNN's VNNI kernels), reading each expert's or linear's bytes in place: 7x faster
  than torch's weight-only `_weight_int8pack_mm` (torchao's int8 CPU path) on the experts, 2x faster than fp32's
  GEMV on a linear. The rounding is the one approximation beyond the weights' (bounded: int8_dynamic_matmul).
- otherwise (eager int4, prefill, other devices): the weights are dequantized to the activations' dtype and
  multiplied by torch's dense kernels — except int8 prefill on a CPU, through `_weight_int8pack_mm`.

Accumulation is fp32 (int32 for the integer products); results come back in the activations' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import dequantize

DECODE_ROWS = 8  # up to this many rows a product is decoding's (fused or integer); more are prefill's (dense)


def fused_rows_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """Each row times its own quantized matrix: x [M, in], qweight/scale the M rows' weights ([M, out, in] int8
    codes and [M, out] scales, or [M, out, in/2] packed int4 and [M, out, G]) -> [M, out] fp32, as multiply-and-sum
    (one fused loop once compiled; see the module docstring)."""
    x = x.float()
    if scheme == "int8":
        return (qweight.float() * x.unsqueeze(1)).sum(-1) * scale.float()
    M, out, G = scale.shape
    # A group's byte j holds column j (low nibble) and column j + g/2 (high; formats.py), so both nibbles meet
    # contiguous halves of the inputs. With byte p = low + 16 * high, low * x_low + high * x_high equals
    # low * (x_low - x_high / 16) + p * (x_high / 16): a mask and two conversions a byte, no shift; and the codes'
    # offset 8 comes off as 8 * (the group's input sum), spread over the group's bytes so the loop stays one
    # multiply-and-sum (inductor then reads each code byte once, in one vectorized loop).
    packed = qweight.view(M, out, G, -1)  # [M, out, G, g/2]
    half = packed.shape[-1]
    groups = x.view(M, 1, G, 2, half)
    x_high = groups[..., 1, :] * (1 / 16)
    x_low = groups[..., 0, :] - x_high
    offset = groups.sum((-2, -1)).unsqueeze(-1) * (8 / half)  # [M, 1, G, 1]
    terms = (packed & 15).float() * x_low + packed.float() * x_high - offset
    return (terms * scale.float().unsqueeze(-1)).sum((-2, -1))


def rows_to_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, in] rounded per row to int8 codes and their fp32 scale [M, 1] (the row's largest magnitude / 127), as
    llama.cpp rounds activations before its integer dot products (it per 32 inputs; one scale a row here, what one
    integer matrix product can take)."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


def int8_dynamic_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, in] times the int8 weight's transpose (codes [out, in], scales [out]) -> [M, out] fp32, with x rounded
    to int8 per row (rows_to_int8): integer dot products (torch._int_mm; oneDNN's VNNI kernels on x86 CPUs) read
    each code byte in place and multiply four a lane per instruction, where a float product converts every code.
    The rounding moves each input by at most half its row's step, so each output by at most
    sum_k |w_k| * x_scale / 2 beyond the float product on the dequantized weight."""
    codes, x_scale = rows_to_int8(x)
    return torch._int_mm(codes, qweight.t()).float() * (x_scale * scale.float())


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, scheme: str,
                     fused: bool) -> torch.Tensor:
    """x [..., in] @ W^T for W = dequantize(qweight, scale) [out, in]: [..., out] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    rows = x2.shape[0]
    if fused and rows <= DECODE_ROWS:
        y = fused_rows_matmul(x2, qweight.expand(rows, *qweight.shape), scale.expand(rows, *scale.shape), scheme)
    elif scheme == "int8" and x2.device.type == "cpu" and rows <= DECODE_ROWS:
        y = int8_dynamic_matmul(x2, qweight, scale)
    elif scheme == "int8" and x2.device.type == "cpu":
        y = torch._weight_int8pack_mm(x2.contiguous(), qweight, scale.to(x2.dtype))
    else:
        y = F.linear(x2, dequantize(qweight, scale, scheme, x2.dtype))
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def gathered_quantized_swiglu(rows: torch.Tensor, weights: torch.Tensor, gate_up: tuple[torch.Tensor, torch.Tensor],
                              down: tuple[torch.Tensor, torch.Tensor], expert: torch.Tensor, scheme: str,
                              fused: bool, compute: torch.dtype) -> torch.Tensor:
    """down( w * silu(gate) * up ) of each row through its own expert, with quantized expert stacks: rows
    [M, hidden], weights [M] fp32, gate_up = (qweight, scale) of [E, 2I, hidden], down = of [E, hidden, I],
    expert [M] -> [M, hidden] in `compute`. Only the M rows' experts are read (index_select of their codes)."""
    (gu_q, gu_s), (dn_q, dn_s) = gate_up, down
    if not fused and scheme == "int8" and rows.device.type == "cpu":
        return _int8_rows_swiglu(rows, weights, gate_up, down, expert).to(compute)
    if fused:
        h = fused_rows_matmul(rows, gu_q.index_select(0, expert), gu_s.index_select(0, expert), scheme)
    else:
        h = _gathered_matvec(rows.to(compute), dequantize(gu_q.index_select(0, expert),
                                                          gu_s.index_select(0, expert), scheme, compute)).float()
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate) * (up * weights.unsqueeze(-1))  # [M, I] fp32
    if fused:
        return fused_rows_matmul(a, dn_q.index_select(0, expert), dn_s.index_select(0, expert), scheme).to(compute)
    return _gathered_matvec(a.to(compute), dequantize(dn_q.index_select(0, expert), dn_s.index_select(0, expert),
                                                      scheme, compute))


def _gathered_matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Row j of x [M, in] times w[j]^T ([M, out, in]) -> [M, out]. As [M, 1, in] @ [M, in, out]: measured 12x faster
    on a CPU (one thread, fp32 and bf16) than bmm(w, x[..., None]), whose one-column products miss the fast path."""
    return torch.bmm(x.unsqueeze(1), w.transpose(1, 2)).squeeze(1)


def _int8_rows_swiglu(rows, weights, gate_up, down, expert) -> torch.Tensor:
    """gathered_quantized_swiglu for int8 in eager mode on a CPU -> [M, hidden] fp32: integer products
    (int8_dynamic_matmul) row by row, each reading its expert's int8 bytes in place (no gathered copy, no float
    weights; one host read of the expert ids), the rows rounded to int8 once a projection."""
    (gu_q, gu_s), (dn_q, dn_s) = gate_up, down
    ids = expert.tolist()

    def project(x, codes, scales):
        x8, x_scale = rows_to_int8(x)
        y = [torch._int_mm(x8[j: j + 1], codes[e].t()) for j, e in enumerate(ids)]
        return torch.cat(y).float() * (x_scale * scales.index_select(0, expert).float())

    if not ids:
        return rows.new_zeros(0, dn_q.shape[1], dtype=torch.float32)
    gate, up = project(rows, gu_q, gu_s).chunk(2, dim=-1)
    return project(F.silu(gate) * (up * weights.unsqueeze(-1)), dn_q, dn_s)
