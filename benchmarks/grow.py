"""Growing a trained MoE for a new domain (`seekmoe expand` + `--train new-experts,router`), against fine-tuning
everything and against a fresh model; and an upcycled dense model against a MoE trained from scratch at equal
compute.

Domain A is the default corpus (the Python standard library's source) without `pydoc_data/`; domain B is the English
prose of Python's own documentation that every Python ships for `help()`: the `topics` dict of
`pydoc_data/topics.py` (79 sections of the language reference, ~465K characters). Held out for evaluation: every
25th file of A, every 8th section of B.

Part 1: a "small" MoE pretrained on A, then, at the same number of steps on B:
  (a) no change; (b) full fine-tuning; (c) `expand --init zero` (+16 experts a layer, doubling them) training
  only the new experts and the router, with the faster onboarding of new experts; (c, slow) the same at the
  ordinary bias speed;
  (c, copy) `expand --init copy`, same training; (d) a fresh model of the same shape trained on B only.
  Reported: held-out loss on A and B before and after, trainable parameters, wall time, and the steps the zero-init
  experts took to get tokens. (c') (a distillation term on A, the Lifelong-MoE recipe) is not implemented.
Part 2: "small-dense" pretrained on A, upcycled (16 experts = 4 copies x granularity 4, top-4: the activated FFN
  width of the dense model) and trained on, against the same MoE trained from random initialization for as many
  training FLOPs as the dense and upcycled phases together; one plot of the loss curves.

    python benchmarks/grow.py            # ~40 min single-threaded on a loaded 2-core machine
    python benchmarks/grow.py --quick    # under 10 minutes on 2 idle cores

Run single-threaded on a shared machine (`OMP_NUM_THREADS=1`). Learning rates: A pretraining 3e-3 (the preset's),
(b) 1e-3, (c) 3e-3 (its new experts are fresh weights), (d) 3e-3; part 2: 3e-3 for every run; all after a short
warmup, cosine to 10%.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, header, packed_sequences, pyplot, save_figure, table, write_json  # noqa: E402

import seekmoe  # noqa: E402
from seekmoe.data import default_corpus  # noqa: E402
from seekmoe.grow import GrowRecord, expand_model, upcycle_model  # noqa: E402
from seekmoe.train.freeze import select_trainable  # noqa: E402
from seekmoe.grow.upcycle import upcycle_config  # noqa: E402
from seekmoe.info import model_summary  # noqa: E402
from seekmoe.train import load_run_config, train  # noqa: E402
from seekmoe.train.metrics import read_metrics  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def domains(work: Path, a_every: int) -> tuple[list[str], list[Path], Path, list[Path]]:
    """(A training files, A held-out files, B training folder, B held-out files). A is every `a_every`-th file of
    the default corpus (all of it for 1) without pydoc_data/; B's sections are written one per .txt file."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [Path(f) for f in default_corpus().files if Path(f).relative_to(stdlib).parts[0] != "pydoc_data"]
    files = files[::a_every]
    a_val = files[12::25]
    a_train = [str(f) for f in files if f not in set(a_val)]
    b_train, b_val_dir = work / "domain_b" / "train", work / "domain_b" / "val"
    b_train.mkdir(parents=True, exist_ok=True), b_val_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(sorted(topics)):
        folder = b_val_dir if i % 8 == 4 else b_train
        (folder / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    return a_train, a_val, b_train, sorted(b_val_dir.iterdir())


@torch.no_grad()
def held_out_loss(model_dir: Path, seqs: dict[str, torch.Tensor], batch: int = 16) -> dict[str, float]:
    """Mean next-token loss of the model in `model_dir` on each domain's held-out sequences."""
    model = seekmoe.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    for name, s in seqs.items():
        total = 0.0
        for start in range(0, len(s), batch):
            ids = s[start:start + batch]
            total += float(model(ids, labels=ids).lm_loss) * len(ids)
        out[name] = total / len(s)
    return out


def model_folder(model: seekmoe.CausalLM, tokenizer_from: Path, path: Path) -> Path:
    """Save `model` with the tokenizer files of `tokenizer_from`: a folder `train --init-from` starts from."""
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, path / name)
    return path


def run(init: Path, out: Path, data: list[str], **overrides) -> dict:
    """`seekmoe train --init-from init --out out --data ... field=value ...`; returns the summary."""
    model_config, train_config = load_run_config(None, overrides=overrides, init_from=init)
    return train(model_config, train_config, out, data=data, progress=False, init_from=init)


def trainable_params(model_dir: Path, spec: str) -> int:
    return select_trainable(seekmoe.from_pretrained(model_dir), spec).trainable_params


def onboarding_steps(run_dir: Path, new_ids: list[int]) -> dict:
    """First step at which every new expert of every main MoE layer got tokens, and at which their mean load reached
    half the layer's mean load (from metrics.jsonl's expert_load: load / layer mean)."""
    first = half = None
    for r in read_metrics(run_dir):
        if "expert_load" not in r:
            continue
        loads = torch.tensor(r["expert_load"])[:, new_ids]  # [layers, new]
        if first is None and bool((loads > 0).all()):
            first = r["step"]
        if half is None and float(loads.mean()) >= 0.5:
            half = r["step"]
    return {"first_tokens": first, "half_mean_load": half}


def smoothed(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc = (acc + [v])[-window:]
        out.append(sum(acc) / len(acc))
    return out


def plot_upcycling(curves: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"dense (small-dense)": "C7", "upcycled MoE": "C3", "MoE from scratch": "C0"}
    for name, (x, y) in curves.items():
        ax.plot(x, y, color=styles.get(name), label=name)
    ax.set_xlabel("training FLOPs (3 x forward FLOPs per token x tokens)")
    ax.set_ylabel("train loss on A (running mean)")
    ax.set_title("upcycling small-dense vs a MoE from scratch, equal compute")
    ax.legend()
    return save_figure(fig, path)


@torch.no_grad()
def held_out_loss_of(model: seekmoe.CausalLM, seqs: dict[str, torch.Tensor], batch: int = 16) -> dict[str, float]:
    """`held_out_loss` of a model in memory."""
    model.eval()
    out = {}
    for name, s in seqs.items():
        out[name] = sum(float(model(s[i:i + batch], labels=s[i:i + batch]).lm_loss) * len(s[i:i + batch])
                        for i in range(0, len(s), batch)) / len(s)
    return out


def distill_arm(args, base: Path, grown_dir: Path, a_train: list[str], b_train: Path, seqs: dict,
                weight: float) -> dict:
    """(c'): (c) with a distillation term on A (Lifelong-MoE, Chen et al. 2023): every step also runs a batch of A
    through the old model (the teacher) and the grown one, and adds `weight` x KL(teacher || student) of their
    next-token distributions to the loss on B. The trainer has no distillation objective, so this is a loop of its
    own built from the trainer's parts (optimizer, schedule, bias update, onboarding); it costs about twice (c)'s
    compute a step (a second batch, and the teacher's forward)."""
    import time

    import torch.nn.functional as F
    from tokenizers import Tokenizer

    from seekmoe.train.onboarding import NewExpertOnboarding
    from seekmoe.train.balance import update_router_biases
    from seekmoe.train.config import TrainConfig
    from seekmoe.train.optim import build_optimizer, lr_at

    torch.manual_seed(0)
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    n = args.steps_b * args.batch
    data = {"A": packed_sequences([Path(f) for f in a_train[::7]], tokenizer, args.seq_len, n),
            "B": packed_sequences(sorted(b_train.iterdir()), tokenizer, args.seq_len, n)}
    teacher = seekmoe.from_pretrained(base, dtype=torch.float32).eval()
    student = seekmoe.from_pretrained(grown_dir, dtype=torch.float32)
    trainable = select_trainable(student, "new-experts,router").trainable_params
    student.train()
    config = TrainConfig(lr=3e-3, warmup_steps=10, max_steps=args.steps_b)
    optimizer = build_optimizer(student, config)
    onboarding = NewExpertOnboarding.for_run(student, args.onboarding_speed, args.onboarding_steps)
    gamma = student.config.bias_update_speed
    params = [p for p in student.parameters() if p.requires_grad]
    start = time.perf_counter()
    for step in range(args.steps_b):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        ids_b = data["B"][torch.randint(len(data["B"]), (args.batch,))]
        ids_a = data["A"][torch.randint(len(data["A"]), (args.batch,))]
        out_b = student(ids_b, labels=ids_b)
        out_a = student(ids_a)
        with torch.no_grad():
            target = F.log_softmax(teacher(ids_a).logits.float(), dim=-1)
        kl = F.kl_div(F.log_softmax(out_a.logits.float(), dim=-1).flatten(0, 1), target.flatten(0, 1),
                      log_target=True, reduction="batchmean")
        (out_b.loss + weight * kl).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counts = out_b.expert_counts  # the balancing counts B's tokens, as in (c)
        update_router_biases(student.moe_layers(), counts, gamma)
        if onboarding is not None:
            onboarding.after_step(step, counts, gamma)
    seconds = time.perf_counter() - start
    return {"loss": held_out_loss_of(student, seqs), "trainable": trainable, "seconds": seconds,
            "distill_weight": weight}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps-a", type=int, default=400, help="pretraining steps on A")
    parser.add_argument("--steps-b", type=int, default=150, help="training steps on B of every arm")
    parser.add_argument("--steps-dense", type=int, default=200, help="dense pretraining steps (part 2)")
    parser.add_argument("--steps-upcycled", type=int, default=200, help="steps of the upcycled MoE (part 2)")
    parser.add_argument("--add-experts", type=int, default=16, help="experts added to each MoE layer (16 doubles "
                        "the small preset's)")
    parser.add_argument("--onboarding-speed", type=float, default=0.05, help="new_expert_bias_update_speed")
    parser.add_argument("--onboarding-steps", type=int, default=50, help="new_expert_onboarding_steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-seqs", type=int, default=48, help="held-out sequences per domain")
    parser.add_argument("--a-every", type=int, default=1, help="use every N-th file of the default corpus as A")
    parser.add_argument("--distill", type=float, default=1.0, help="(c')'s weight of the KL term on A")
    parser.add_argument("--skip", nargs="*", default=[], choices=["c_slow", "c_copy", "c_distill", "upcycle"])
    parser.add_argument("--distill-only", action="store_true",
                        help="run only (c') on the folders that an earlier run kept in --keep DIR")
    parser.add_argument("--quick", action="store_true", help="a small version: fewer steps, a third of A")
    parser.add_argument("--keep", type=Path, help="keep the runs' folders here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "grow.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps_a, args.steps_b, args.steps_dense, args.steps_upcycled = 150, 60, 80, 80
        args.eval_seqs, args.a_every, args.batch = 16, 3, 8
        args.skip = sorted(set(args.skip) | {"c_slow"})
        if args.out == RESULTS / "grow.json":
            args.out = RESULTS / "grow_quick.json"
    common = dict(seq_len=args.seq_len, batch_size=args.batch, precision="fp32", eval_batches=4,
                  num_nextn_predict_layers=0)
    print(header(f"grow: small MoE pretrained {args.steps_a} steps on A (stdlib source), then {args.steps_b} steps on "
                 f"B (pydoc_data/topics.py prose) per arm; upcycling {args.steps_dense}+{args.steps_upcycled} steps; "
                 f"{args.batch} x {args.seq_len} tokens a step, fp32"), flush=True)

    if args.distill_only:
        distill_only(args, common)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        a_train, a_val, b_train, b_val = domains(work, args.a_every)
        print(f"A: {len(a_train)} files for training, {len(a_val)} held out; B: {len(list(b_train.iterdir()))} "
              f"sections for training, {len(b_val)} held out", flush=True)

        # ----- part 1: growing for domain B -----
        pre = dict(common, max_steps=args.steps_a, eval_every=args.steps_a, save_every=args.steps_a)
        model_config, train_config = load_run_config("small", overrides=pre)
        summary_a = train(model_config, train_config, work / "A", data=a_train, progress=False)
        base = work / "A" / "final"
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
        seqs = {"A": packed_sequences(a_val, tokenizer, args.seq_len, args.eval_seqs),
                "B": packed_sequences(b_val, tokenizer, args.seq_len, args.eval_seqs)}
        before = held_out_loss(base, seqs)
        print(f"pretrained on A ({summary_a['train_seconds']:.0f} s): held-out loss A {before['A']:.4f}, "
              f"B {before['B']:.4f}", flush=True)
        on_b = dict(common, max_steps=args.steps_b, eval_every=args.steps_b, save_every=args.steps_b, warmup_steps=10)
        arms: dict[str, dict] = {"(a) no change": {"loss": before, "trainable": 0, "seconds": 0.0}}

        summary = run(base, work / "b", [str(b_train)], lr=1e-3, **on_b)
        arms["(b) full fine-tune"] = {"loss": held_out_loss(work / "b" / "final", seqs),
                                      "trainable": trainable_params(base, "all"), "seconds": summary["train_seconds"]}
        print("  done (b)", flush=True)

        base_model = seekmoe.from_pretrained(base, dtype=torch.float32)
        variants = [("(c) expand zero + new-experts,router", "zero", True)]
        if "c_slow" not in args.skip:
            variants.append(("(c, slow) ... ordinary bias speed", "zero", False))
        if "c_copy" not in args.skip:
            variants.append(("(c, copy) expand copy + new-experts,router", "copy", False))
        jumps = {}
        for name, init, fast in variants:
            grown_dir = work / f"grown-{init}"
            if init not in jumps:
                grown, _ = expand_model(base_model, args.add_experts, init=init)
                model_folder(grown, base, grown_dir)
                jumps[init] = held_out_loss(grown_dir, seqs)
            extra = dict(new_expert_bias_update_speed=args.onboarding_speed,
                         new_expert_onboarding_steps=args.onboarding_steps) if fast else {}
            out = work / f"c-{init}-{'fast' if fast else 'slow'}"
            summary = run(grown_dir, out, [str(b_train)], lr=3e-3, trainable="new-experts,router", **on_b, **extra)
            new_ids = GrowRecord.of(seekmoe.ModelConfig.from_json_file(grown_dir)).new["model.layers.1.mlp"]
            arms[name] = {"loss": held_out_loss(out / "final", seqs), "start_loss": jumps[init],
                          "trainable": trainable_params(grown_dir, "new-experts,router"),
                          "seconds": summary["train_seconds"], "onboarding": onboarding_steps(out, new_ids)}
            print(f"  done {name}", flush=True)

        if "c_distill" not in args.skip:
            arms["(c') (c) + distillation on A"] = distill_arm(args, base, work / "grown-zero", a_train, b_train, seqs,
                                                               args.distill)
            print("  done (c')", flush=True)

        fresh = seekmoe.build_model(model_config)
        fresh_dir = model_folder(fresh, base, work / "fresh")
        summary = run(fresh_dir, work / "d", [str(b_train)], lr=3e-3, **dict(on_b, warmup_steps=20))
        arms["(d) fresh model on B only"] = {"loss": held_out_loss(work / "d" / "final", seqs),
                                             "start_loss": held_out_loss(fresh_dir, seqs),
                                             "trainable": trainable_params(fresh_dir, "all"),
                                             "seconds": summary["train_seconds"]}
        print("  done (d)", flush=True)

        # ----- part 2: upcycling -----
        upcycling = None
        if "upcycle" not in args.skip:
            upcycling = upcycle_study(args, common, a_train, seqs, work)

    print_results(args, before, arms, upcycling)
    write_json(args.out, {"steps_a": args.steps_a, "steps_b": args.steps_b, "batch": args.batch,
                          "seq_len": args.seq_len, "add_experts": args.add_experts,
                          "onboarding_speed": args.onboarding_speed, "onboarding_steps": args.onboarding_steps,
                          "a_every": args.a_every, "precision": summary_a["precision"],
                          "domain_b": "pydoc_data/topics.py (topics dict)", "before": before, "arms": arms,
                          "upcycling": upcycling})


def distill_only(args, common: dict) -> None:
    """(c') alone, on the pretrained and expanded models an earlier run left in --keep DIR."""
    if args.keep is None or not (args.keep / "A" / "final").is_dir() or not (args.keep / "grown-zero").is_dir():
        raise SystemExit("--distill-only needs --keep DIR of an earlier run (with DIR/A/final and DIR/grown-zero)")
    from tokenizers import Tokenizer

    a_train, a_val, b_train, b_val = domains(args.keep, args.a_every)
    base = args.keep / "A" / "final"
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    seqs = {"A": packed_sequences(a_val, tokenizer, args.seq_len, args.eval_seqs),
            "B": packed_sequences(b_val, tokenizer, args.seq_len, args.eval_seqs)}
    before = held_out_loss(base, seqs)
    arm = distill_arm(args, base, args.keep / "grown-zero", a_train, b_train, seqs, args.distill)
    print(f"\n(c') distillation weight {args.distill}, {args.steps_b} steps: held-out A {before['A']:.4f} -> "
          f"{arm['loss']['A']:.4f}, B {before['B']:.4f} -> {arm['loss']['B']:.4f}; trainable {arm['trainable']:,}; "
          f"{arm['seconds']:.0f} s")
    out = args.out.with_name(args.out.stem + "_distill.json")
    write_json(out, {"steps_b": args.steps_b, "batch": args.batch, "seq_len": args.seq_len, "before": before,
                     "arm": arm})


def upcycle_study(args, common: dict, a_train: list[str], seqs: dict, work: Path) -> dict:
    """Dense pretraining, upcycling and training on, against a MoE from scratch at equal training FLOPs."""
    dense_cfg, dense_train = load_run_config("small-dense", overrides=dict(
        common, max_steps=args.steps_dense, eval_every=args.steps_dense, save_every=args.steps_dense))
    train(dense_cfg, dense_train, work / "dense", data=a_train, progress=False)
    dense_dir = work / "dense" / "final"
    dense = seekmoe.from_pretrained(dense_dir, dtype=torch.float32)
    upcycled, _ = upcycle_model(dense, n_experts=16, top_k=4, granularity=4)
    up_dir = model_folder(upcycled, dense_dir, work / "upcycled")
    start = held_out_loss(up_dir, {"A": seqs["A"]})["A"]
    dense_loss = held_out_loss(dense_dir, {"A": seqs["A"]})["A"]
    moe_cfg = upcycle_config(dense_cfg, 16, 4, 0, 4)
    tokens = args.batch * args.seq_len
    flops_dense = 3 * model_summary(dense_cfg, context=args.seq_len)["flops_per_token"] * tokens
    flops_moe = 3 * model_summary(moe_cfg, context=args.seq_len)["flops_per_token"] * tokens
    scratch_steps = args.steps_upcycled + round(args.steps_dense * flops_dense / flops_moe)
    on = dict(common, eval_every=10**9, save_every=10**9)
    up_summary = run(up_dir, work / "up", a_train, lr=3e-3, warmup_steps=20, max_steps=args.steps_upcycled, **on)
    scratch_dir = model_folder(seekmoe.build_model(moe_cfg), dense_dir, work / "scratch-init")
    scratch_summary = run(scratch_dir, work / "scratch", a_train, lr=3e-3, warmup_steps=20, max_steps=scratch_steps,
                          **on)
    window = 10
    dense_curve = [r["lm_loss"] for r in read_metrics(work / "dense") if "lm_loss" in r]
    up_curve = [r["lm_loss"] for r in read_metrics(work / "up") if "lm_loss" in r]
    scratch_curve = [r["lm_loss"] for r in read_metrics(work / "scratch") if "lm_loss" in r]
    curves = {
        "dense (small-dense)": ([flops_dense * (i + 1) for i in range(len(dense_curve))],
                                smoothed(dense_curve, window)),
        "upcycled MoE": ([flops_dense * len(dense_curve) + flops_moe * (i + 1) for i in range(len(up_curve))],
                         smoothed(up_curve, window)),
        "MoE from scratch": ([flops_moe * (i + 1) for i in range(len(scratch_curve))], smoothed(scratch_curve, window)),
    }
    png = plot_upcycling(curves, args.out.with_name(args.out.stem + "_upcycling.png"))
    if png:
        print(f"wrote {png}", flush=True)
    # Where the lead stands along the way: the two MoE curves at equal FLOPs, every quarter of the upcycled phase.
    lead = []
    for q in (0.25, 0.5, 0.75, 1.0):
        i = max(int(q * len(up_curve)) - 1, 0)
        j = min(round(len(dense_curve) * flops_dense / flops_moe) + i, len(scratch_curve) - 1)
        lead.append({"upcycled_step": i + 1, "upcycled": curves["upcycled MoE"][1][i],
                     "scratch_step": j + 1, "scratch": curves["MoE from scratch"][1][j]})
    return {"dense_heldout_A": dense_loss, "upcycled_start_heldout_A": start,
            "upcycled_heldout_A": held_out_loss(work / "up" / "final", {"A": seqs["A"]})["A"],
            "scratch_heldout_A": held_out_loss(work / "scratch" / "final", {"A": seqs["A"]})["A"],
            "steps": {"dense": args.steps_dense, "upcycled": args.steps_upcycled, "scratch": scratch_steps},
            "train_flops_per_step": {"dense": flops_dense, "moe": flops_moe},
            "seconds": {"upcycled": up_summary["train_seconds"], "scratch": scratch_summary["train_seconds"]},
            "lead_at_equal_flops": lead, "curves": {k: {"flops": x, "loss": y} for k, (x, y) in curves.items()}}


def print_results(args, before: dict, arms: dict, upcycling: dict | None) -> None:
    print(f"\nheld-out loss, {args.steps_b} steps on B per arm (before: A {before['A']:.4f}, B {before['B']:.4f})\n")
    rows = [["arm", "start A", "start B", "after A", "after B", "dA", "dB", "trainable", "train s", "onboarded"]]
    for name, r in arms.items():
        start = r.get("start_loss", before)
        onboard = r.get("onboarding")
        onboarded = f"{onboard['first_tokens']}/{onboard['half_mean_load']}" if onboard else ""
        rows.append([name, f"{start['A']:.4f}", f"{start['B']:.4f}", f"{r['loss']['A']:.4f}", f"{r['loss']['B']:.4f}",
                     f"{r['loss']['A'] - before['A']:+.4f}", f"{r['loss']['B'] - before['B']:+.4f}",
                     f"{r['trainable']:,}", f"{r['seconds']:.0f}", onboarded])
    print(table(rows))
    print("onboarded: step at which every new expert first got tokens / their mean load reached half the layer mean")
    full = arms["(b) full fine-tune"]
    grown = arms["(c) expand zero + new-experts,router"]
    gain_b = before["B"] - full["loss"]["B"]
    if gain_b > 0:
        print(f"(c) reaches {100 * (before['B'] - grown['loss']['B']) / gain_b:.0f}% of (b)'s gain on B; A moves "
              f"{grown['loss']['A'] - before['A']:+.4f} under (c) against {full['loss']['A'] - before['A']:+.4f} "
              f"under (b)")
    if upcycling:
        u = upcycling
        print(f"\nupcycling: dense held-out A {u['dense_heldout_A']:.4f}; upcycled at start "
              f"{u['upcycled_start_heldout_A']:.4f}, after {u['steps']['upcycled']} steps "
              f"{u['upcycled_heldout_A']:.4f}; MoE from scratch after {u['steps']['scratch']} steps (equal FLOPs) "
              f"{u['scratch_heldout_A']:.4f}")
        rows = [["upcycled step", "upcycled loss", "scratch step (equal FLOPs)", "scratch loss"]]
        for p in u["lead_at_equal_flops"]:
            rows.append([str(p["upcycled_step"]), f"{p['upcycled']:.4f}", str(p["scratch_step"]),
                         f"{p['scratch']:.4f}"])
        print(table(rows))


if __name__ == "__main__":
    main()
