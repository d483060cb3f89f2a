# Helpers every rule file uses (included first by the Snakefile): the output layout, the run behind a
# job's wildcards, the wildcards' shapes, and the launch commands of training jobs.

RESULTS = PATHS["results"]
METRICS = PATHS["metrics"]

# {sweep}: empty for a full run, "-budget0.250" for a budget sweep's run (d2v2/workflow/)
RUN_DIR = f"{PATHS['runs']}/{{modality}}/{{method}}/{{variant}}/seed{{seed}}{{sweep}}"


def run_of(wildcards):
    return RUNS[f"{wildcards.modality}/{wildcards.method}/{wildcards.variant}/seed{wildcards.seed}{wildcards.sweep}"]


ON_SLURM = config["launcher"]["backend"] == "slurm"


def training_threads(kind):
    """Cores the rule takes on this machine: the job's threads locally; none while SLURM runs it (the
    cluster schedules; the slurm profile caps jobs in flight with the `slurm_jobs` resource)."""
    return 0 if ON_SLURM else config["launcher"][f"{kind}_threads"]


wildcard_constraints:
    modality="|".join(wfc.MODALITIES),
    method="[A-Za-z0-9_]+",
    variant="[^/]+",
    seed=r"\d+",
    sweep=r"(-budget\d\.\d{3})?",
    fraction=r"\d\.\d{3}",


# The command of a pretraining job, from the rule's params (the pretrain rule's and HuBERT's iteration 1).
PRETRAIN_SHELL = (
    "python -m d2v2 prepare-run {params.run_dir:q} {params.request:q} > {log:q} 2>&1 && "
    + wfc.launch_command(config, "pretrain", name="{params.job_name:q}", folder="{params.slurm_folder:q}",
                         job_file="{params.job_file:q}")
    + " python -m d2v2 pretrain --config {params.run_config:q} --out {params.run_dir:q} >> {log:q} 2>&1"
)


# The launch prefix of a fine-tuning-sized job (fine-tunes and HuBERT's label jobs), from the rule's params.
FINETUNE_LAUNCH = wfc.launch_command(config, "finetune", name="{params.job_name:q}", folder="{params.slurm_folder:q}",
                                     job_file="{params.job_file:q}")


def all_metrics():
    """Every fine-tuning metrics file the config asks for (targets of `rule all`)."""
    files = [f"{METRICS}/{run.key}/f{wfc.fraction_tag(fraction)}.json" for run in RUNS.values()
             for fraction in wfc.finetune_fractions(config, run)]
    if config["finetune_random_init"]:
        files += [f"{METRICS}/{m}/random_init/seed{s}.json" for m in config["modalities"] for s in config["seeds"]]
    return files
