"""Numbers the paper reports (THEORY.md section 5), for setting a run beside them."""

# End-of-training test error and mean train margin per K, v5 full fine-tuning (60 steps).
FULL_FT_V5 = {
    "mistral-7b-v0.3": {1: (0.0, 1.991), 2: (0.008, 1.873), 4: (0.036, 1.848), 8: (0.056, 1.731)},
    "qwen3-8b-base": {1: (0.0, 0.65), 2: (0.027, 0.6), 4: (0.098, 0.435), 8: (0.183, 0.232)},
}
# R² of the linear fit of test error against K (v5), by model.
R2_V5 = {"llama-3.1-8b": 0.97, "mistral-7b-v0.3": 0.95, "qwen3-8b-base": 0.99}


def comparison_rows(model: str, final) -> list[str]:
    """Markdown rows: this run's test error and train margin beside the paper's, per K."""
    ref = FULL_FT_V5.get(model)
    if ref is None:
        return []
    lines = [f"Beside the paper (v5, full fine-tuning of {model}, end of training):", "",
             "| K | test error (this run) | test error (paper) | train margin (this run) | train margin (paper) |",
             "|---|---|---|---|---|"]
    for _, r in final.iterrows():
        paper = ref.get(int(r["K"]))
        pe, pm = (f"{paper[0]:.3f}", f"{paper[1]:.3f}") if paper else ("-", "-")
        lines.append(f"| {int(r['K'])} | {r['test_error']:.3f} | {pe} | {r['train_margin_mean']:.3f} | {pm} |")
    if model in R2_V5:
        lines += ["", f"The paper's R² of test error against K for {model}: {R2_V5[model]:.2f}."]
    return lines + [""]
