"""The plots of benchmarks/serving.py: latency percentiles and goodput against offered rate,
cluster and engine on one chart (the burst is left out: it has no rate)."""

from __future__ import annotations

from pathlib import Path


def plot(result: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    phases = [p for p in result["phases"] if p["rate"] is not None]
    if not phases:
        return []
    rates = [p["rate"] for p in phases]
    sides = [s for s in ("cluster", "engine") if all(p[s] for p in phases)]
    title = f"{result['config']['model']} on {result['config']['device']}"
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (metric, label) in zip(axes, [("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("e2e_s", "end to end (s)")]):
        for side, color in zip(sides, ("tab:blue", "tab:orange")):
            for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                ax.plot(rates, [p[side][metric][q] for p in phases], style, color=color, marker="o",
                        label=f"{side} {q}")
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"latency: {title}")
    fig.tight_layout()
    paths.append(folder / "serving_latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    cfg = result["config"]
    for side, color in zip(sides, ("tab:blue", "tab:orange")):
        axes[0].plot(rates, [p[side]["goodput_req_s"] for p in phases], "-o", color=color, label=side)
        axes[1].plot(rates, [p[side]["output_tok_s"] for p in phases], "-o", color=color, label=side)
    axes[0].plot(rates, rates, ":", color="gray", label="offered")
    axes[0].set_ylabel(f"goodput (req/s within TTFT <= {cfg['slo_ttft']} s, TPOT <= {cfg['slo_tpot']} s)")
    axes[1].set_ylabel("output tokens/s")
    for ax in axes:
        ax.set_xlabel("offered rate (requests/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"goodput and throughput: {title}")
    fig.tight_layout()
    paths.append(folder / "serving_goodput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
