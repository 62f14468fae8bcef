"""Numbers the paper reports (docs/theory.md section 5), for setting a run beside them."""

# Per model the paper trains: where it reports it, how it trains it, and the numbers it gives. per_k: the
# end-of-training test error and mean train margin per K (None where the paper shows figures only); r2: the
# R² of the linear fit of test error against K (None where not reported).
PAPER = {
    "llama-2-7b": {"where": "v3", "training": "full fine-tuning (AdamW, lr 1e-5, beta 0.01)", "per_k": None,
                   "r2": None},
    "llama-3.1-8b-last-layer": {"where": "v5", "training": "last layer (Adam, lr 1e-3, beta 0.01, full batch, "
                                "100 steps)", "per_k": None, "r2": None},
    "llama-3.1-8b": {"where": "v5", "training": "full fine-tuning (60 steps)", "per_k": None, "r2": 0.97},
    "mistral-7b-v0.3": {"where": "v5", "training": "full fine-tuning (60 steps)", "r2": 0.95,
                        "per_k": {1: (0.0, 1.991), 2: (0.008, 1.873), 4: (0.036, 1.848), 8: (0.056, 1.731)}},
    "qwen3-8b-base": {"where": "v5", "training": "full fine-tuning (60 steps)", "r2": 0.99,
                      "per_k": {1: (0.0, 0.65), 2: (0.027, 0.6), 4: (0.098, 0.435), 8: (0.183, 0.232)}},
}


def comparison_rows(model: str, final) -> list[str]:
    """Markdown lines: this run's test error and train margin beside the paper's, per K (``final``: one row per
    run or group, with K, test_error and train_margin_mean), and the paper's R² where it gives one."""
    ref = PAPER[model]
    head = f"The paper ({ref['where']}, {model}, {ref['training']})"
    lines = []
    if ref["per_k"]:
        lines += [f"{head}, end of training, beside this experiment:", "",
                  "| K | test error (here) | test error (paper) | train margin (here) | train margin (paper) |",
                  "|---|---|---|---|---|"]
        for _, r in final.iterrows():
            paper = ref["per_k"].get(int(r["K"]))
            pe, pm = (f"{paper[0]:.3f}", f"{paper[1]:.3f}") if paper else ("-", "-")
            lines.append(f"| {int(r['K'])} | {r['test_error']:.3f} | {pe} | {r['train_margin_mean']:.3f} | {pm} |")
        lines.append("")
    else:
        lines.append(f"{head} shows its margins and errors in figures only; no numbers per K to set beside these.")
    if ref["r2"] is not None:
        lines.append(f"The paper's R² of test error against K for {model}: {ref['r2']:.2f}.")
    return lines + [""]
