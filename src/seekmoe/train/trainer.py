"""The pretraining loop: data, objective schedules, AdamW steps, auxiliary-loss-free bias updates, evaluation,
metrics and checkpoints, resumable step for step."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from .. import build_model
from ..config import ModelConfig
from ..data import PackedSequences, SequenceOrder, default_corpus, discover_corpus, prepare_data
from ..info import model_summary
from .balance import max_violation, update_router_biases
from .checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint, write_atomically
from .config import TrainConfig, stepwise
from .metrics import MetricsLog
from .optim import build_optimizer, lr_at
from .plots import plot_run

SUMMARY_FILE = "summary.json"


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss."""


@dataclass
class StepResult:
    """Losses and expert counts of one optimizer step's micro-batches."""

    loss: float
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    expert_counts: torch.Tensor | None  # [n MoE layers, E]
    tokens: int


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None = fp32). 'auto' picks bf16 where the hardware computes
    it natively (a GPU with bf16, a CPU with AVX-512 bf16 or AMX); on other CPUs bf16 is emulated and slower."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else None


def train(model_config: ModelConfig, config: TrainConfig, out: str | Path, data: list[str] | None = None,
          resume: bool = False, stop_at: int | None = None, progress: bool = True) -> dict:
    """Pretrain a model from scratch (or from OUT's newest checkpoint with `resume`) and return the run summary.

    Schedules span `config.max_steps`; `stop_at` ends the run early after that step, with a checkpoint.
    """
    out = Path(out)
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"--stop-at {stop_at} is invalid: expected a step >= 1")
    resume_from = latest_checkpoint(out) if resume else None
    if not resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ValueError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose "
                         f"another --out")
    if resume and resume_from is None:
        print(f"no complete checkpoint in {out}: starting from step 0")
    out.mkdir(parents=True, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast_dtype = resolve_precision(config.precision, device)

    # ----- data -----
    corpus = discover_corpus(data, config.data_glob) if data else default_corpus()
    tokenizer = Tokenizer.from_file(str(resume_from / "tokenizer.json")) if resume_from else None
    tokenized = prepare_data(corpus, model_config.vocab_size, config.val_fraction, config.cache_dir, tokenizer,
                             progress=progress)
    tokenizer = tokenized.tokenizer
    if tokenizer.get_vocab_size() > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but vocab_size="
                         f"{model_config.vocab_size}: set vocab_size to at least that")
    train_seqs = PackedSequences(tokenized.train_tokens, config.seq_len, "train")
    val_seqs = (PackedSequences(tokenized.val_tokens, config.seq_len, "validation")
                if len(tokenized.val_tokens) >= config.seq_len else None)
    order = SequenceOrder(len(train_seqs), config.seed)

    # ----- model and optimizer -----
    model = build_model(model_config).to(device)
    model.train()
    model.gradient_checkpointing = config.activation_checkpointing
    optimizer = build_optimizer(model, config)
    start_step, bad_steps, elapsed = 0, 0, 0.0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        order.load_state_dict(state["data"])
        start_step, bad_steps, elapsed = state["step"], state["bad_steps"], state["train_seconds"]
        print(f"resuming from {resume_from} (step {start_step})")
    forward = torch.compile(model) if config.compile else model
    moe_layers = model.moe_layers()
    base_lambda, base_gamma = model_config.mtp_loss_weight, model_config.bias_update_speed
    end_step = min(config.max_steps, stop_at or config.max_steps)
    metrics = MetricsLog(out, resume_step=start_step if resume_from else None)
    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len
    print(f"training {model_summary(model_config)['total_params'] / 1e6:.2f}M parameters on {device} "
          f"({'bf16 autocast' if autocast_dtype else 'fp32'}), {len(train_seqs):,} train sequences of "
          f"{config.seq_len} tokens, {tokens_per_step:,} tokens per step, steps {start_step + 1}..{end_step} "
          f"of {config.max_steps}", flush=True)

    def autocast():
        return (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext())

    def train_step(lam: float) -> StepResult:
        model.config.mtp_loss_weight = lam
        sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        counts = None
        for _ in range(config.grad_accum):
            ids = train_seqs.batch(order.take(config.batch_size)).to(device)
            with autocast():
                result = forward(ids, labels=ids)
            (result.loss / config.grad_accum).backward()
            for key in sums:
                value = getattr(result, key)
                sums[key] += value.item() / config.grad_accum if value is not None else 0.0
            if result.expert_counts is not None:
                counts = result.expert_counts if counts is None else counts + result.expert_counts
        model.config.mtp_loss_weight = base_lambda
        return StepResult(**sums, expert_counts=counts, tokens=tokens_per_step)

    @torch.no_grad()
    def evaluate() -> float | None:
        if val_seqs is None:
            return None
        model.eval()
        n = min(len(val_seqs), config.eval_batches * config.batch_size)
        losses = []
        for start in range(0, n, config.batch_size):
            ids = val_seqs.batch(range(start, min(start + config.batch_size, n))).to(device)
            with autocast():
                losses.append(float(forward(ids, labels=ids).lm_loss))
        model.train()
        return sum(losses) / len(losses)

    def checkpoint_state(step: int) -> dict:
        return {"step": step, "data": order.state_dict(), "bad_steps": bad_steps, "train_seconds": elapsed,
                "lr": lr_at(step - 1, config), "train_config": config.to_dict()}

    bar = tqdm(total=config.max_steps, initial=start_step, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    record: dict = {}
    try:
        for step in range(start_step, end_step):
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            lam = base_lambda * stepwise(config.mtp_loss_weight_schedule, step, config.max_steps)
            gamma = base_gamma * stepwise(config.bias_update_speed_schedule, step, config.max_steps)
            t0 = time.perf_counter()
            result = train_step(lam)
            record = {"step": step + 1, "loss": result.loss, "lm_loss": result.lm_loss, "mtp_loss": result.mtp_loss,
                      "balance_loss": result.balance_loss, "lr": lr, "mtp_loss_weight": lam,
                      "bias_update_speed": gamma}
            if not math.isfinite(result.loss):
                optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                record["skipped"] = "non-finite loss"
                print(f"step {step + 1}: loss is {result.loss}; step skipped ({bad_steps} in a row)", flush=True)
                if bad_steps >= config.max_bad_steps:
                    metrics.write(record)
                    raise TrainingDiverged(
                        f"training stopped at step {step + 1}: {bad_steps} consecutive steps had a non-finite loss "
                        f"(max_bad_steps={config.max_bad_steps}); lower lr (now {config.lr}) or check the data")
            else:
                bad_steps = 0
                if config.grad_clip > 0:
                    record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if result.expert_counts is not None:
                    update_router_biases(moe_layers, result.expert_counts, gamma)
            dt = time.perf_counter() - t0
            elapsed += dt
            record["tokens_per_s"] = result.tokens / dt
            if result.expert_counts is not None:
                vio = max_violation(result.expert_counts)
                record["max_vio"] = float(vio.mean())
                record["max_vio_worst"] = float(vio.max())
                load = result.expert_counts.double()
                record["expert_load"] = (load / load.mean(dim=-1, keepdim=True)).round(decimals=3).tolist()
            done = step + 1
            if done % config.eval_every == 0 or done == config.max_steps:
                val = evaluate()
                if val is not None:
                    record["val_loss"] = val
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{lr:.2e}",
                            **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
            if done % config.save_every == 0 or done == end_step:
                save_checkpoint(out, done, model, tokenizer, optimizer, checkpoint_state(done),
                                config.keep_checkpoints)
    finally:
        bar.close()
        metrics.close()

    if end_step < config.max_steps:
        print(f"stopped after step {end_step} of {config.max_steps} (--stop-at); continue with --resume")
        return {"stopped_at": end_step}

    def write_final(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save(str(tmp / "tokenizer.json"))

    write_atomically(out / "final", write_final)
    summary = _summary(out, model_config, config, tokenized, elapsed, autocast_dtype, device)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    plots = plot_run(out)
    print(f"final model: {out / 'final'}" + (f"; plots: {', '.join(map(str, plots))}" if plots else ""))
    return summary


def _summary(out: Path, model_config: ModelConfig, config: TrainConfig, tokenized, train_seconds: float,
             autocast_dtype, device: torch.device) -> dict:
    """The figures a user wants after a run, read back from metrics.jsonl."""
    from .metrics import read_metrics

    records = [r for r in read_metrics(out) if "skipped" not in r]
    tail = records[-min(10, len(records)):]
    evals = [r for r in records if "val_loss" in r]
    sizes = model_summary(model_config)
    counts = np.bincount(np.asarray(tokenized.train_tokens), minlength=model_config.vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    tokens = config.max_steps * config.batch_size * config.grad_accum * config.seq_len
    return {
        "total_params": sizes["total_params"],
        "active_params": sizes["active_params"],
        "steps": config.max_steps,
        "tokens_trained": tokens,
        "train_seconds": train_seconds,  # optimizer steps only: no evaluation, checkpoints or data preparation
        "tokens_per_s": tokens / train_seconds,
        "precision": "bf16 autocast" if autocast_dtype else "fp32",
        "device": str(device),
        "final_train_loss": sum(r["lm_loss"] for r in tail) / len(tail),
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "unigram_entropy": float(-(p * np.log(p)).sum()),
        "max_vio": sum(r.get("max_vio", 0.0) for r in tail) / len(tail),
        "max_vio_worst": max(r.get("max_vio_worst", 0.0) for r in tail),
        "data": {k: tokenized.meta[k] for k in ("corpus", "files", "train", "val", "tokenizer_s", "tokenize_s")},
        "model_dir": str((out / "final").resolve()),
    }
