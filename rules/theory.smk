# Stage 4, theory: geometry of g(x), the paper's bounds with their conditions, held-out certificates.


rule theory:
    input:
        train=f"{RUN}/data/train.parquet",
        card=f"{RUN}/data/card.json",
        ref_logps=f"{RUN}/dpo/ref_logps.parquet",
        features=f"{RUN}/dpo/ref_features.npy",
        margins=f"{RUN}/dpo/margins.parquet",
        policy_features=f"{RUN}/dpo/features",
    output:
        claims=f"{RUN}/theory/claims.parquet",
        bounds=f"{RUN}/theory/bounds.parquet",
        conditions=f"{RUN}/theory/conditions.parquet",
        certificates=f"{RUN}/theory/certificates.parquet",
        geometry=f"{RUN}/theory/geometry.parquet",
        predicted=f"{RUN}/theory/predicted.parquet",
        dynamics=f"{RUN}/theory/dynamics.parquet",
        attribution=f"{RUN}/theory/attribution.parquet",
        interference=f"{RUN}/theory/interference.parquet",
    log:
        f"{LOGS}/theory/{{run}}.log",
    conda:
        "../envs/dpogen.yaml"
    params:
        theory=lambda w: rcfg(w)["theory"],
        dpo=lambda w: {k: rcfg(w)["dpo"][k] for k in THEORY_FROM_DPO},
        code=code("theory"),
    script:
        "../workflow_scripts/theory.py"
