# Stage 2, sft: the base model (built from a config for the offline default, or converted from a GGUF
# file once) and the reference model.


rule base_model:
    input:
        # the tokenizer's corpus when it is trained on the data's text
        files=(
            data_files(SETTINGS.data, all_concepts=True)
            if MODEL.source == "scratch"
            else []
        ),
        # validated rows first: an edit of a data file reruns check_data, and what follows it
        check=[f"{OUT}/check_data.json"] if CHECKS_DATA else [],
    output:
        directory(f"{OUT}/{{base}}"),
    log:
        f"{LOGS}/{{base}}.log",
    wildcard_constraints:
        base="|".join(BASES),
    conda:
        "../envs/dpogen.yaml"
    params:
        model=MODEL.model_dump(),
        # the tokenizer's corpus: all concepts, the data seeds of the replicate
        data=lambda w: base_settings(config, BASES[w.base][1]).data.model_dump(
            exclude={"k"}
        ),
        seed=lambda w: BASES[w.base][0],
        replicate=lambda w: BASES[w.base][1],
        code=code("base_model"),  # includes the data modules that read the corpus
    script:
        "../workflow_scripts/base_model.py"


rule sft:
    input:
        base=base_input,
        train=f"{RUN}/data/train.parquet",
    output:
        directory(f"{RUN}/sft"),
    log:
        f"{LOGS}/sft/{{run}}.log",
    conda:
        "../envs/dpogen.yaml"
    threads: THREADS
    resources:
        **multinode("sft"),
        gpu=planned("sft", "gpus"),
        mem_mb=planned("sft", "mem_mb"),
    params:
        base=base_param,
        sft=lambda w: {
            **RS[w.run].sft.rule_params(),
            "dtype": MODEL.dtype,
            **engine_settings(RS[w.run]),
            **WITH_LOAD,
        },
        seed=lambda w: RS[w.run].seed,
        threads=THREADS,
        code=code("sft"),
    script:
        "../workflow_scripts/sft.py"
