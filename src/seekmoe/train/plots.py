"""PNG plots of a finished run from its metrics.jsonl: losses and MaxVio over steps, and each MoE layer's expert
load over steps."""

from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics


def plot_run(out: Path) -> list[Path]:
    """Write `OUT/plots/losses.png` and `OUT/plots/expert_load.png`; returns their paths (none without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'seekmoe[plots]')")
        return []
    records = [r for r in read_metrics(out) if "loss" in r]
    if not records:
        return []
    folder = Path(out) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in records]

    fig, (ax_loss, ax_vio) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for key in ("loss", "lm_loss", "mtp_loss"):
        ax_loss.plot(steps, [r.get(key) for r in records], label=key, linewidth=1)
    evals = [r for r in records if "val_loss" in r]
    ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val_loss")
    ax_loss.set_ylabel("cross-entropy (nats)")
    ax_loss.legend()
    ax_loss.set_title("losses")
    for key, label in (("max_vio", "MaxVio (mean over main layers)"), ("max_vio_worst", "MaxVio (worst main layer)"),
                       ("max_vio_mtp", "MaxVio (MTP modules)")):
        if any(key in r for r in records):
            ax_vio.plot(steps, [r.get(key) for r in records], label=label, linewidth=1)
    ax_vio.set_xlabel("step")
    ax_vio.set_ylabel("MaxVio")
    ax_vio.legend()
    fig.tight_layout()
    paths = [folder / "losses.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    # [steps][layers][E], load / mean load: the main model's MoE layers, then the MTP modules' (own metric)
    loads = [r["expert_load"] + r.get("expert_load_mtp", []) for r in records if "expert_load" in r]
    if loads:
        n_layers = len(loads[0])
        main_layers = len(records[-1].get("expert_load", loads[0]))
        fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.8 * n_layers + 1), sharex=True, squeeze=False)
        for layer, ax in enumerate(axes[:, 0]):
            grid = [[step_loads[layer][e] for step_loads in loads] for e in range(len(loads[0][layer]))]
            image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest",
                              extent=(steps[0] - 0.5, steps[-1] + 0.5, len(grid) - 0.5, -0.5))
            name = f"MoE layer {layer}" if layer < main_layers else f"MTP module {layer - main_layers}"
            ax.set_ylabel(f"{name}\nexpert")
            fig.colorbar(image, ax=ax, label="load / mean")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("expert load per MoE layer (1 = perfectly balanced)")
        fig.tight_layout()
        paths.append(folder / "expert_load.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
