"""Stage 5, report: one run's summary and the sweep's (summary), the figures, the pair map of doubtful
pairs, and the paper's own numbers to set beside a run's."""
