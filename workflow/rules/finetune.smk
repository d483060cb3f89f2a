# Fine-tuning: every kept checkpoint of every run (the points of the accuracy-vs-time curves), with the
# same recipe for every method, plus (optionally) a randomly initialised encoder as the no-pretraining
# reference. One metrics JSON per fine-tune (docs/ARCHITECTURE.md, "Run directory").

METRICS = PATHS["metrics"]


rule finetune:
    input:
        done=f"{RUN_DIR}/DONE",
    output:
        f"{METRICS}/{{modality}}/{{method}}/{{variant}}/seed{{seed}}/f{{fraction}}.json",
    params:
        ft_config=lambda w: json.dumps(wfc.finetune_request(config, run_of(w), float(w.fraction)), sort_keys=True),
        checkpoint=lambda w: f"{PATHS['runs']}/{run_of(w).key}/checkpoints/checkpoint_f{w.fraction}.pt",
    log:
        f"{PATHS['logs']}/finetune/{{modality}}/{{method}}/{{variant}}/seed{{seed}}/f{{fraction}}.log",
    threads: training_threads("finetune")
    resources:
        slurm_jobs=int(ON_SLURM),
    run:
        ft_file = Path(str(log)).with_suffix(".yaml")
        ft_file.parent.mkdir(parents=True, exist_ok=True)
        ft_file.write_text(params.ft_config + "\n")
        launch = wfc.launch_command(config, "finetune", name=f"finetune:{run_of(wildcards).key}:f{wildcards.fraction}",
                                    folder=f"{PATHS['logs']}/slurm/%j",
                                    job_file=str(Path(str(log)).with_suffix(".slurm_job.json")))
        shell(launch + f" python -m d2v2 finetune --config {ft_file} --checkpoint {params.checkpoint} "
              f"--out {output} > {log} 2>&1")


rule finetune_random_init:
    input:
        lambda w: f"{PATHS['results']}/data/prepared_{wfc.DATA_MODALITY[w.modality]}.txt",
    output:
        f"{METRICS}/{{modality}}/random_init/seed{{seed}}.json",
    params:
        ft_config=lambda w: json.dumps(wfc.random_init_request(config, w.modality, int(w.seed)), sort_keys=True),
    log:
        f"{PATHS['logs']}/finetune/{{modality}}/random_init/seed{{seed}}.log",
    threads: training_threads("finetune")
    resources:
        slurm_jobs=int(ON_SLURM),
    run:
        ft_file = Path(str(log)).with_suffix(".yaml")
        ft_file.parent.mkdir(parents=True, exist_ok=True)
        ft_file.write_text(params.ft_config + "\n")
        launch = wfc.launch_command(config, "finetune", name=f"finetune:{wildcards.modality}:random_init",
                                    folder=f"{PATHS['logs']}/slurm/%j",
                                    job_file=str(Path(str(log)).with_suffix(".slurm_job.json")))
        shell(launch + f" python -m d2v2 finetune --config {ft_file} --out {output} > {log} 2>&1")
