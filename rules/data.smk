# Stage 1, data: preference pairs → validated train/test tables and a data card.


# every row of the source, all concepts, validated before anything else reads them: the scratch tokenizer
# (rule base_model) waits for it
rule check_data:
    input:
        files=data_files(SETTINGS.data, all_concepts=True),
    output:
        f"{OUT}/check_data.json",
    log:
        f"{LOGS}/check_data.log",
    conda:
        "../envs/dpogen.yaml"
    params:
        data=SETTINGS.data.model_dump(exclude={"k"}),
        code=code("check_data"),
    script:
        "../workflow_scripts/check_data.py"


rule data:
    input:
        base=base_input,
        files=lambda w: data_files(RS[w.run].data),  # local data files: editing one reruns
    output:
        train=f"{RUN}/data/train.parquet",
        test=f"{RUN}/data/test.parquet",
        card=f"{RUN}/data/card.json",
        card_md=f"{RUN}/data/card.md",
    log:
        f"{LOGS}/data/{{run}}.log",
    conda:
        "../envs/dpogen.yaml"
    params:
        data=lambda w: RS[w.run].data.model_dump(),
        tokenizer=base_param,
        code=code("data"),
    script:
        "../workflow_scripts/data.py"
