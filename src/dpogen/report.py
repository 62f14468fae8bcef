"""The report stage: per-run and across-run tables and figures."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .io import atomic_path, write_text  # noqa: E402


def run_summary(run: str, sweep_value, margins: pd.DataFrame, certs: pd.DataFrame, bounds: pd.DataFrame,
                card: dict) -> pd.DataFrame:
    """One row per checkpoint step: mean margins and errors of each split, certificate and bounds."""
    g = margins.groupby(["step", "split"])
    wide = pd.DataFrame({"margin_mean": g["margin"].mean(), "margin_std": g["margin"].std(ddof=0),
                         "error": g["margin"].apply(lambda m: float((m <= 0).mean())),
                         "reward_chosen_mean": g["reward_chosen"].mean(),
                         "reward_rejected_mean": g["reward_rejected"].mean()}).unstack("split")
    wide.columns = [f"{split}_{name}" for name, split in wide.columns]
    wide = wide.reset_index()
    c = certs[certs["concept"] == "all"].set_index("step")["upper"].rename("test_error_upper")
    wide = wide.join(c, on="step")
    wide.insert(0, "run", run)
    wide.insert(1, "sweep_value", sweep_value)
    wide.insert(2, "K", card["K"])
    wide.insert(3, "Q", card["Q_min"])
    for _, b in bounds.iterrows():
        wide[f"bound_{b['version']}"] = b["value"]
        wide[f"bound_{b['version']}_conditions_hold"] = b["conditions_hold"]
    return wide


def save_fig(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_run(summary: pd.DataFrame, title: str, path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    for split, style in (("train", "-"), ("test", "--")):
        ax.plot(summary["step"], summary[f"{split}_margin_mean"], style, marker="o", ms=3, label=f"{split} margin")
        ax.fill_between(summary["step"], summary[f"{split}_margin_mean"] - summary[f"{split}_margin_std"],
                        summary[f"{split}_margin_mean"] + summary[f"{split}_margin_std"], alpha=0.15)
    ax.set_xlabel("DPO step")
    ax.set_ylabel("mean reward margin")
    ax.legend()
    ax = axes[1]
    ax.plot(summary["step"], summary["train_error"], "-", marker="o", ms=3, label="train error")
    ax.plot(summary["step"], summary["test_error"], "--", marker="o", ms=3, label="test error")
    ax.plot(summary["step"], summary["test_error_upper"], ":", label="test error upper bound (Clopper-Pearson)")
    ax.set_xlabel("DPO step")
    ax.set_ylabel("0-1 error")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.suptitle(title)
    save_fig(fig, path)


def plot_margins_across(summary: pd.DataFrame, label: str, path) -> None:
    """The paper's main figure: train and test margin trajectories, one colour per sweep value."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    cmap = plt.get_cmap("viridis")
    values = list(dict.fromkeys(summary["sweep_value"]))
    for i, v in enumerate(values):
        s = summary[summary["sweep_value"] == v]
        col = cmap(i / max(1, len(values) - 1))
        for ax, split in zip(axes, ("train", "test")):
            ax.plot(s["step"], s[f"{split}_margin_mean"], color=col, label=f"{label}={v}")
    for ax, split in zip(axes, ("train", "test")):
        ax.set_title(f"average {split} reward margin")
        ax.set_xlabel("DPO step")
    axes[0].set_ylabel("mean margin")
    axes[1].legend()
    save_fig(fig, path)


def plot_error_vs_k(final: pd.DataFrame, path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.plot(final["K"], final["test_error"], "o-", label="test error (end of training)")
    ax.plot(final["K"], final["test_error_upper"], "v:", label="Clopper-Pearson upper bound")
    ax.plot(final["K"], final["train_error"], "s--", label="train error")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (number of concepts)")
    ax.set_ylabel("0-1 error")
    ax.legend(fontsize=8)
    save_fig(fig, path)


def final_rows(summary: pd.DataFrame) -> pd.DataFrame:
    return summary.sort_values("step").groupby("run", sort=False).tail(1).sort_values("K").reset_index(drop=True)


def fit_line(x, y) -> tuple[float, float, float]:
    """Least-squares y = a + b x and its R² (the statistic the paper reports for test error vs K)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan, math.nan, math.nan
    b, a = np.polyfit(x, y, 1)
    ss = ((y - y.mean()) ** 2).sum()
    r2 = 1 - ((y - (a + b * x)) ** 2).sum() / ss if ss > 0 else math.nan
    return float(a), float(b), float(r2)


def fit_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Test error against K at the end of training: the linear fit and its R² (the paper's statistic)."""
    final = final_rows(summary)
    a, b, r2 = fit_line(final["K"], final["test_error"])
    return pd.DataFrame([{"statistic": "test_error ~ K", "intercept": a, "slope": b, "r2": r2, "n_runs": len(final)}])


def markdown(experiment: str, summary: pd.DataFrame, meta: dict) -> str:
    from .paper import comparison_rows

    final = final_rows(summary)
    fit = fit_table(summary).iloc[0]
    a, b, r2 = fit["intercept"], fit["slope"], fit["r2"]
    lines = [f"# {experiment}: summary", "",
             f"Loss: {meta.get('loss_name', '?')}, beta = {meta.get('beta')}, {meta.get('steps')} DPO steps; "
             f"certificates at {meta.get('confidence')} confidence.", "",
             "| run | K | Q | train margin | test margin | train error | test error | test error upper | v3 bound | v5 bound | conditions (v3/v5) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in final.iterrows():
        lines.append(f"| {r['run']} | {r['K']} | {r['Q']} | {r['train_margin_mean']:.4f} | {r['test_margin_mean']:.4f} | "
                     f"{r['train_error']:.3f} | {r['test_error']:.3f} | {r['test_error_upper']:.3f} | "
                     f"{r['bound_v3']:.3g} | {r['bound_v5']:.3g} | "
                     f"{'hold' if r['bound_v3_conditions_hold'] else 'violated'}/"
                     f"{'hold' if r['bound_v5_conditions_hold'] else 'violated'} |")
    lines += ["", f"Test error against K: linear fit error = {a:.4f} + {b:.4f} K, R² = {r2:.3f}.", ""]
    if meta.get("paper_model"):
        lines += comparison_rows(meta["paper_model"], final)
    order = final.sort_values("K")["train_margin_mean"].to_numpy()
    if len(order) > 1:
        mono = bool(np.all(np.diff(order) < 0))
        lines.append(f"Final mean train margin {'decreases' if mono else 'does not decrease monotonically'} as K grows.")
    lines.append("Bounds above 1 are vacuous; the Clopper-Pearson column is a valid high-probability upper bound "
                 "on the population error R(P) of the final model, from its held-out pairs.")
    return "\n".join(lines) + "\n"


def write_summary_csv(summary: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        summary.to_csv(tmp, index=False)


def write_summary_parquet(summary: pd.DataFrame, path) -> None:
    import pyarrow as pa

    from .io import write_table

    write_table(pa.Table.from_pandas(summary, preserve_index=False), path)


def plot_dynamics(dyn: pd.DataFrame, title: str, path) -> None:
    """Measured mean margins against the recursion's prediction (kernel from g(x)) and the envelope
    [r_L, r_U] of v3 Theorem 4.1 up to τ_1; the method says whether the prediction is exact or fitted."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if dyn["step"].min() < 0:
        ax.text(0.5, 0.5, dyn["method"].iloc[0], ha="center", va="center", wrap=True)
        ax.set_axis_off()
    else:
        for split, col in (("train", "C0"), ("test", "C1")):
            d = dyn[dyn["split"] == split]
            ax.plot(d["step"], d["measured_margin"], "o-", color=col, ms=3, label=f"{split}: measured")
            ax.plot(d["step"], d["predicted_margin"], "--", color=col, label=f"{split}: predicted")
        d = dyn[dyn["split"] == "train"]
        ax.fill_between(d["step"], d["r_L"], d["r_U"], color="grey", alpha=0.2, label="[r_L, r_U] up to tau_1")
        ax.set_xlabel("DPO step")
        ax.set_ylabel("mean reward margin")
        ax.set_title(dyn["method"].iloc[0], fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    save_fig(fig, path)


def plot_geometry(geo: pd.DataFrame, title: str, path) -> None:
    """The paper's first figure: average cosine similarity between clusters of g(x), raw (a shared component
    makes everything similar) and with the global mean removed (near 0 between concepts)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4), layout="constrained")
    for ax, q, name in zip(axes, ("cluster_cos_raw", "cluster_cos_centered"), ("raw", "mean removed")):
        g = geo[geo["quantity"] == q]
        if g.empty:
            ax.set_axis_off()
            continue
        labels = list(dict.fromkeys(g["concept"]))
        m = g.pivot(index="concept", columns="concept_b", values="value").loc[labels, labels].to_numpy()
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        short = [lab if len(lab) < 28 else lab[:12] + "…" + lab[-12:] for lab in labels]
        ax.set_xticks(range(len(labels)), short, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), short, fontsize=6)
        ax.set_title(f"cluster cosine similarity, {name}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    save_fig(fig, path)


def write_markdown(text: str, path) -> None:
    write_text(text, path)
