# Stage 1, data: preference pairs → validated train/test tables and a data card.


rule data:
    input:
        base=base_input,
        files=lambda w: data_files(rcfg(w)["data"]),  # local data files: editing one reruns
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
        data=lambda w: rcfg(w)["data"],
        tokenizer=base_param,
        code=code("data"),
    script:
        "../workflow_scripts/data.py"
