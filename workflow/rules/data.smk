# Data: prepare each data modality once (idempotent: `prepare-data` skips work when its manifest
# matches). The stamp keeps what prepare-data reported; the params are the data config, so a changed
# data config re-prepares, and re-runs only the runs that read it (their params hold the data config).

DATA_ROOT = config["data"].get("root", "data")


rule prepare_data:
    output:
        f"{DATA_ROOT}/prepared_{{data_modality}}.txt",
    params:
        data=json.dumps(config["data"], sort_keys=True),
        config_file=f"{PATHS['logs']}/prepare_data/{{data_modality}}.data.json",
    wildcard_constraints:
        data_modality="image|speech|text",
    log:
        f"{PATHS['logs']}/prepare_data/{{data_modality}}.log",
    threads: 2
    shell:
        "printf '%s' {params.data:q} > {params.config_file} && "
        "python -m d2v2 prepare-data --root {DATA_ROOT} --modalities {wildcards.data_modality} "
        "--config {params.config_file} > {output}.tmp 2> {log} && mv {output}.tmp {output}"
