# HuBERT's label chain (METHOD.md#baseline-hubert), for every speech/hubert run: MFCC labels -> iteration 1
# (a pretraining run of its own, hubert.iteration1_budget x the run's budget) -> labels of its block
# `hubert.layer` -> the compared run (iteration 2, made by the pretrain rule). speech/wavlm runs train on
# the default HuBERT run's second labels (METHOD.md#baseline-wavlm). All of it lives in
# runs/hubert_chain/<variant>/seed<seed>[-budget<s>]/ (d2v2/workflow/), cached: a changed cluster
# count re-runs only the labels and runs after it. The label jobs go through the launcher with the
# fine-tuning jobs' resources (SLURM jobs under --profile slurm; the model's features on a GPU there).

CHAIN_DIR = f"{PATHS['runs']}/hubert_chain/{{variant}}/seed{{seed}}{{sweep}}"
CHAIN_LOGS = f"{PATHS['logs']}/hubert_chain/{{variant}}/seed{{seed}}{{sweep}}"


CHAINS = wfc.label_chains(config, RUNS.values())     # chain folder -> the HuBERT run it belongs to
CHAIN_PRIORITY = wfc.job_priority(config, "speech", "label_chain")


def labels_params(iteration):
    """The launcher's names for a chain's label job ``iteration`` (every path reaches the shell quoted)."""
    return {"job_name": f"hubert-labels:{CHAIN_DIR}/labels{iteration}", "slurm_folder": f"{CHAIN_DIR}/labels{iteration}/slurm/%j",
            "job_file": f"{CHAIN_DIR}/labels{iteration}/slurm_job.json"}


def hubert_run(w):
    """The HuBERT run a chain belongs to (a compared run's, or the default one's when only WavLM needs it)."""
    return CHAINS[f"{PATHS['runs']}/hubert_chain/{w.variant}/seed{w.seed}{w.sweep}"]


rule hubert_labels_mfcc:
    input:
        f"{PATHS['results']}/data/prepared_speech.txt",
    output:
        km=f"{CHAIN_DIR}/labels1/pretrain.km",
        info=f"{CHAIN_DIR}/labels1/labels.json",
    params:
        args=lambda w: shlex.join(wfc.hubert_labels_args(config, hubert_run(w), 1)),
        **labels_params(1),
    log:
        f"{CHAIN_LOGS}/labels1.log",
    threads: training_threads("finetune")
    priority: CHAIN_PRIORITY
    resources:
        slurm_jobs=int(ON_SLURM),
    shell:
        FINETUNE_LAUNCH + " python -m d2v2 hubert-labels {params.args} > {log:q} 2>&1"


rule hubert_iteration1:
    input:
        f"{CHAIN_DIR}/labels1/pretrain.km",
    output:
        done=f"{CHAIN_DIR}/iteration1/DONE",
        summary=f"{CHAIN_DIR}/iteration1/summary.json",
    params:
        request=lambda w: json.dumps(wfc.hubert_iteration1_config(config, hubert_run(w)), sort_keys=True),
        run_dir=f"{CHAIN_DIR}/iteration1",
        job_name=f"pretrain:{CHAIN_DIR}/iteration1",
        slurm_folder=f"{CHAIN_DIR}/iteration1/slurm/%j",
        job_file=f"{CHAIN_DIR}/iteration1/slurm_job.json",
        run_config=f"{CHAIN_DIR}/iteration1/run.yaml",
    log:
        f"{CHAIN_LOGS}/iteration1.log",
    threads: training_threads("pretrain")
    priority: CHAIN_PRIORITY
    resources:
        slurm_jobs=int(ON_SLURM),
    shell:
        PRETRAIN_SHELL


rule hubert_labels_layer:
    input:
        f"{CHAIN_DIR}/iteration1/DONE",
    output:
        km=f"{CHAIN_DIR}/labels2/pretrain.km",
        info=f"{CHAIN_DIR}/labels2/labels.json",
    params:
        args=lambda w: shlex.join(wfc.hubert_labels_args(config, hubert_run(w), 2)),
        **labels_params(2),
    log:
        f"{CHAIN_LOGS}/labels2.log",
    threads: training_threads("finetune")
    priority: CHAIN_PRIORITY
    resources:
        slurm_jobs=int(ON_SLURM),
    shell:
        FINETUNE_LAUNCH + " python -m d2v2 hubert-labels {params.args} > {log:q} 2>&1"
