# Pretraining: one job per run (modality, method, variant, seed) under the modality's matched budget.
# The job is `python -m d2v2 launch ... -- python -m d2v2 pretrain --config RUN/run.yaml --out RUN`:
# local child process or checkpointable SLURM job (requeued on timeout/preemption, re-attached after a
# Snakemake restart through RUN/slurm_job.json). Outputs are DONE and summary.json only: the kept
# checkpoints are read through DONE, so a resumed run never has its earlier checkpoints deleted under
# it. The params hold only this run's own config: other runs' edits never re-run it.

RUN_DIR = f"{PATHS['runs']}/{{modality}}/{{method}}/{{variant}}/seed{{seed}}"


def run_of(wildcards):
    return RUNS[f"{wildcards.modality}/{wildcards.method}/{wildcards.variant}/seed{wildcards.seed}"]


def training_threads(kind):
    """Cores the rule takes on this machine: the job's threads locally, none while SLURM runs it."""
    return config["launcher"][f"{kind}_threads"] if config["launcher"]["backend"] == "local" else 1


wildcard_constraints:
    modality="image|audio|text",
    method="[A-Za-z0-9_]+",
    variant="[^/]+",
    seed=r"\d+",
    fraction=r"\d\.\d{3}",


rule pretrain:
    input:
        lambda w: f"{DATA_ROOT}/prepared_{wfc.DATA_MODALITY[w.modality]}.txt",
    output:
        done=f"{RUN_DIR}/DONE",
        summary=f"{RUN_DIR}/summary.json",
    params:
        run_config=lambda w: json.dumps(wfc.run_config(config, run_of(w)), sort_keys=True),
    log:
        f"{PATHS['logs']}/pretrain/{{modality}}/{{method}}/{{variant}}/seed{{seed}}.log",
    threads: training_threads("pretrain")
    run:
        run_dir = Path(output.done).parent
        request = json.loads(params.run_config)
        moved = wfc.prepare_run_dir(run_dir, request)
        if moved is not None:
            print(f"{run_dir}: its config changed; the previous run was moved to {moved}")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.yaml").write_text(params.run_config + "\n")   # JSON is YAML
        launch = wfc.launch_command(config, "pretrain", name=f"pretrain:{run_of(wildcards).key}",
                                    folder=f"{run_dir}/slurm/%j", job_file=f"{run_dir}/slurm_job.json")
        shell(launch + f" python -m d2v2 pretrain --config {run_dir}/run.yaml --out {run_dir} > {log} 2>&1")
