"""The pretraining loop, in parts that other stages reuse: `TrainData` (data.py) feeds `TrainStep` (step.py); the
`Trainer` here sets a run up (model, optimizer, resume), steps it, evaluates, checkpoints, reports, and stops
cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import errno
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from .. import build_model
from ..config import ModelConfig
from ..inference.tokenizer import read_tokenizer_file, write_tokenizer_files
from ..info import model_summary
from ..lora.apply import apply_lora
from ..lora.load import load_quantized
from ..lora.run import lora_for_run, merged_final, save_lora_outputs
from ..model.moe import device_groups_for
from ..model_folder import TRAINING_BYTES_PER_PARAM, check_fits_memory, ranks_on_this_machine
from ..parallel import ParallelConfig, init_processes, parallelize
from ..progress import show_progress
from .balance import max_violation
from .checkpointing import load_checkpoint, save_checkpoint, save_model_folder
from .config import TrainConfig, stepwise
from .data import TrainData, select_corpus
from .freeze import select_trainable
from .metrics import MetricsLog
from .onboarding import NewExpertOnboarding
from .optim import build_optimizer, lr_at
from .plots import plot_run
from .resume import plan_start, prepare_out
from .step import Forward, StepResult, TrainStep, autocast_context, language_model_forward

SUMMARY_FILE = "summary.json"


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or non-finite gradients."""


class TrainingInterrupted(RuntimeError):
    """The run was asked to stop (Ctrl-C, SIGTERM) and saved a checkpoint first."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def exit_status(command: str, run) -> int:
    """Call `run()` for `seekmoe COMMAND`: 0 when it finishes, 1 when training diverged, 128 + the signal when it
    was stopped (after saving a checkpoint), 2 when the disk is full; the reason goes to stderr."""
    import sys

    try:
        run()
    except TrainingDiverged as e:
        print(f"seekmoe {command}: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"seekmoe {command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:
        full = disk_full(e)
        if full is None:
            raise
        # A full disk is the user's to fix, not a bug: one line (not 30 of traceback), and checkpoints are written
        # atomically, so the newest complete one is still there to resume from.
        print(f"seekmoe {command}: error: no space left on device{full}: free some space, then run the same "
              f"command with --resume", file=sys.stderr)
        return 2
    return 0


def disk_full(error: BaseException) -> str | None:
    """' writing PATH' (or '') if `error`, or an error it was raised from, is a full disk or quota; else None.
    safetensors reports it as its own error type with the OS error in its text, so the text is checked too."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return f" writing {seen.filename}" if seen.filename else ""
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return ""
        seen = seen.__cause__ or seen.__context__
    return None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None = fp32). 'auto' picks bf16 where the hardware computes
    it natively (a GPU with bf16, a CPU with AVX-512 bf16 or AMX); on other CPUs bf16 is emulated and slower."""
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp8"):  # fp8: float8 linears (quant/fp8.py), bf16 autocast around them
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else None


class StopSignals:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step; a second SIGINT aborts at
    once. Installed only in the main thread (signal handlers cannot be set elsewhere)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now, without a checkpoint
        self.signum = signum
        name = signal.Signals(signum).name
        print(f"\n{name} received: finishing the current step, then saving a checkpoint "
              f"(press Ctrl-C again to abort at once)", flush=True)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Trainer:
    """One training run into OUT: from scratch, or from the weights of a model folder (`init_from`), or (`resume`)
    from OUT's newest intact checkpoint when there is one (refusing when OUT holds a run but nothing intact;
    `resume="or-start"` then moves that run aside and starts over). `stop_at` ends the run early after that step,
    with a checkpoint.

    Post-training stages reuse the loop with their own data and objective: `make_data(tokenizer, rank,
    world_size)` returns the
    run's data in place of the text corpus (anything with TrainData's methods: next_micro_batches, val_batches,
    tokens_per_step, state_dict, load_state_dict, tokenizer; optionally `metrics()` added to each step's record and
    `describe()` for the start-up line), and `forward` is TrainStep's objective for its micro-batches.
    `make_model()`, when given, builds the (initialized or loaded) model in place of `model_config`'s CausalLM, in
    one process (a vision-language model: the tower in front of the language model that `model_config` describes)."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, out: str | Path,
                 data: list[str] | None = None, resume: bool | str = False, stop_at: int | None = None,
                 progress: bool = True, init_from: str | Path | None = None,
                 make_data: Callable[[Tokenizer | None, int, int], TrainData] | None = None,
                 forward: Forward | None = None, make_model: Callable[[], torch.nn.Module] | None = None):
        if stop_at is not None and stop_at < 1:
            raise ValueError(f"--stop-at {stop_at} is invalid: expected a step >= 1")
        self.model_config, self.config, self.out = model_config, config, Path(out)
        self.progress, self.stop_at, self.init_from = progress, stop_at, init_from
        self.make_model = make_model
        depth = model_config.num_nextn_predict_layers
        if depth and config.seq_len < depth + 2:
            raise ValueError(f"seq_len={config.seq_len} is too short for num_nextn_predict_layers={depth}: MTP "
                             f"depth {depth} needs sequences of at least {depth + 2} tokens (raise seq_len, or set "
                             f"num_nextn_predict_layers=0)")
        self.parallel = ParallelConfig.from_dict(config.parallel)
        self.processes = init_processes(self.parallel, model_config)  # one process unless launched by torchrun
        self.rank, self.world_size = self.processes.rank, self.processes.world_size
        self.lora = lora_for_run(config.lora, config.trainable, model_config, init_from, self.processes.distributed)
        if config.precision == "fp8":  # a CPU (or an older GPU) is refused before anything is read or written
            from ..quant.fp8 import check_fp8_training

            check_fp8_training(self.processes.device)
        # Before any data is read or tensor allocated: a model this machine cannot train is refused with the sums.
        # (With --train a subset, only the fp32 weights are counted: the frozen rest needs no gradient or moments.)
        every = config.trainable == "all" and self.lora is None
        nf4 = self.lora is not None and self.lora.quantize == "nf4"  # read block by block into NF4: ~1 byte each
        check_fits_memory(model_config, TRAINING_BYTES_PER_PARAM if every else 1 if nf4 else 4,
                          "fp32 weights, gradients and AdamW's two moments" if every else
                          "NF4 weights, fp32 embeddings" if nf4 else "fp32 weights",
                          self.processes.device, shards=self.world_size,
                          ranks_here=ranks_on_this_machine() if self.world_size > 1 else 1,
                          source=f"the model of {init_from or 'this run'}")
        self.reduce = self.processes.all_reduce_sum if self.processes.distributed else None
        plan = plan_start(self.out, resume)  # reads only; raises (touching nothing) when it must refuse
        self.resume_from = plan.checkpoint
        if resume and self.resume_from is None and not plan.move_aside:
            self.log(f"no checkpoint in {self.out}: starting from step 0")
        self.processes.barrier()  # every rank has chosen the checkpoint before rank 0 changes anything in OUT
        if self.rank == 0:
            for line in prepare_out(self.out, plan):
                self.log(line)
            self.out.mkdir(parents=True, exist_ok=True)
        self.processes.barrier()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)  # the same on every rank: every rank builds the same initial model
        self.device = self.processes.device
        # FSDP2's mixed precision policy computes in bf16 under several processes on a GPU; autocast otherwise.
        fsdp_bf16 = self.processes.distributed and (
            self.parallel.mixed_precision if self.parallel.mixed_precision is not None
            else self.device.type == "cuda" and config.precision != "fp32")
        self.parallel.mixed_precision = fsdp_bf16
        self.autocast_dtype = None if fsdp_bf16 else resolve_precision(config.precision, self.device)
        self.precision = "bf16 (FSDP2 mixed precision)" if fsdp_bf16 else (
            "fp8 linears, bf16 autocast" if config.precision == "fp8" else
            "bf16 autocast" if self.autocast_dtype else "fp32")

        tokenizer = None
        if self.resume_from is not None:
            tokenizer = read_tokenizer_file(self.resume_from / "tokenizer.json")
        elif init_from is not None:
            tokenizer = read_tokenizer_file(Path(init_from) / "tokenizer.json")
        if make_data is not None:
            self.data = make_data(tokenizer, self.rank, self.world_size)
        else:
            corpus = select_corpus(data, config)
            for turn in (0, 1):  # rank 0 tokenizes into the shared cache first; the other ranks then read it
                if (self.rank == 0) == (turn == 0):
                    self.data = TrainData(corpus, model_config.vocab_size, config, tokenizer, self.rank,
                                          self.world_size, progress=progress and self.rank == 0)
                self.processes.barrier()
        self.model = self._build_model()
        self.onboarding = NewExpertOnboarding.for_run(self.model, config.new_expert_bias_update_speed,
                                                      config.new_expert_onboarding_steps)
        self.optimizer = build_optimizer(self.model, config)
        self.start_step, self.bad_steps, self.train_seconds = 0, 0, 0.0
        if self.resume_from is not None:
            state = load_checkpoint(self.resume_from, self.model, self.optimizer)
            self.data.load_state_dict(state["data"])
            self.start_step, self.bad_steps = state["step"], state["bad_steps"]
            self.train_seconds = state["train_seconds"]
            self.log(f"resuming from {self.resume_from} (step {self.start_step})")
        self.forward = forward or language_model_forward
        self.step = TrainStep(self.model, self.optimizer, config.grad_clip, self.autocast_dtype, self.device,
                              self.reduce, config.balance_scope, self.forward)

    # ----- setup -----
    def _build_model(self) -> torch.nn.Module:
        """The model on the run's device, initialized or loaded from `init_from`, parallelized under torchrun, in
        training mode (a checkpoint being resumed is loaded afterwards, into the parallelized model).

        Under torchrun (and for any folder) the model is built on the meta device, checked against the folder's
        headers, parallelized, and only then materialized: each rank allocates and fills its own shards
        (parallel/materialize.py), so no rank holds the whole model."""
        from ..parallel.materialize import added_modules, check_folder, materialize

        if self.make_model is not None:
            if self.processes.distributed:
                raise ValueError("this stage trains in one process: run it without torchrun")
            if self.config.compile or self.config.activation_checkpointing:
                self.log("compile and activation_checkpointing are not applied to this stage's model")
            model = self.make_model().to(self.device)
            for moe in model.moe_layers():
                device_groups_for(self.model_config, moe.device_groups)
            model.train()
            return model
        if self.lora is not None and self.lora.quantize == "nf4":
            # QLoRA (one process): the base read block by block into NF4, never whole in full precision; a resumed
            # run reads it too (its checkpoint holds the same NF4 weights) and then loads the checkpoint.
            model, adapted = load_quantized(self.init_from, self.model_config, self.lora, self.device)
            self.log(f"initialized from {self.init_from} (NF4 base weights)\n{adapted.describe()}")
            for moe in model.moe_layers():
                device_groups_for(self.model_config, moe.device_groups)
            return parallelize(model, self.processes, self.parallel, compile=self.config.compile,
                               activation_checkpointing=self.config.activation_checkpointing,
                               compute_dtype=self.autocast_dtype).train()
        full_weights = None
        if self.init_from is not None and self.resume_from is None:
            full_weights = self.init_from
            self.log(f"initialized from {self.init_from}")
        if full_weights is None and not self.processes.distributed:
            model = build_model(self.model_config)  # one process, fresh: built and initialized in place
        else:
            # The weights (and router biases) of the folder, into a model of this run's config: an extension stage
            # changes rope_scaling, which lives in no tensor.
            model = build_model(self.model_config, device="meta")
            if full_weights is not None:
                check_folder(model, full_weights)
                if added_modules(model, full_weights):
                    self.log(f"{full_weights} has no lightning indexers: initializing new ones")
            if not self.processes.distributed:
                model = materialize(model, self.device, full_weights)  # one process: read straight into place
        if self.config.trainable != "all":
            self.log(select_trainable(model, self.config.trainable).describe())
        if self.lora is not None:
            # Adapters are added to the whole model on every rank, then parallelized like any parameter.
            if next(model.parameters()).is_meta:
                model = materialize(model, self.device, full_weights)
            self.log(apply_lora(model.to(self.device), self.lora).describe())
        if self.config.precision == "fp8":
            from ..quant.fp8 import convert_to_fp8_training

            self.log(f"fp8 training: {convert_to_fp8_training(model, self.device)} scaling (torchao)")
        on_meta = next(model.parameters()).is_meta
        model = parallelize(model if on_meta else model.to(self.device), self.processes, self.parallel,
                            compile=self.config.compile, activation_checkpointing=self.config.activation_checkpointing,
                            compute_dtype=self.autocast_dtype)
        if on_meta:
            model = materialize(model, self.device, full_weights)  # each rank its own shards only
        for moe in model.moe_layers():
            device_groups_for(self.model_config, moe.device_groups)
        model.train()
        return model

    def log(self, message: str) -> None:
        """Print on the first rank only."""
        if self.rank == 0:
            print(message, flush=True)

    # ----- the loop -----
    def run(self) -> dict:
        """Train to `max_steps` (or `stop_at`); returns the run summary ({"stopped_at": N} when stopped early)."""
        c = self.config
        end_step = min(c.max_steps, self.stop_at or c.max_steps)
        metrics = MetricsLog(self.out, resume_step=self.start_step if self.resume_from else None) \
            if self.rank == 0 else None
        base_lambda, base_gamma = self.model_config.mtp_loss_weight, self.model_config.bias_update_speed
        self.log(f"training {model_summary(self.model_config)['total_params'] / 1e6:.2f}M parameters on "
                 f"{self.device} x {self.world_size} process(es) ({self.precision}), "
                 + (self.data.describe() if hasattr(self.data, "describe")
                    else f"{len(self.data.train):,} train sequences of {c.seq_len} tokens") + ", "
                 f"{self.data.tokens_per_step:,} tokens per step, steps {self.start_step + 1}..{end_step} of "
                 f"{c.max_steps}")
        bar = show_progress(c.max_steps, "train", "step", enabled=self.progress and self.rank == 0,
                       initial=self.start_step)
        done = self.start_step
        try:
            with StopSignals() as signals:
                for step in range(self.start_step, end_step):
                    lr = lr_at(step, c)
                    lam = base_lambda * stepwise(c.mtp_loss_weight_schedule, step, c.max_steps)
                    gamma = base_gamma * stepwise(c.bias_update_speed_schedule, step, c.max_steps)
                    t0 = time.perf_counter()
                    result = self.step(self.data.next_micro_batches(), lr, lam, gamma)
                    if self.onboarding is not None and not result.skipped:
                        self.onboarding.after_step(step, result.expert_counts, gamma)
                    dt = time.perf_counter() - t0
                    self.train_seconds += dt
                    done = step + 1
                    record = self._record(done, result, lr, lam, gamma, dt)
                    self._check_divergence(done, result, record, metrics)
                    if done % c.eval_every == 0 or done == c.max_steps:
                        val = self.evaluate()
                        if val is not None:
                            record["val_loss"] = val
                    if metrics is not None:
                        metrics.write(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                    lr=f"{lr:.2e}",
                                    **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
                    stop = self._stop_requested(signals)
                    if done % c.save_every == 0 or done == end_step or stop:
                        self.save_checkpoint(done)
                    if c.save_hf_every and done % c.save_hf_every == 0:
                        save_model_folder(self.out / "hf" / f"step-{done:08d}", self.model, self.model_config,
                                          self.data.tokenizer, self.rank, self.processes.distributed)
                    if stop:
                        raise TrainingInterrupted(
                            f"stopped after step {done} by {signal.Signals(stop).name}; checkpoint saved in "
                            f"{self.out / 'checkpoints'}: continue with the same command and --resume", stop)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()

        if end_step < c.max_steps:
            self.log(f"stopped after step {end_step} of {c.max_steps} (--stop-at); continue with --resume")
            return {"stopped_at": end_step}
        return self.finish()

    def _stop_requested(self, signals: StopSignals) -> int | None:
        """The signal that asked to stop, or None; every rank agrees (one rank's request stops them all)."""
        if self.reduce is None:
            return signals.signum
        asked = self.reduce(torch.tensor(1.0 if signals.signum else 0.0, device=self.device))
        return (signals.signum or signal.SIGTERM) if float(asked) > 0 else None

    def _record(self, done: int, result: StepResult, lr: float, lam: float, gamma: float, dt: float) -> dict:
        """The metrics.jsonl record of a step: losses, lr, schedules, speed, and the balance of the main layers
        and (on their own) the MTP modules' layers."""
        record = {"step": done, "loss": result.loss, "lm_loss": result.lm_loss, "mtp_loss": result.mtp_loss,
                  "balance_loss": result.balance_loss, "lr": lr, "mtp_loss_weight": lam,
                  "bias_update_speed": gamma, "tokens_per_s": self.data.tokens_per_step / dt}
        if result.grad_norm is not None:
            record["grad_norm"] = result.grad_norm
        record.update(result.metrics)
        if hasattr(self.data, "metrics"):
            record.update(self.data.metrics())
        if result.skipped:
            record["skipped"] = result.skipped
        if result.expert_counts is not None:
            n_main = self.model_config.n_moe_layers
            for suffix, counts in (("", result.expert_counts[:n_main]), ("_mtp", result.expert_counts[n_main:])):
                if len(counts) == 0 or not counts.any():  # none, or MTP modules that did not run (RL)
                    continue
                vio = max_violation(counts)
                record[f"max_vio{suffix}"] = float(vio.mean())
                record[f"max_vio{suffix}_worst"] = float(vio.max())
                load = counts.double()
                record[f"expert_load{suffix}"] = (load / load.mean(dim=-1, keepdim=True)).round(decimals=3).tolist()
        return record

    def _check_divergence(self, done: int, result: StepResult, record: dict, metrics: MetricsLog | None) -> None:
        """Count consecutive skipped steps; stop the run after `max_bad_steps` of them."""
        if not result.skipped:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.log(f"step {done}: {result.skipped} (loss {result.loss}); step skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.config.max_bad_steps:
            if metrics is not None:
                metrics.write(record)
            raise TrainingDiverged(
                f"training stopped at step {done}: {self.bad_steps} consecutive steps had a non-finite loss or "
                f"gradients (max_bad_steps={self.config.max_bad_steps}); lower lr (now {self.config.lr}) or check "
                f"the data")

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation cross-entropy (main next-token loss only: the MTP modules do not run)."""
        batches = self.data.val_batches()
        if not batches:
            return None
        self.model.eval()
        total = torch.zeros(2, device=self.device)  # [sum of batch losses, batches]
        for ids, counts in batches:
            with autocast_context(self.device, self.autocast_dtype):
                loss = self.forward(self.model, ids, self.device, None).lm_loss
            if counts:
                total += torch.stack([loss.float(), torch.ones((), device=self.device)])
        self.model.train()
        if self.reduce is not None:
            total = self.reduce(total)
        return float(total[0] / total[1])

    # ----- checkpoints and the end of a run -----
    def save_checkpoint(self, step: int) -> None:
        """The training state after `step`, atomically, keeping the newest `keep_checkpoints`."""
        state = {"step": step, "data": self.data.state_dict(), "bad_steps": self.bad_steps,
                 "train_seconds": self.train_seconds, "lr": lr_at(step - 1, self.config),
                 "train_config": self.config.to_dict()}
        save_checkpoint(self.out, step, self.model, self.optimizer, self.data.tokenizer, self.model_config, state,
                        self.config.keep_checkpoints, self.rank, self.processes.barrier)

    def finish(self) -> dict:
        """Write `final/` (the model folder, consolidated from every rank's shards), the summary and the plots;
        returns the summary (on rank 0; {} on the others)."""
        # The summary first: a run without one completed step has no model worth writing.
        summary = self.summary() if self.rank == 0 else {}
        if self.lora is not None:
            save_lora_outputs(self.out, self.model, self.lora, self.model_config, self.init_from, self.rank,
                              self.processes.distributed)
        if self.lora is not None and self.lora.quantize != "none":
            if self.rank == 0:  # merged into the full-precision base, not into the run's NF4 weights
                merged_final(self.out, self.init_from, lambda folder: write_tokenizer_files(
                    self.data.tokenizer, folder, self.model_config.max_position_embeddings))
        else:
            save_model_folder(self.out / "final", self.model, self.model_config, self.data.tokenizer, self.rank,
                              self.processes.distributed)
        self.processes.barrier()
        if self.rank != 0:
            return {}
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        plots = plot_run(self.out)
        self.log(f"final model: {self.out / 'final'}" + (f"; plots: {', '.join(map(str, plots))}" if plots else ""))
        return summary

    def summary(self) -> dict:
        """The figures a user wants after a run, read back from metrics.jsonl."""
        from .metrics import read_metrics

        c, tokenized = self.config, getattr(self.data, "tokenized", None)
        records = [r for r in read_metrics(self.out) if "skipped" not in r]
        if not records:  # every step was skipped (a non-finite loss or gradients, fewer than max_bad_steps times)
            raise TrainingDiverged(f"no step completed: all {c.max_steps} steps were skipped for a non-finite loss "
                                   f"or gradients (see metrics.jsonl); lower lr (now {c.lr}) or check the data")
        tail = records[-min(10, len(records)):]
        evals = [r for r in records if "val_loss" in r]
        sizes = model_summary(self.model_config)
        entropy = None
        if tokenized is not None:
            counts = np.bincount(np.asarray(tokenized.train_tokens),
                                 minlength=self.model_config.vocab_size).astype(np.float64)
            p = counts[counts > 0] / counts.sum()
            entropy = float(-(p * np.log(p)).sum())
        tokens = c.max_steps * self.data.tokens_per_step
        return {
            "total_params": sizes["total_params"],
            "active_params": sizes["active_params"],
            "steps": c.max_steps,
            "tokens_trained": tokens,
            "train_seconds": self.train_seconds,  # optimizer steps only: no evaluation, checkpoints or data prep
            "tokens_per_s": tokens / self.train_seconds if self.train_seconds else 0.0,
            "precision": self.precision,
            "device": str(self.device),
            "processes": self.world_size,
            "final_train_loss": sum(r["lm_loss"] for r in tail) / len(tail),
            "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "unigram_entropy": entropy,
            "max_vio": sum(r.get("max_vio", 0.0) for r in tail) / len(tail),
            "max_vio_worst": max(r.get("max_vio_worst", 0.0) for r in tail),
            "data": ({k: tokenized.meta[k] for k in ("corpus", "files", "train", "val", "tokenizer_s", "tokenize_s")}
                     if tokenized is not None else getattr(self.data, "meta", {})),
            "model_dir": str((self.out / "final").resolve()),
        }


def train(model_config: ModelConfig, config: TrainConfig, out: str | Path, data: list[str] | None = None,
          resume: bool | str = False, stop_at: int | None = None, progress: bool = True,
          init_from: str | Path | None = None, forward: Forward | None = None) -> dict:
    """Pretrain a model (see `Trainer`; `forward` its objective, default the next-token loss) and return the run
    summary."""
    return Trainer(model_config, config, out, data, resume, stop_at, progress, init_from, forward=forward).run()
