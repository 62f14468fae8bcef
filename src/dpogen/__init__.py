"""dpogen: DPO training with per-sample margin tracking, next to the theory of Im & Li (arXiv 2408.03459)."""

__version__ = "0.1.0"
