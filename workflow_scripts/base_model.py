"""Snakemake adapter: rule base_model → tokenizer and model built from the config."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

from dpogen import model as M  # noqa: E402
from dpogen.data import corpus  # noqa: E402
from dpogen.workflow import job  # noqa: E402

with job(snakemake) as log:
    m = snakemake.params.model
    arch = m["scratch"]
    texts = corpus(snakemake.params.data, arch["corpus_per_cluster"])
    tok = M.train_tokenizer(texts, arch["vocab_size"])
    model = M.build_scratch(arch, tok, snakemake.params.seed)
    M.save(model, tok, snakemake.output[0])
    log.info("base model: %s, %d parameters, vocabulary %d", arch["arch"],
             sum(p.numel() for p in model.parameters()), len(tok))
