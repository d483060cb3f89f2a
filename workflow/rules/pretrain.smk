# Pretraining: one job per run (modality, method, variant, seed) under the modality's matched budget.
# The job is `python -m d2v2 launch ... -- python -m d2v2 pretrain --config RUN/run.yaml --out RUN`:
# local child process or checkpointable SLURM job (requeued on timeout/preemption, re-attached after a
# Snakemake restart through RUN/slurm_job.json). Outputs are DONE and summary.json only: the kept
# checkpoints are read through DONE, so a resumed run never has its earlier checkpoints deleted under
# it. The params hold only this run's own config: other runs' edits never re-run it. Plain shell (no
# `run:` block): a `run:` job would re-parse the whole workflow in a new Snakemake process.

def pretrain_inputs(w):
    """The prepared data, and a HuBERT or WavLM run's labels (its chain, rules/hubert.smk)."""
    inputs = [f"{PATHS['results']}/data/prepared_{w.modality}.txt"]
    if w.method in wfc.LABEL_CHAIN_METHODS:
        chain = wfc.hubert_chain(config, run_of(w))
        inputs += [f"{chain}/labels2/pretrain.km"] + [f"{chain}/{step}" for step in wfc.HUBERT_INPUT_COSTS]
    return inputs


rule pretrain:
    input:
        pretrain_inputs,
    output:
        done=f"{RUN_DIR}/DONE",
        summary=f"{RUN_DIR}/summary.json",
    params:
        request=lambda w: json.dumps(wfc.run_config(config, run_of(w)), sort_keys=True),
        run_dir=RUN_DIR,
        job_name=f"pretrain:{RUN_DIR}",
        slurm_folder=f"{RUN_DIR}/slurm/%j",
        job_file=f"{RUN_DIR}/slurm_job.json",
        run_config=f"{RUN_DIR}/run.yaml",
    log:
        f"{PATHS['logs']}/pretrain/{{modality}}/{{method}}/{{variant}}/seed{{seed}}{{sweep}}.log",
    threads: training_threads("pretrain")
    priority: lambda w: wfc.job_priority(config, w.modality, "pretrain")
    resources:
        slurm_jobs=int(ON_SLURM),
    shell:
        PRETRAIN_SHELL
