"""Snakemake adapter: rule base_model → a model built from the config, or a GGUF checkpoint converted once."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

from dpogen import model as M  # noqa: E402
from dpogen.data.stage import corpus, hf_pin_path, pin_hf_revision  # noqa: E402
from dpogen.workflow import job, settings_of  # noqa: E402

with job(snakemake) as log:
    # one base per seed and replicate: the replicate's data seeds (the tokenizer's corpus), the run's seed
    s = settings_of(snakemake, snakemake.params.replicate)
    m, d, seed = s.model, s.data, snakemake.params.seed
    if d.source == "gaussian":  # a linear head over answer tokens for as many concepts as d allows
        from dpogen.data.gaussian import vocabulary

        model, tok = M.build_linear_head(vocabulary(d.gaussian.d - 1, 1), d.gaussian.d, seed)
        M.save(model, tok, snakemake.output[0])
        log.info("base model: linear head, d=%d, vocabulary %d", d.gaussian.d, len(tok))
    elif m.source == "scratch":
        arch = m.scratch
        # the rows were validated by the check_data job this one waits for
        tok = M.train_tokenizer(corpus(pin_hf_revision(d, hf_pin_path(s.experiment)), arch.corpus_per_cluster),
                                arch.vocab_size)
        model = M.build_scratch(arch, tok, seed)
        M.save(model, tok, snakemake.output[0])
        log.info("base model: %s built from the config, %d parameters, vocabulary %d", arch.arch,
                 sum(p.numel() for p in model.parameters()), len(tok))
    else:
        p = m.pretrained
        M.convert_gguf(p.path, p.gguf_file, snakemake.output[0], m.dtype)
        log.info("base model: %s/%s converted to safetensors", p.path, p.gguf_file)
