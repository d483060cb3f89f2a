# Fine-tuning: every kept checkpoint of every run (the points of the accuracy-vs-time curves), with the
# same recipe for every method, plus (optionally) a randomly initialised encoder as the no-pretraining
# reference. One metrics JSON per fine-tune (docs/ARCHITECTURE.md, "Run directory").

FT_LOG = f"{PATHS['logs']}/finetune/{{modality}}/{{method}}/{{variant}}/seed{{seed}}{{sweep}}/f{{fraction}}"


def ft_launch_params(prefix):
    """The file names a fine-tuning job writes next to its log (every path reaches the shell quoted)."""
    return {"ft_yaml": f"{prefix}.yaml", "job_name": f"finetune:{prefix}", "slurm_folder": f"{PATHS['logs']}/slurm/%j",
            "job_file": f"{prefix}.slurm_job.json"}


FT_WRITE_CONFIG = "printf '%s\\n' {params.ft_config:q} > {params.ft_yaml:q} && "


rule finetune:
    input:
        done=f"{RUN_DIR}/DONE",
    output:
        f"{METRICS}/{{modality}}/{{method}}/{{variant}}/seed{{seed}}{{sweep}}/f{{fraction}}.json",
    params:
        ft_config=lambda w: json.dumps(wfc.finetune_request(config, run_of(w), float(w.fraction)), sort_keys=True),
        checkpoint=f"{RUN_DIR}/checkpoints/checkpoint_f{{fraction}}.pt",
        **ft_launch_params(FT_LOG),
    log:
        f"{FT_LOG}.log",
    threads: training_threads("finetune")
    priority: lambda w: wfc.job_priority(config, w.modality, "finetune")
    resources:
        slurm_jobs=int(ON_SLURM),
    shell:
        FT_WRITE_CONFIG + FINETUNE_LAUNCH
        + " python -m d2v2 finetune --config {params.ft_yaml:q} --checkpoint {params.checkpoint:q} --out {output:q}"
        " > {log:q} 2>&1"


RANDOM_LOG = f"{PATHS['logs']}/finetune/{{modality}}/random_init/seed{{seed}}"


rule finetune_random_init:
    input:
        lambda w: f"{PATHS['results']}/data/prepared_{w.modality}.txt",
    output:
        f"{METRICS}/{{modality}}/random_init/seed{{seed}}.json",
    params:
        ft_config=lambda w: json.dumps(wfc.random_init_request(config, w.modality, int(w.seed)), sort_keys=True),
        **ft_launch_params(RANDOM_LOG),
    log:
        f"{RANDOM_LOG}.log",
    threads: training_threads("finetune")
    priority: lambda w: wfc.job_priority(config, w.modality, "finetune")
    resources:
        slurm_jobs=int(ON_SLURM),
    shell:
        FT_WRITE_CONFIG + FINETUNE_LAUNCH + " python -m d2v2 finetune --config {params.ft_yaml:q} --out {output:q} > {log:q} 2>&1"
