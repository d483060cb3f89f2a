"""Figures and the report render from the fixture tables; the HTML is self-contained."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from d2v2.analysis import collect, report

FIXTURE = Path(__file__).parent / "fixtures" / "analysis"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    tables = root / "tables"
    assert collect.main(["--metrics", str(FIXTURE / "metrics"), "--runs", str(FIXTURE / "runs"),
                         "--out", str(tables)]) == 0
    config = root / "config.yaml"
    config.write_text("preset: tiny\nseeds: [0, 1, 2]\n")
    assert report.main(["--tables", str(tables), "--config", str(config), "--out", str(root),
                        "--bootstrap", "200"]) == 0
    return root


def test_figures_exist_as_png_and_svg(rendered):
    figs = rendered / "figures"
    for name in ("curves_image_fmnist", "curves_speech_synth-words", "speedups", "paper_efficiency",
                 "ablation_image_data2vec2_num_masks", "ablation_image_data2vec2_curves", "training_image"):
        assert (figs / f"{name}.png").stat().st_size > 10_000, name
        assert (figs / f"{name}.svg").read_text().lstrip().startswith("<?xml")


def test_html_is_self_contained_and_has_the_scorecard(rendered):
    page = (rendered / "report.html").read_text()
    assert "<h2>Scorecard: the paper&#x27;s claims beside this run</h2>" in page
    assert page.count("src='data:image/png;base64,") == 7
    assert "<h2>Pretraining health</h2>" in page
    assert not re.search(r"(src|href)=['\"](?!data:)", page)          # nothing loaded from elsewhere
    assert "<link" not in page and "<script" not in page
    assert "16.4x (ViT-B)" in page and "seeds: [0, 1, 2]" in page       # claim and the exact config


def test_numbers_come_from_the_tables(rendered):
    md = (rendered / "report.md").read_text()
    speedups = pd.read_csv(rendered / "derived" / "speedups.csv")
    row = speedups[(speedups.modality == "image") & (speedups.variant == "default")
                   & (speedups.clock == "train_time_s")].iloc[0]
    # fixture: MAE's median final accuracy 0.72 at 60 s; data2vec 2.0 crosses it at 25 s
    assert row["target"] == pytest.approx(0.72) and row["speedup"] == pytest.approx(2.4)
    assert f"data2vec 2.0 vs MAE: {row['speedup_text']}" in md
    audio = speedups[(speedups.modality == "speech") & (speedups.clock == "train_time_s")].iloc[0]
    # WER (lower is better): data2vec 1.0 final 0.55 at 60 s; data2vec 2.0 crosses 0.55 at 20 + 20/3 s
    assert audio["speedup"] == pytest.approx(60 / (20 + 20 / 3))
    card = pd.read_csv(rendered / "derived" / "scorecard.csv")
    assert set(card["data2vec 2.0 vs"]) >= {"MAE", "wav2vec 2.0", "RoBERTa (MLM)"}
    for section in ("## Summary", "## Provenance", "## Configuration", "## Caveats", "## Ablations"):
        assert section in md
    # the fixture ablates M: the paper's multi-mask table beside it, not its block-width one
    assert "The paper's ablation multimask" in md and "ablation block width" not in md
    assert "No numbers of the paper to compare with" not in md
    assert "0123456789abcdef" in md and "Fixture CPU" in md
    reference = md.split("Fine-tuned from random initialisation", 1)[1].split("\n\n")[1]
    assert reference.startswith("| modality | task | metric | seeds | median |")      # no pretraining columns
    assert "data2vec2" not in reference and "fmnist" in reference


def test_the_summary_says_in_words_whether_pretraining_beat_random_init(rendered):
    """Fixture: image data2vec 2.0 0.80 and MAE 0.72 (medians of 3 seeds) against random init 0.555 (2 seeds);
    speech has no random-init fine-tune, so no line."""
    summary = (rendered / "report.md").read_text().split("## Summary", 1)[1].split("\n## ", 1)[0]
    lines = summary.split("Did pretraining pay at all?", 1)[1].split("\n\n")[1].splitlines()
    assert lines == ["- image (fmnist, accuracy, higher is better; random init 0.555): pretraining paid for every "
                     "method (data2vec 2.0 0.8, MAE 0.72); medians of 3 / 3 seed(s), random init 2."]


@pytest.mark.parametrize("values, verdict", [
    ((0.6, 0.8), "pretraining paid for no method (data2vec 2.0 0.6, MAE 0.8), so a speedup between them is no test"),
    ((0.4, 0.7), "pretraining paid for data2vec 2.0 0.4, not for MAE 0.7;"),
    ((0.5, 0.6), "pretraining paid for no method (data2vec 2.0 0.5, MAE 0.6)")])      # a tie is not a gain
def test_random_init_sentence_sorts_best_first_and_respects_lower_is_better(values, verdict):
    quality = pd.DataFrame({"method": ["mae", "data2vec2"], "median": values[::-1], "seeds": [2, 3]})
    reference = pd.Series({"modality": "speech", "task": "ctc", "metric": "test_cer", "median": 0.5, "seeds": 1})
    line = report.random_init_sentence(quality, reference, higher_is_better=False)
    assert line.startswith("speech (ctc, cer, lower is better; random init 0.5): ") and verdict in line
    assert line.endswith("medians of 3 / 2 seed(s), random init 1.")


def test_report_errors_name_the_problem(tmp_path, capsys):
    assert report.main(["--tables", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "evals.parquet: not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main(["--tables", str(tmp_path), "--out", str(tmp_path), "--target", "image-mae"])
    assert "expected MODALITY:BASELINE=VALUE" in capsys.readouterr().err


def test_report_without_baselines_says_so(tmp_path):
    files = sorted(str(p) for p in (FIXTURE / "metrics").glob("image-data2vec2-default-*.json"))
    assert collect.main(["--metrics", *files, "--out", str(tmp_path / "tables")]) == 0
    assert report.main(["--tables", str(tmp_path / "tables"), "--out", str(tmp_path), "--bootstrap", "50"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "no baseline with a data2vec 2.0 comparison" in md and "No workflow configuration was given" in md


def test_training_figure_one_legend_entry_per_method_and_variant_colours_fixed_per_method(tmp_path, monkeypatch):
    from matplotlib.colors import to_rgb

    from d2v2.analysis import figures

    runs = [("data2vec2", "default", 0, ""), ("data2vec2", "default", 1, ""), ("data2vec2", "M2", 0, ""),
            ("mae", "default", 0, ""), ("data2vec2", "default", 0, "-budget0.500")]      # the last: a sweep's run
    rows = [{"run_dir": f"{m}{v}{s}{sweep}", "modality": "image", "method": m, "variant": v, "seed": s,
             "device_count": 1, "updates": u, "train_time_s": (10.0 if sweep else 30.0) * u, "e2e_time_s": 33.0 * u,
             "device_hours": 30.0 * u / 3600, "loss": 1.0 / u}
            for m, v, s, sweep in runs for u in (1, 2)]
    lines, drawn, save = {}, [], figures.save
    monkeypatch.setattr(figures, "save", lambda fig, out, name: (
        lines.update({ln.get_label(): ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")}),
        drawn.extend(fig.axes[0].get_lines()), save(fig, out, name))[2])
    [(png, caption)] = figures.plot_training(pd.DataFrame(rows), tmp_path)
    assert sorted(lines) == ["MAE", "data2vec 2.0", "data2vec 2.0 M2"]
    assert png.name == "training_image.png" and "(5 runs)" in caption
    # one line per run, each in its own time order: a sweep's run is not joined to the full run of its seed
    assert sorted(tuple(ln.get_xdata()) for ln in drawn) == [(10.0, 20.0)] + [(30.0, 60.0)] * 4
    # a method keeps its colour across figures (the curves use the same map); variants differ in line style
    assert to_rgb(lines["data2vec 2.0"].get_color()) == to_rgb(lines["data2vec 2.0 M2"].get_color()) \
        == to_rgb(figures._color("data2vec2")) != to_rgb(lines["MAE"].get_color())
    assert lines["data2vec 2.0"].get_linestyle() != lines["data2vec 2.0 M2"].get_linestyle()
    assert figures._color("my_method") == figures._color("my_method") not in [figures._color(m) for m in
                                                                             ("data2vec2", "mae", "mlm")]


def _report_with_sweep(tmp_path, scale: float) -> str:
    """The fixture's full runs plus, per image run, a sweep run at ``scale`` of the budget (its final checkpoint:
    the full run's, 0.01 less accurate, at ``scale`` of its times); returns the report's Markdown."""
    import json
    import shutil

    metrics = tmp_path / "metrics"
    shutil.copytree(FIXTURE / "metrics", metrics)
    for path in sorted(metrics.glob("image-*-default-s*-f1.000.json")):
        data = json.loads(path.read_text())
        data["identity"]["budget_scale"] = scale
        data["pretrain"] = {k: (v * scale if k in ("train_time_s", "e2e_time_s", "device_hours") else v)
                            for k, v in data["pretrain"].items()}
        data["metrics"]["test_accuracy"] -= 0.01
        (metrics / path.name.replace("-f1.000", f"-b{scale}-f1.000")).write_text(json.dumps(data))
    tables = tmp_path / "tables"
    assert collect.main(["--metrics", str(metrics), "--out", str(tables)]) == 0
    assert report.main(["--tables", str(tables), "--out", str(tmp_path), "--bootstrap", "50"]) == 0
    return (tmp_path / "report.md").read_text()


def test_a_budget_sweep_leads_the_report_in_plain_words(tmp_path):
    """Sweep points (separate runs at half the budget) next to the fixture's full runs: the summary opens with
    one plain line per claim on the sweep, the scorecard and figures name the protocol."""
    md = _report_with_sweep(tmp_path, 0.5)
    summary = md.split("## Summary", 1)[1]
    first = summary.split("\n- ", 2)[1]
    assert first.startswith("image vs MAE: ")                      # one line per claim, in plain words,
    assert "\n- speech vs data2vec 1.0: " in summary                  # in the paper's order of modalities
    image = [line for line in summary.splitlines() if line.startswith("- image vs MAE: ")]
    assert len(image) == 1 and "budget sweep of 2 runs per method (0.5, 1 of the budget)" in image[0]
    card = pd.read_csv(tmp_path / "derived" / "scorecard.csv")
    assert card.set_index("data2vec 2.0 vs").loc["MAE", "protocol"] == "sweep"
    speedups = pd.read_csv(tmp_path / "derived" / "speedups.csv")
    assert set(speedups[speedups.modality == "image"].protocol) == {"sweep", "anytime"}
    assert set(speedups[speedups.modality == "speech"].protocol) == {"anytime"}
    assert (tmp_path / "figures" / "curves_image_fmnist_sweep.png").is_file()
    assert (tmp_path / "figures" / "curves_image_fmnist.png").is_file()
    assert "The two protocols at the same budgets" not in md        # no anytime checkpoint at 0.5 to compare


def test_the_protocols_are_compared_where_both_have_a_point_at_the_same_budget(tmp_path):
    """Sweep runs at 0.667 of the budget beside the full runs' checkpoints at 0.667: per method, both medians over
    seeds and the difference, in the report and in derived/protocol_gap.csv."""
    import json

    md = _report_with_sweep(tmp_path, 0.667)
    gap = pd.read_csv(tmp_path / "derived" / "protocol_gap.csv").set_index("method")
    assert set(gap.index) == {"data2vec2", "mae"} and set(gap["budget_fraction"]) == {0.667}   # speech: no sweep
    for method in ("data2vec2", "mae"):
        def accuracies(fraction):
            files = sorted((FIXTURE / "metrics").glob(f"image-{method}-default-s*-f{fraction}.json"))
            return [json.loads(f.read_text())["metrics"]["test_accuracy"] for f in files]
        sweep, anytime = np.median(accuracies("1.000")) - 0.01, np.median(accuracies("0.667"))
        row = gap.loc[method]
        assert (row["sweep"], row["anytime"]) == (pytest.approx(sweep), pytest.approx(anytime))
        assert row["anytime - sweep"] == pytest.approx(anytime - sweep)
        assert row["anytime looks"] == ("better" if anytime > sweep else "worse")
        assert row["seeds (sweep / anytime)"] == "3 / 3"
    assert "The two protocols at the same budgets" in md and "| image | fmnist | mae | default | 0.667 |" in md


def test_speedups_figure_says_why_a_row_has_no_point(tmp_path, monkeypatch):
    """Every row of the speedups figure shows its measurement: a marker for a value or bound, the interval for a
    speedup bounded on both sides, 'undetermined' where neither time is bounded, 'not run here' for a pair the
    paper compares that no run covers."""
    from d2v2.analysis import figures

    nan, inf = float("nan"), float("inf")
    base = {"clock": "train_time_s", "default_variant": True, "protocol": "anytime", "ci_low": nan, "ci_high": nan}
    speedups = pd.DataFrame([
        {**base, "modality": "image", "baseline": "mae", "relation": "?", "speedup": nan,
         "speedup_low": 0.0, "speedup_high": inf},
        {**base, "modality": "image", "baseline": "data2vec1", "relation": "in", "speedup": nan,
         "speedup_low": 1.5, "speedup_high": 3.0},
        {**base, "modality": "text", "baseline": "mlm", "relation": "=", "speedup": 2.0,
         "speedup_low": 2.0, "speedup_high": 2.0}])
    claims = pd.DataFrame([{"modality": "speech", "baseline": "wav2vec2", "speedup": 10.6}])
    implied = pd.DataFrame(columns=["modality", "baseline", "relation", "speedup"])
    drawn, save = {}, figures.save
    monkeypatch.setattr(figures, "save", lambda fig, out, name: (drawn.update({name: fig}), save(fig, out, name))[1])
    [(png, caption)] = figures.plot_speedups(speedups, implied, claims, tmp_path)
    ax = drawn["speedups"].axes[0]
    row = {label.get_text(): y for y, label in enumerate(ax.get_yticklabels())}
    notes = {round(t.get_position()[1]): t.get_text() for t in ax.texts}
    assert notes == {row["image: vs MAE"]: "undetermined", row["speech: vs wav2vec 2.0"]: "not run here"}
    segments = [s for c in ax.collections for s in c.get_segments()]
    assert any(list(s[:, 0]) == [1.5, 3.0] and set(s[:, 1]) == {row["image: vs data2vec 1.0"]} for s in segments)
    exact = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [2.0]]
    assert [ln.get_ydata()[0] for ln in exact] == [row["text: vs RoBERTa (MLM)"]]
    assert ax.get_xlim()[0] < 0.5 and "'undetermined'" in caption and png.exists()
    assert "measured here: lies in this interval" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_an_undetermined_claim_says_both_reached_the_target_at_their_first_point():
    """'?' (neither time bounded) comes from both methods reaching the target at their first point: the summary
    line says that, with the target and both times, instead of the two statuses."""
    from types import SimpleNamespace

    from d2v2.analysis.speedup import AT_MOST, REACHED

    evals = pd.DataFrame({"modality": ["text"] * 2, "budget_fraction": [0.25, 1.0], "preset": ["tiny"] * 2})
    row = SimpleNamespace(modality="text", baseline="mlm", primary_metric="test_accuracy", target=0.7341,
                          protocol="anytime", relation="?", d2v2_seeds=1, baseline_seeds=1, d2v2_status=AT_MOST,
                          baseline_status=AT_MOST, d2v2_time_high=15.01, baseline_time_high=15.2)
    line = report.claim_sentence(row, evals, "train_cpu_s")
    assert line.startswith("text vs RoBERTa (MLM): undetermined at this scale: both reached RoBERTa (MLM)'s final "
                           "accuracy (0.734) already at their first point (data2vec 2.0 at 15.01 CPU-s, RoBERTa "
                           "(MLM) at 15.2 CPU-s), so these points cannot tell which got there first")
    assert line.endswith("(checkpoints at 0.25, 1 of one run's budget; clock train_cpu_s; preset tiny; 1 / 1 seed(s)).")
    only = report.claim_sentence(row, evals[evals.budget_fraction == 1.0], "train_cpu_s")
    assert "already at their only point (data2vec 2.0 at 15.01 CPU-s" in only         # speech's one checkpoint
    other = report.claim_sentence(SimpleNamespace(**{**vars(row), "baseline_status": REACHED}), evals, "train_cpu_s")
    assert "undetermined: RoBERTa (MLM) reached, data2vec 2.0 reached at first checkpoint" in other


def test_a_faster_median_is_shown_only_where_its_interval_lies_above_1x():
    """The summary says 'shown' for a speedup bounded on both sides only where the bootstrap CI over seeds excludes
    1x; a CI that reaches 1x (three seeds, one of which never gets there) or no CI (one seed per method) is 'not
    established'. A median time that censoring leaves between two seeds' times reads as that interval."""
    from types import SimpleNamespace

    from d2v2.analysis.speedup import BETWEEN, REACHED

    evals = pd.DataFrame({"modality": ["speech"] * 2, "budget_scale": [0.25, 1.0], "preset": ["tiny"] * 2})
    row = SimpleNamespace(modality="speech", baseline="data2vec1", primary_metric="test_cer", target=0.671,
                          protocol="sweep", relation="=", d2v2_seeds=3, baseline_seeds=3, d2v2_status=REACHED,
                          baseline_status=REACHED, d2v2_time_high=816.3, baseline_time_high=960.0, d2v2_budget=960.0,
                          speedup=1.18, speedup_low=1.18, speedup_high=1.18, ci_low=0.0, ci_high=1.66,
                          baseline_time_low=960.0, d2v2_time_low=816.3, speedup_text="1.18x [0.00, 1.66]")
    line = lambda **kw: report.claim_sentence(SimpleNamespace(**{**vars(row), **kw}), evals, "train_cpu_s")
    assert line().startswith("speech vs data2vec 1.0: not established: 1.18x faster in the medians, but the 95% CI "
                             "over seeds reaches 1x: data2vec 2.0 reached data2vec 1.0's final cer (0.671) in "
                             "816.3 CPU-s, data2vec 1.0 in 960 CPU-s (budget sweep")
    assert line(ci_low=1.0).startswith("speech vs data2vec 1.0: not established: 1.18x faster in the medians")
    assert line(ci_low=1.05).startswith("speech vs data2vec 1.0: shown: 1.18x faster: data2vec 2.0 reached")
    nan = float("nan")
    assert line(ci_low=nan, ci_high=nan, d2v2_seeds=1, baseline_seeds=1).startswith(
        "speech vs data2vec 1.0: not established: 1.18x faster, but with one seed per method there is no interval")
    slower = dict(speedup=0.8, speedup_low=0.8, speedup_high=0.8, ci_low=0.5, ci_high=0.9)
    assert line(**slower).startswith("speech vs data2vec 1.0: not shown: data2vec 2.0 was 1.25x slower")
    # data2vec 1.0's median time between a seed that ran out at 700 s and one that reached at 960 s
    between = dict(relation="in", speedup=nan, speedup_low=700 / 816.3, speedup_high=960 / 816.3,
                   baseline_time_low=700.0, baseline_status=BETWEEN)
    assert line(**between).startswith("speech vs data2vec 1.0: not shown: 0.86x-1.18x, which contains 1x")
    assert "data2vec 1.0 in between 700 CPU-s and 960 CPU-s (" in line(**between)
    faster = dict(between, speedup_low=900 / 816.3, baseline_time_low=900.0, ci_low=1.02)
    assert line(**faster).startswith("speech vs data2vec 1.0: shown: 1.10x-1.18x faster: ")


def test_ablation_figures_put_the_default_variant_on_its_axis(tmp_path, monkeypatch):
    """M = 4 (the default, as collect recorded it) stands between the variants' 1 and 8 as a star, and the
    other field's variants (whose M is also 4) do not enter that point; each seed is a dot beside the median,
    random init a dash-dotted line; the curves' legend is in numeric order. Without a recorded value the
    default is a dashed line, as before."""
    import json

    from d2v2.analysis import figures

    def row(variant, params, values, seed=0):
        return {"modality": "image", "method": "data2vec2", "task": "fmnist", "variant": variant,
                "params": json.dumps(params), "seed": seed, "budget_fraction": 1.0, "train_time_s": 60.0,
                "value": values, "primary_metric": "test_accuracy", "higher_is_better": True,
                "device_name": "Fixture CPU",
                "prov_device_count": 1, "param.num_masks": params.get("num_masks", 4),
                "param.decoder.depth": params.get("decoder.depth", 3)}
    evals = pd.DataFrame([row("default", {}, 0.70), row("default", {}, 0.72, seed=1),
                          row("num_masks=1", {"num_masks": 1}, 0.60), row("num_masks=8", {"num_masks": 8}, 0.65),
                          row("num_masks=16", {"num_masks": 16}, 0.66),
                          row("decoder.depth=1", {"decoder.depth": 1}, 0.10)])
    drawn, save = {}, figures.save
    monkeypatch.setattr(figures, "save", lambda fig, out, name: (drawn.update({name: fig}), save(fig, out, name))[1])
    random_init = pd.DataFrame([{**row("random", {}, v, seed=s), "init": "random"} for s, v in ((0, 0.5), (1, 0.56))])
    captions = dict((png.stem, caption)
                    for png, caption in figures.plot_ablations(evals, tmp_path, random_init=random_init))
    ax = drawn["ablation_image_data2vec2_num_masks"].axes[0]
    line, dots, star, random = ax.get_lines()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "8", "16"]
    assert list(line.get_ydata()) == pytest.approx([0.60, 0.71, 0.65, 0.66])      # 4: the default's median only
    assert sorted(dots.get_ydata()) == pytest.approx([0.60, 0.65, 0.66, 0.70, 0.72])       # both default seeds
    assert star.get_label() == "default variant (num_masks=4)" and list(star.get_ydata()) == pytest.approx([0.71])
    assert random.get_linestyle() == "-." and list(random.get_ydata()) == pytest.approx([0.53, 0.53])
    assert random.get_label() == "random init (2 seeds)"
    caption = captions["ablation_image_data2vec2_num_masks"]
    assert "the star: the default variant" in caption and "dash-dotted: fine-tuned from random" in caption
    curves = drawn["ablation_image_data2vec2_curves"].axes[0]
    legend = [t.get_text() for t in curves.get_legend().get_texts()]
    assert legend == ["default (decoder.depth=3, num_masks=4) (2 seeds)", "decoder.depth=1 (1 seed)",
                      "num_masks=1 (1 seed)", "num_masks=8 (1 seed)", "num_masks=16 (1 seed)",
                      "random init (2 seeds)"]

    unknown = evals.copy()
    unknown.loc[unknown["variant"] == "default", ["param.num_masks", "param.decoder.depth"]] = float("nan")
    captions = dict((png.stem, caption) for png, caption in figures.plot_ablations(unknown, tmp_path))
    ax = drawn["ablation_image_data2vec2_num_masks"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "8", "16"]
    caption = captions["ablation_image_data2vec2_num_masks"]
    assert "dashed: the default variant" in caption and "random" not in caption
