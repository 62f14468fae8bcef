"""Stage 1, data: the sources (persona files, any datasets.load_dataset source, local files, the offline
synthetic generator, the theorems' gaussian world), their validation and split, and the data card."""
