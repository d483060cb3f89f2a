# Results: the resolved config, the tidy tables (d2v2 collect) and the figures + report (d2v2 report).
# Figures and tables carry report() annotations for `snakemake --report report.html`.


rule resolved_config:
    output:
        f"{RESULTS}/config.yaml",
    params:
        text=yaml.safe_dump(dict(config), sort_keys=False),
    shell:
        "printf '%s' {params.text:q} > {output:q}.tmp && mv {output:q}.tmp {output:q}"


rule collect:
    input:
        metrics=all_metrics(),
        runs=[f"{PATHS['runs']}/{key}/summary.json" for key in RUNS],
    output:
        evals=report(f"{RESULTS}/tables/evals.csv", category="Tables", caption="../report/evals.rst"),
        evals_parquet=f"{RESULTS}/tables/evals.parquet",
        runs=report(f"{RESULTS}/tables/runs.csv", category="Tables", caption="../report/runs.rst"),
        runs_parquet=f"{RESULTS}/tables/runs.parquet",
        progress=report(f"{RESULTS}/tables/progress.csv", category="Tables", caption="../report/progress.rst"),
        progress_parquet=f"{RESULTS}/tables/progress.parquet",
    params:
        tables=f"{RESULTS}/tables",
    log:
        f"{PATHS['logs']}/collect.log",
    shell:
        "python -m d2v2 collect --metrics {input.metrics:q} --runs {input.runs:q} --out {params.tables:q} > {log:q} 2>&1"


rule report:
    input:
        evals=rules.collect.output.evals_parquet,
        runs=rules.collect.output.runs_parquet,
        progress=rules.collect.output.progress_parquet,
        config=rules.resolved_config.output[0],
    output:
        figures=report(directory(f"{RESULTS}/figures"), patterns=["{name}.png"], category="Figures",
                       caption="../report/figures.rst"),
        markdown=f"{RESULTS}/report.md",
        html=report(f"{RESULTS}/report.html", category="Report", caption="../report/report.rst"),
        derived=directory(f"{RESULTS}/derived"),
    params:
        clock=config["report"]["clock"],
        targets=" ".join(f"--target {shlex.quote(f'{key}={value}')}" for key, value in config["report"]["targets"].items()),
        bootstrap=config["report"]["bootstrap"],
        tables=f"{RESULTS}/tables",
        out=RESULTS,
    log:
        f"{PATHS['logs']}/report.log",
    shell:
        "python -m d2v2 report --tables {params.tables:q} --config {input.config:q} --out {params.out:q} "
        "--clock {params.clock:q} --bootstrap {params.bootstrap:q} {params.targets} > {log:q} 2>&1"
