"""The GPU proof kit: one command that checks and measures seekmoe on a CUDA device within a fixed wall time.

In order, each step within its own slice of the budget (8 minutes by default; a step that runs out of time is cut
and the next starts, and a step whose turn comes with no time left is skipped with a message):
1. cuda tests: tests/test_cuda.py (`pytest -m cuda`), one row per test;
2. training: tokens/s and MFU of a DeepSeek-V2-Lite slice (4 layers at V2-Lite's widths, bf16 autocast, sequence
   4096), compile off and on; FLOPs from seekmoe's own count (`seekmoe.info.model_summary`, x3 for forward and
   backward) against the GPU's dense bf16 peak (PEAK_BF16_TFLOPS);
3. moe layer: forward + backward of one MoE layer against the dense SwiGLU of the same activated width, at
   V2-Lite's and V3's widths (benchmarks/moe_layer.py's layers);
4. decode: tokens/s at batch 1, 8 and 64 (compiled with CUDA graphs, and eager) against transformers' generate on
   the same weights, and MTP speculative decoding at batch 1 (benchmarks/decode.py's runs);
5. serving: `seekmoe serve` under 32 concurrent streaming clients (benchmarks/serve.py's load); skipped with a
   message where fastapi or uvicorn is missing.

Results go to benchmarks/results/gpu-check-<date>.json and .md, rewritten after every row, so a run cut short keeps
what finished; `--copy-to DIR` writes them there too. Without CUDA the same code runs every step at toy size on the
CPU with no timings ("no CUDA device: CPU dry run"), which `make test` runs (tests/test_gpu_check.py).

    python benchmarks/gpu_check.py                 # make gpu-check
    python benchmarks/gpu_check.py --budget-s 300 --steps training,decode

Wheels for packages the GPU machine lacks (`make gpu-wheels` -> .gpu-wheels/) are installed from that folder with
`pip --no-index` into .gpu-site/, which goes first on the import path: the server's dependencies come as one set
that pip resolved together (newer typing_extensions, anyio and the like than the machine's are backward compatible).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WHEELS = REPO / ".gpu-wheels"
SITE = REPO / ".gpu-site"
SERVING_PACKAGES = ("fastapi", "uvicorn", "pydantic")

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets, matched against
# torch.cuda.get_device_name() in this order (the first key found in the name wins).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
                    ("GH200", 989.0), ("A100", 312.0), ("A800", 312.0))

# Seconds of the budget each step may use, in order; time a step leaves unused passes to the next.
SLICES = {"cuda tests": 100, "training": 130, "moe layer": 50, "decode": 140, "serving": 60}
MIN_STEP_S = 5.0  # a step whose turn comes with less of the budget left is skipped
STEP_NAMES = {"cuda-tests": "cuda tests", "training": "training", "moe-layer": "moe layer", "decode": "decode",
              "serving": "serving"}


class OutOfTime(Exception):
    """Raised inside a step when its slice of the budget is spent."""


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU named `device_name`, or None when it is not in PEAK_BF16_TFLOPS."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | failed | cut (ran out of time) | skipped
    message: str = ""
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)


class Check:
    """The run: device, budget, the steps' results and the files they are written to after every change."""

    def __init__(self, budget_s: float, out_dir: Path, copy_to: Path | None, steps: list[str]):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dry = not self.cuda
        self.budget_s = budget_s
        self.steps = [Step(name) for name in steps]
        stamp = datetime.now(timezone.utc)
        self.paths = [out_dir / f"gpu-check-{stamp:%Y-%m-%d}{'-dry-run' if self.dry else ''}.{ext}"
                      for ext in ("json", "md")]
        self.copy_to = copy_to
        self.machine = self._machine()
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.step_left = 0.0  # seconds the running step may take (set by `run`)
        self.start = time.monotonic()  # the budget counts from here: the imports above are not the steps'
        self.deadline = self.start + budget_s

    def _machine(self) -> dict:
        from common import machine

        torch = self.torch
        m = machine()
        if self.cuda:
            name = torch.cuda.get_device_name()
            m.update(gpu=name, gpu_capability=".".join(map(str, torch.cuda.get_device_capability())),
                     gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                     cuda=torch.version.cuda, peak_bf16_tflops=peak_bf16_tflops(name))
        else:
            m.update(gpu=None, peak_bf16_tflops=None)
        return m

    # --- time -------------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timed(self, fn, repeats: int = 3, warmup: int = 1) -> tuple[float | None, float | None]:
        """(median seconds of `repeats` calls, seconds of the first warmup call) of fn on the GPU, synchronized;
        in a dry run fn runs once and both are None (no timings off a GPU)."""
        if self.dry:
            fn()
            return None, None
        first = None
        for i in range(warmup):
            t = time.perf_counter()
            fn()
            self.torch.cuda.synchronize()
            first = first if i else time.perf_counter() - t
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            self.torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times), first

    # --- results ----------------------------------------------------------------------------------------------
    def add(self, step: Step, row: dict) -> None:
        step.rows.append(row)
        self.write()

    def write(self) -> None:
        payload = {"title": "seekmoe GPU check", "mode": "CPU dry run" if self.dry else "CUDA",
                   "budget_s": self.budget_s, "elapsed_s": round(time.monotonic() - self.start, 1),
                   "machine": self.machine,
                   "steps": [{"name": s.name, "status": s.status, "message": s.message,
                              "seconds": round(s.seconds, 1), "rows": s.rows} for s in self.steps]}
        json_path, md_path = self.paths
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        md_path.write_text(self.markdown())
        if self.copy_to is not None:
            self.copy_to.mkdir(parents=True, exist_ok=True)
            for path in self.paths:
                (self.copy_to / path.name).write_text(path.read_text())

    def headline(self) -> str:
        m = self.machine
        where = (f"{m['gpu']} (capability {m['gpu_capability']}, {m['gpu_memory_gb']} GB, CUDA {m['cuda']}, dense "
                 f"bf16 peak {m['peak_bf16_tflops'] or 'unknown'} TFLOP/s)" if self.cuda
                 else "no CUDA device: CPU dry run (toy sizes, no timings)")
        return (f"seekmoe GPU check, {m['date']}: {where}; torch {m['torch']}, transformers {m['transformers']}, "
                f"Python {sys.version.split()[0]}, CPU {m['cpu']}; budget {self.budget_s:.0f} s")

    def markdown(self) -> str:
        out = [f"# {self.headline()}", ""]
        for s in self.steps:
            out += [f"## {s.name}: {s.status} ({s.seconds:.0f} s){' - ' + s.message if s.message else ''}", ""]
            if s.rows:
                cols = list(dict.fromkeys(k for r in s.rows for k in r))
                out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                out += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in s.rows]
                out.append("")
        return "\n".join(out) + "\n"

    def print_table(self) -> None:
        from common import table

        print("\n" + self.headline())
        for s in self.steps:
            print(f"\n{s.name}: {s.status} ({s.seconds:.0f} s){' - ' + s.message if s.message else ''}")
            if s.rows:
                cols = list(dict.fromkeys(k for r in s.rows for k in r))
                print(table([cols] + [[cell(r.get(c)) for c in cols] for r in s.rows]))
        print(f"\nwrote {self.paths[0]} and {self.paths[1]}")


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value).replace("|", "/").replace("\n", " ")


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise OutOfTime in this (main) thread after `seconds`: Python code is interrupted at its next bytecode,
    a torch.compile included; subprocesses are timed out by their own callers."""

    def handler(signum, frame):
        raise OutOfTime()

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def child_env() -> dict:
    """The environment of subprocesses: this tree's sources, then the path (with the carried wheels' folder)."""
    paths = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), PYTHONUNBUFFERED="1")


def install_carried_wheels() -> str:
    """Install .gpu-wheels/ (from `make gpu-wheels`) into .gpu-site/ with pip --no-index when a serving package is
    missing; returns what was done, for the log."""
    missing = [p for p in SERVING_PACKAGES if importlib.util.find_spec(p) is None]
    if not missing:
        return "serving packages present"
    if not WHEELS.is_dir():
        return f"missing {missing} and no {WHEELS.name}/ to install from (`make gpu-wheels` on a machine with PyPI)"
    if not SITE.is_dir():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELS), "--target",
               str(SITE), "--no-compile", "--disable-pip-version-check", *SERVING_PACKAGES]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            return f"pip install from {WHEELS.name}/ failed: {done.stderr.strip()[-300:]}"
    sys.path.insert(0, str(SITE))  # the set pip resolved together (module docstring)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH")) if p)  # servers
    importlib.invalidate_caches()
    return f"installed {missing} from {WHEELS.name}/ into {SITE.name}/"


# --- 1. the CUDA tests -----------------------------------------------------------------------------------------
def step_cuda_tests(check: Check, step: Step) -> None:
    junit = check.tmp / "cuda-tests.xml"  # the skip reasons and failure messages, which -v does not print
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", "--tb=line", "-o",
           "addopts=", f"--junitxml={junit}", str(REPO / "tests" / "test_cuda.py")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    timer = threading.Timer(max(check.step_left, 1), proc.kill)
    timer.start()
    tail: list[str] = []
    outcome = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)(.*)$")
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-30:]
            m = outcome.match(line.strip())
            if m:
                check.add(step, {"test": m.group(1).split("::", 1)[1], "outcome": m.group(2).lower(), "note": ""})
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # cut by the step's alarm
            proc.kill()
            proc.wait()
    if proc.returncode == -signal.SIGKILL:
        raise OutOfTime()
    if junit.is_file():
        import xml.etree.ElementTree as ET

        notes = {}
        for case in ET.parse(junit).iter("testcase"):
            for child in case:
                if child.tag in ("skipped", "failure", "error"):
                    message = child.get("message") or ""
                    notes[case.get("name")] = message.splitlines()[0][:160] if message else ""
        for row in step.rows:
            row["note"] = notes.get(row["test"], "")
        check.write()
    failed = [r["test"] for r in step.rows if r["outcome"] in ("failed", "error")]
    errors = [line for line in tail if line.startswith(("E ", "/")) or "Error" in line][-3:]
    if failed or proc.returncode not in (0, 5):  # 5: nothing collected
        step.status = "failed"
        step.message = f"{len(failed)} failed: {', '.join(failed)}; " + " / ".join(errors)[-600:]
    elif check.dry:
        step.message = f"{len(step.rows)} tests collected, skipped without CUDA"


# --- 2. training throughput and MFU ----------------------------------------------------------------------------
def training_config(check: Check):
    from seekmoe import ModelConfig

    if check.dry:
        return ModelConfig.preset("tiny", num_nextn_predict_layers=0), 2, 32
    # DeepSeek-V2-Lite's widths (hidden 2048, 64 experts of width 1408, top-6, 2 shared, MLA with rank 512), 4 of
    # its 27 layers (the first dense, as in the model); no MTP (V2-Lite has none).
    return ModelConfig.preset("deepseek-v2-lite", num_hidden_layers=4), 2, 4096


def step_training(check: Check, step: Step) -> None:
    import torch
    from train_step import training_step

    import seekmoe
    from seekmoe.info import model_summary
    from seekmoe.parallel import compile_blocks

    config, batch, seq = training_config(check)
    flops_per_token = 3 * model_summary(config, context=seq)["flops_per_token"]  # forward + backward (2x)
    peak = check.machine["peak_bf16_tflops"]
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(check.device)
    for compiled in (False, True):
        torch.manual_seed(0)
        with check.device:
            model = seekmoe.build_model(config).train()
        if compiled:
            compile_blocks(model, backend="eager" if check.dry else "inductor")
        step_fn = training_step(model, ids, torch.bfloat16)
        if check.cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds, first = check.timed(step_fn, repeats=5, warmup=2)
        tokens_s = batch * seq / seconds if seconds else None
        tflops = flops_per_token * tokens_s / 1e12 if tokens_s else None
        check.add(step, {"model": f"V2-Lite widths, {config.num_hidden_layers} layers" if check.cuda else "tiny",
                         "params (M)": sum(p.numel() for p in model.parameters()) / 1e6,
                         "compile": compiled, "batch x seq": f"{batch} x {seq}", "dtype": "bf16 autocast",
                         "ms/step": 1e3 * seconds if seconds else None, "tokens/s": tokens_s,
                         "TFLOP/s": tflops, "MFU": f"{tflops / peak:.1%}" if tflops and peak else None,
                         "first step s (compile)": first,
                         "peak GB": torch.cuda.max_memory_allocated() / 2**30 if check.cuda else None,
                         "loss": step_fn().item()})
        del model, step_fn
        if check.cuda:
            torch.cuda.empty_cache()
    step.message = (f"{flops_per_token / 1e9:.3g} GFLOP a token (forward + backward: 3x seekmoe.info's forward count "
                    f"at context {seq}); " + (f"MFU against {peak} TFLOP/s dense bf16" if peak else
                                              "no MFU: no GPU, or one missing from PEAK_BF16_TFLOPS"))


# --- 3. the MoE layer against the dense layer of the same activated width ----------------------------------------
def moe_shapes(check: Check):
    from moe_layer import Shape

    if check.dry:
        return [Shape("toy", 8, 2, 64, 32, 1, 64)]
    return [Shape("v2-lite", 64, 6, 2048, 1408, 2, 8192, "DeepSeek-V2-Lite's whole layer, 768 rows an expert"),
            Shape("v3-64of256", 64, 8, 7168, 2048, 1, 2048,
                  "DeepSeek-V3's layer with 64 of its 256 experts at 2048 tokens: each expert gets the 256 rows it "
                  "gets in the full layer at 8192 tokens")]


def step_moe_layer(check: Check, step: Step) -> None:
    import torch
    from moe_layer import after, build_layers
    from moe_layer import train_step as layer_step

    from seekmoe.model.experts import configure_experts

    for shape in moe_shapes(check):
        torch.manual_seed(0)
        with check.device:
            ours, theirs, dense = build_layers(shape)
            g = torch.Generator(check.device).manual_seed(1)
            x = torch.randn(1, shape.tokens, shape.hidden, generator=g, device=check.device).requires_grad_()
            dy = torch.randn(1, shape.tokens, shape.hidden, generator=g, device=check.device)
        hf_config = theirs.experts.config
        runs = {"dense SwiGLU": layer_step(dense, x, dy, torch.bfloat16)}
        for backend in ("grouped_mm", "padded_bmm"):
            use = (lambda b=backend: configure_experts(ours, dtype=torch.bfloat16, backend=b))
            runs[f"seekmoe {backend}"] = after(use,
                                               layer_step(ours, x, dy, torch.bfloat16))
        runs["transformers grouped_mm"] = after(lambda: setattr(hf_config, "_experts_implementation", "grouped_mm"),
                                                layer_step(theirs, x, dy, torch.bfloat16))
        # Forward + backward of the dense layer of the activated width: 3 products of H x W, 3x for the backward.
        flops = 3 * 2 * shape.tokens * 3 * shape.hidden * shape.dense_width
        times = {}
        for name, run in runs.items():
            times[name], _ = check.timed(run, repeats=5, warmup=2)
            dense_s = times["dense SwiGLU"]
            check.add(step, {"shape": shape.name, "layer": f"E={shape.n_experts} k={shape.top_k} H={shape.hidden} "
                             f"I={shape.width} shared={shape.n_shared}", "tokens": shape.tokens,
                             "dtype": "bf16 autocast, fp32 weights",
                             "contender": name, "ms": 1e3 * times[name] if times[name] else None,
                             "activated TFLOP/s": flops / times[name] / 1e12 if times[name] else None,
                             "dense / this": dense_s / times[name] if times[name] else None})
        del ours, theirs, dense, runs
        if check.cuda:
            torch.cuda.empty_cache()
    step.message = "; ".join(f"{s.name}: {s.note}" for s in moe_shapes(check) if s.note)


# --- 4. decoding ---------------------------------------------------------------------------------------------
def decode_setup(check: Check):
    from seekmoe import ModelConfig

    if check.dry:
        return ModelConfig.preset("tiny"), (1,), 8, 4
    # V2-Lite's widths, 2 layers (one dense, one MoE) and one MTP module for the speculative rows.
    return ModelConfig.preset("deepseek-v2-lite", num_hidden_layers=2, num_nextn_predict_layers=1), (1, 8, 64), 32, 64


def step_decode(check: Check, step: Step) -> None:
    import torch
    from decode import SeekmoeRun, TransformersRun, load_transformers, make_prompts

    import seekmoe
    from seekmoe.inference import compiled as compiled_forwards

    if check.dry:
        compiled_forwards.BACKEND = "eager"  # the same graphs captured, without inductor's minutes on a CPU
    config, batches, prompt_len, new_tokens = decode_setup(check)
    # The dry run decodes in fp32 (bf16 matrix products are emulated, slowly, on AVX2-only CPUs); the GPU run in
    # bf16. (Compiled bf16 decoding once failed with KeyError 'gate_proj': a graph break under skipped module guards;
    # decoding now compiles with fullgraph, tests/test_quant.py.)
    dtype = torch.float32 if check.dry else torch.bfloat16
    model_dir = check.tmp / "decode-model"
    torch.manual_seed(0)
    seekmoe.build_model(config).save_pretrained(model_dir)
    model = seekmoe.from_pretrained(model_dir, dtype=dtype, device=check.device).eval()
    try:
        hf_model = load_transformers(model_dir, dtype).to(check.device)
        hf_note = ""
    except Exception as e:  # noqa: BLE001 - an older transformers may lack the class: the seekmoe rows still run
        hf_model, hf_note = None, f"transformers baseline skipped: {type(e).__name__}: {str(e)[:200]}"
    incomplete = []
    for batch in batches:
        prompts = make_prompts(model_dir, model.config, batch, prompt_len)
        runs = {"seekmoe eager": lambda p=prompts: SeekmoeRun(model, p, new_tokens, None, compile=False),
                "seekmoe compiled": lambda p=prompts: SeekmoeRun(model, p, new_tokens, None, compile=True)}
        if hf_model is not None:
            runs["transformers generate"] = lambda p=prompts: TransformersRun(hf_model, p, new_tokens)
        if batch == batches[0]:
            runs["seekmoe compiled + MTP"] = lambda p=prompts: SeekmoeRun(model, p, new_tokens, "mtp", compile=True,
                                                                          drafts=1)
        reference = None
        for name, make in runs.items():
            run = make()
            seconds, first = check.timed(run, repeats=3, warmup=1)
            if isinstance(run, TransformersRun):  # its cache statistics follow transformers' cache API: not needed
                stats = {"outputs": run.out.sequences[:, run.ids.shape[1]:].tolist(), "tokens_per_forward": 1.0,
                         "acceptance": None}
            else:
                stats = run.stats()
            outputs = stats.pop("outputs")
            reference = outputs if name == "seekmoe eager" else reference
            if any(len(out) != new_tokens for out in outputs):  # the engine logs a failed step and ends its requests
                incomplete.append(f"{name} at batch {batch}")
            check.add(step, {"batch": batch, "engine": name, "tokens/s": batch * new_tokens / seconds if seconds
                             else None, "first call s (compile)": first, "tokens/forward": stats["tokens_per_forward"],
                             "MTP acceptance": stats["acceptance"], "same tokens as eager": outputs == reference})
    step.message = (f"{'fp32' if check.dry else 'bf16'}, prompt {prompt_len} + {new_tokens} new tokens a sequence, "
                    f"greedy; a random model, so MTP acceptance means nothing and bf16 rounding may change tokens. "
                    f"{hf_note}").strip()
    if incomplete:
        step.status = "failed"
        step.message = f"fewer than {new_tokens} tokens (the engine failed, see the log): {incomplete}. " + step.message


# --- 5. serving ----------------------------------------------------------------------------------------------
def step_serving(check: Check, step: Step) -> None:
    from serve import free_port, load, make_model_dir, start_server

    missing = [p for p in SERVING_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        step.status, step.message = "skipped", (f"{', '.join(missing)} not installed: run `make gpu-wheels` where "
                                                f"PyPI is reachable and carry .gpu-wheels/ along")
        return
    clients, max_tokens = (32, 32) if check.cuda else (4, 4)
    model_dir = make_model_dir(check.tmp / "serve-model", "small" if check.cuda else "tiny", 1024)
    server_args = ["--max-batch-size", str(clients)] + ([] if check.cuda else ["--compile", "off"])
    port = free_port()
    proc = start_server(model_dir, REPO / "src", port, server_args, timeout_s=max(check.step_left - 15, 5))
    try:
        r = load(port, clients, 2 if check.cuda else 1, "def main(argv):\n", max_tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if check.dry:
        r = {"clients": r["clients"], "requests": r["requests"], "errors": r["errors"]}
    check.add(step, {"model": "random small" if check.cuda else "random tiny", "max tokens": max_tokens, **r})
    if r["errors"]:
        step.status, step.message = "failed", f"{r['errors']} of {r['requests'] + r['errors']} requests failed"


STEPS = {"cuda tests": step_cuda_tests, "training": step_training, "moe layer": step_moe_layer,
         "decode": step_decode, "serving": step_serving}


def run(check: Check) -> None:
    carried = 0.0
    for step in check.steps:
        left = check.left()
        if left < MIN_STEP_S:
            step.status, step.message = "skipped", "the budget is spent"
            check.write()
            print(f"[{step.name}] skipped: the budget is spent", flush=True)
            continue
        allowed = min(SLICES[step.name] + carried, left)
        check.step_left = allowed
        print(f"[{step.name}] up to {allowed:.0f} s", flush=True)
        started = time.monotonic()
        step.status = "running"
        check.write()
        try:
            with alarm(allowed):
                STEPS[step.name](check, step)
            if step.status == "running":
                step.status = "ok"
        except OutOfTime:
            step.status = "cut"
            step.message = (f"out of its {allowed:.0f} s slice after {len(step.rows)} row(s); " + step.message).strip()
        except Exception as e:  # noqa: BLE001 - one step's failure is a result, and the next step still runs
            import traceback

            step.status = "failed"
            step.message = f"{type(e).__name__}: {e}"[:600]
            traceback.print_exc()
        step.seconds = time.monotonic() - started
        carried = max(allowed - step.seconds, 0.0)
        check.write()
        print(f"[{step.name}] {step.status} in {step.seconds:.0f} s {step.message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=480.0, help="wall time of the whole check (default 480)")
    p.add_argument("--steps", default=",".join(STEP_NAMES), help=f"comma-separated, of {','.join(STEP_NAMES)}")
    p.add_argument("--out-dir", type=Path, default=HERE / "results", help="where the .json and .md go")
    p.add_argument("--copy-to", type=Path, default=None, help="also write the results files there (e.g. $OUT)")
    args = p.parse_args(argv)
    names = args.steps.split(",")
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown:
        p.error(f"unknown step(s) {unknown}: expected some of {list(STEP_NAMES)}")
    if args.budget_s <= 0:
        p.error(f"--budget-s {args.budget_s} is invalid: expected a positive number of seconds")
    sys.path.insert(0, str(HERE))
    sys.path.insert(1, str(REPO / "src"))
    wheels_note = install_carried_wheels()
    check = Check(args.budget_s, args.out_dir, args.copy_to, [STEP_NAMES[n] for n in names])
    print(check.headline(), flush=True)
    if check.dry:
        print("no CUDA device: CPU dry run", flush=True)
    print(f"wheels: {wheels_note}", flush=True)
    check.machine["wheels"] = wheels_note
    run(check)
    check.print_table()
    if check.dry:
        print("no CUDA device: CPU dry run")
        return 0
    return 1 if any(s.status == "failed" for s in check.steps) else 0


if __name__ == "__main__":
    sys.exit(main())
