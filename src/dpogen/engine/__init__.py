"""The dpo stage's training engine: loss, schedule, policy regimes, parallelism, resume state, the loop."""
