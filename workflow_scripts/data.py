"""Snakemake adapter: rule data → dpogen.data.stage.prepare."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the tracked library, not an installed copy

from dpogen.data.stage import hf_pin_path, pin_hf_revision, prepare  # noqa: E402
from dpogen.model import context_length, load_tokenizer  # noqa: E402
from dpogen.workflow import job, settings_of  # noqa: E402

with job(snakemake) as log:
    s = settings_of(snakemake)
    base, options = snakemake.params.tokenizer, s.model.load_options()
    tokenizer = load_tokenizer(base, **options) if base else None
    d = pin_hf_revision(s.data, hf_pin_path(s.experiment))
    card = prepare(d, d.k, snakemake.output.train, snakemake.output.test, snakemake.output.card,
                   snakemake.output.card_md, tokenizer=tokenizer,
                   context=context_length(base, **options) if base else None)
    log.info("data: K=%d N=%d test=%d Z=%d", card["K"], card["N"], card["n_test"], card["Z"])
