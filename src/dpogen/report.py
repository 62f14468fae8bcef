"""The report stage: per-run and across-run tables and figures."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import tables  # noqa: E402
from .io import atomic_path, write_text  # noqa: E402


def run_summary(run: str, sweep_value, margins: pd.DataFrame, certs: pd.DataFrame, bounds: pd.DataFrame,
                card: dict, dynamics: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per checkpoint step: mean margins and errors of each split, certificate and bounds; with the
    theory stage's dynamics, τ_1 in steps and the errors at the checkpoint read as τ_1 (the one the claims
    are read at)."""
    g = margins.groupby(["step", "split"])
    wide = pd.DataFrame({"margin_mean": g["margin"].mean(), "margin_std": g["margin"].std(ddof=0),
                         "error": g["margin"].apply(lambda m: float(tables.margin_errors(m).mean())),
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
    from .theory import step_at_tau1

    tau1 = float(dynamics["tau1_steps"].iloc[0]) if dynamics is not None and len(dynamics) else math.nan
    k1 = step_at_tau1(wide["step"], tau1)
    at = wide[wide["step"] == k1] if k1 is not None else wide.iloc[0:0]
    wide["tau1_steps"] = tau1
    wide["step_tau1"] = k1 if k1 is not None else -1
    for col in ("train_error", "test_error", "test_error_upper", "train_margin_mean", "test_margin_mean"):
        wide[f"{col}_tau1"] = float(at[col].iloc[0]) if len(at) and col in at else math.nan
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


def markdown(experiment: str, summary: pd.DataFrame, meta: dict, claims: pd.DataFrame | None = None) -> str:
    from .paper import comparison_rows

    final = final_rows(summary)
    fit = fit_table(summary).iloc[0]
    a, b, r2 = fit["intercept"], fit["slope"], fit["r2"]
    settings = meta.get("settings") or {}
    shared, varying = split_settings(settings)
    lines = [f"# {experiment}: summary", "", settings_line(shared), "",
             "| run | " + "".join(f"{k} | " for k in varying) + "K | Q | train margin | test margin | train error | "
             "test error | test error upper | v3 bound | v5 bound | conditions (v3/v5) |",
             "|---|" + "---|" * len(varying) + "---|---|---|---|---|---|---|---|---|---|"]
    for _, r in final.iterrows():
        own = "".join(f"{settings.get(r['run'], {}).get(k)} | " for k in varying)
        lines.append(f"| {r['run']} | {own}{r['K']} | {r['Q']} | {r['train_margin_mean']:.4f} | {r['test_margin_mean']:.4f} | "
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
    if claims is not None and len(claims):
        lines += ["", "## The theorems' statements on each run", "",
                  "Read at the last checkpoint at or before tau_1 (v3 Theorem 4.1); 'not applicable' when the run "
                  "is outside a statement's premises (the note says why).", "",
                  "| run | claim | step | value | threshold | status | note |", "|---|---|---|---|---|---|---|"]
        def cell(x) -> str:
            return str(x).replace("|", "\\|")

        for _, c in claims.iterrows():
            lines.append(f"| {c['run']} | {cell(c['claim'])} | {c['step']} | {c['value']:.4g} | {c['threshold']:.4g} | "
                         f"{c['status']} | {cell(c['note'])} |")
    lines += code_lines(meta.get("code"), meta.get("rerun_on_code", True))
    return "\n".join(lines) + "\n"


def code_lines(versions: list[dict] | None, rerun_on_code) -> list[str]:
    """The code each stage's outputs were made with (dpogen.codehash.code_versions): one line when every stage
    ran the current code and code changes rerun; else a table of each run's stages, older code marked."""
    if not versions:
        return []
    older = [v for v in versions if v["code"] is not None and not v["current"]]
    if not older and rerun_on_code is True:
        return ["", "Code: every stage of every run was made with the current code (records in code/)."]
    rules = list(dict.fromkeys(v["rule"] for v in versions))
    lines = ["", "## Code each stage was made with", "",
             f"workflow.rerun_on_code is {rerun_on_code}; a hash marked * is older than the current code, "
             "- means no record (made before records were kept).", "",
             "| run | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    by_run: dict[str, dict] = {}
    for v in versions:
        by_run.setdefault(v["run"], {})[v["rule"]] = v
    for run, row in by_run.items():
        cells = [("-" if row[r]["code"] is None else row[r]["code"][:8] + ("" if row[r]["current"] else "*"))
                 for r in rules]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return lines


SETTING_NAMES = {"loss_name": "loss", "beta": "beta", "optimizer": "optimizer", "lr": "lr", "steps": "DPO steps",
                 "batch_size": "batch", "confidence": "certificate confidence"}


def split_settings(settings: dict[str, dict]) -> tuple[dict, list[str]]:
    """The settings every run shares (name → value) and the names that differ between runs (a column each)."""
    shared, varying = {}, []
    for key in SETTING_NAMES:
        values = {repr(s.get(key)) for s in settings.values()}
        if len(values) == 1 and settings:
            shared[key] = next(iter(settings.values())).get(key)
        elif settings:
            varying.append(key)
    return shared, varying


def settings_line(shared: dict) -> str:
    return "Settings of every run: " + ", ".join(f"{SETTING_NAMES[k]} {v}" for k, v in shared.items()) + "." \
        if shared else "Each run's settings are in the table."


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
        tau1 = d["tau1_steps"].iloc[0] if len(d) else math.nan
        if np.isfinite(tau1) and tau1 <= d["step"].max():
            ax.axvline(tau1, color="k", lw=0.8, ls=":", label=f"tau_1 = {tau1:.3g} steps")
        ax.set_xlabel("DPO step")
        ax.set_ylabel("mean reward margin")
        ax.set_title(dyn["method"].iloc[0], fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    save_fig(fig, path)


def plot_geometry(geo: pd.DataFrame, title: str, path) -> None:
    """The paper's first figure: average cosine similarity between clusters of g(x), raw (a shared component
    makes everything similar) and with the global mean removed (near 0 between concepts)."""
    steps = sorted(geo["step"].unique()) if "step" in geo else [0]
    fig, axes = plt.subplots(1, 3 if len(steps) > 1 else 2, figsize=(19 if len(steps) > 1 else 13, 5.4),
                             layout="constrained")
    ref = geo[geo["step"] == 0] if "step" in geo else geo
    if len(steps) > 1:  # the backbone trained: how the geometry moved between checkpoints
        ax = axes[2]
        for q, label in (("l_b", "l_b (shared component)"), ("v", "v (within-cluster spread)"),
                         ("cos_concepts", "mean cosine between concept vectors")):
            vals = [geo[(geo["step"] == s_) & (geo["quantity"] == q)]["value"].mean() for s_ in steps]
            ax.plot(steps, vals, "o-", label=label)
        ax.set_xlabel("DPO step (0: reference)")
        ax.set_title("geometry of g(x) at checkpoints (units: concept norms average 1)", fontsize=9)
        ax.legend(fontsize=7)
    for ax, q, name in zip(axes, ("cluster_cos_raw", "cluster_cos_centered"), ("raw", "mean removed")):
        g = ref[ref["quantity"] == q]
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


# ------------------------------------------------------------------------------------- scaling study


def scaling_table(summary: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per K: the smallest Q whose test error at τ_1 is ≤ ``target`` (runs of a K × Q grid), beside the
    smallest Q at which the v5 bound 2KQ² exp(−Q/45) is ≤ ``target`` (THEORY.md section 4: Θ(log K))."""
    from .theory import smallest_q

    final = final_rows(summary)
    rows = []
    for K, g in final.groupby("K", sort=True):
        g = g.sort_values("Q")
        ok = g[g["test_error_tau1"] <= target]
        q_star = int(ok["Q"].iloc[0]) if len(ok) else None
        rows.append({"K": int(K), "Q_tried": " ".join(str(int(q)) for q in g["Q"]),
                     "test_error_tau1": " ".join(f"{e:.4f}" for e in g["test_error_tau1"]),
                     "Q_star": q_star if q_star is not None else -1,
                     "Q_star_found": q_star is not None,
                     "test_error_upper_at_Q_star": float(ok["test_error_upper_tau1"].iloc[0]) if len(ok) else math.nan,
                     "Q_v5_bound": smallest_q("v5", int(K), target) or -1, "target": target})
    out = pd.DataFrame(rows)
    found = out[out["Q_star_found"]]
    a, b, r2 = fit_line(np.log(found["K"]), found["Q_star"]) if len(found) else (math.nan,) * 3
    fit = f"Q* = {a:.3g} + {b:.3g} log K, R2 = {r2:.3f}" if np.isfinite(a) else "not enough points"
    out["fit_Q_star_vs_logK"] = fit
    return out


def plot_scaling(summary: pd.DataFrame, table: pd.DataFrame, path) -> None:
    """Left: test error at τ_1 over the K × Q grid. Right: the smallest Q reaching the target per K,
    measured, beside the v5 bound's Q = Θ(log K) curve."""
    final = final_rows(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for i, (K, g) in enumerate(final.groupby("K", sort=True)):
        g = g.sort_values("Q")
        ax.plot(g["Q"], g["test_error_tau1"], "o-", color=plt.get_cmap("viridis")(i / max(1, final["K"].nunique() - 1)),
                label=f"K={K}")
    ax.axhline(table["target"].iloc[0], color="k", ls=":", lw=0.8, label=f"target {table['target'].iloc[0]:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("Q (samples per cluster)")
    ax.set_ylabel("test error at tau_1")
    ax.legend(fontsize=7)
    ax = axes[1]
    found = table[table["Q_star_found"]]
    ax.plot(found["K"], found["Q_star"], "o-", label="measured: smallest Q with test error <= target")
    ks = np.unique(np.geomspace(1, max(2, table["K"].max()), 50).round().astype(int))
    from .theory import smallest_q

    ax.plot(ks, [smallest_q("v5", int(k), table["target"].iloc[0]) for k in ks], "--",
            label="v5 bound <= target: Q = Theta(log K)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("K (number of concepts)")
    ax.set_ylabel("Q")
    ax.set_title(table["fit_Q_star_vs_logK"].iloc[0], fontsize=8)
    ax.legend(fontsize=7)
    save_fig(fig, path)
