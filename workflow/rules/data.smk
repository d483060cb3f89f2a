# Data: prepare each modality's data once (idempotent: `prepare-data` skips work when its manifest
# matches). The stamp (in this working directory's results, so that workflows sharing one data folder
# never invalidate each other) keeps what prepare-data reported; its params are only that modality's
# data config, so a changed text config re-prepares text and re-runs only the text runs.

rule prepare_data:
    output:
        f"{PATHS['results']}/data/prepared_{{modality}}.txt",
    params:
        data=lambda w: wfc.data_key(config, w.modality),
        config_file=f"{PATHS['logs']}/prepare_data/{{modality}}.data.json",
    log:
        f"{PATHS['logs']}/prepare_data/{{modality}}.log",
    threads: 2
    # before any training job (above any two other jobs' priorities together): it takes both cores, so once
    # training jobs hold one it waits while the other core idles (docs/TINY_SCALE.md: 115 s of one idle core)
    priority: 1000
    shell:
        "printf '%s' {params.data:q} > {params.config_file:q} && "
        "python -m d2v2 prepare-data --modalities {wildcards.modality:q} "
        "--config {params.config_file:q} > {output:q}.tmp 2> {log:q} && mv {output:q}.tmp {output:q}"
