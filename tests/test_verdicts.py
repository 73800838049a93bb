"""Verdicts a reviewer can recompute: the TOST rule, the differs flag, seeds needed, the registered plan, and
reports regenerated from committed per-run records."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from mptrain.report.cli import main
from mptrain.report.export import export_runs
from mptrain.report.make import build
from mptrain.report.paired_verdict import paired_verdict, seeds_needed

FIXTURE = Path(__file__).parent / "fixtures" / "records"
EXPECTED = Path(__file__).parent / "fixtures" / "records_comparison.csv"


def _runs(metrics, seeds=None):
    seeds = list(range(len(metrics))) if seeds is None else seeds
    return pd.DataFrame({"seed": seeds, "status": "completed", "metric": metrics})


def test_the_documented_worked_example():
    """README / verdict.py: Δ = -0.20, -0.10, -0.30, -0.15, -0.25 points against δ = 0.5 points."""
    control = _runs([0.9] * 5)
    arm = _runs([0.9 + d / 100 for d in (-0.20, -0.10, -0.30, -0.15, -0.25)])
    r = paired_verdict(arm, control, higher_is_better=True, margin=0.005)
    assert r["verdict"] == "equivalent" and r["differs"] == "worse"
    assert (r["tost_low"], r["tost_high"]) == (pytest.approx(-0.00275, abs=1e-5), pytest.approx(-0.00125, abs=1e-5))
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(-0.00298, abs=1e-5), pytest.approx(-0.00102, abs=1e-5))


def test_equivalence_is_the_90_percent_interval_inside_the_margin():
    """An interval whose 95 % bound crosses δ but whose 90 % bounds do not: equivalent by TOST at α = 0.05."""
    deltas = [0.1, -0.3, 0.35, -0.05, 0.2]  # points
    control, arm = _runs([50.0] * 5), _runs([50 + d for d in deltas])
    mean, sd = statistics.mean(deltas), statistics.stdev(deltas)
    half90 = stats.t.ppf(0.95, 4) * sd / 5**0.5
    half95 = stats.t.ppf(0.975, 4) * sd / 5**0.5
    margin = (abs(mean) + half90 + abs(mean) + half95) / 2  # between the two bounds
    r = paired_verdict(arm, control, True, margin)
    assert r["verdict"] == "equivalent" and r["differs"] == ""
    assert paired_verdict(arm, control, True, abs(mean) + half90 * 0.9)["verdict"] == "inconclusive"


def test_a_measurable_difference_beyond_the_margin_is_worse_or_better():
    control = _runs([30.0, 30.1, 29.9, 30.0])
    worse = paired_verdict(_runs([30.6, 30.7, 30.5, 30.6]), control, higher_is_better=False, margin=0.3)
    better = paired_verdict(_runs([29.4, 29.5, 29.3, 29.4]), control, higher_is_better=False, margin=0.3)
    assert (worse["verdict"], worse["differs"]) == ("worse", "worse")
    assert (better["verdict"], better["differs"]) == ("better", "better")


def test_an_inconclusive_arm_says_how_many_seeds_its_spread_needs():
    deltas = [0.004, -0.006, 0.003, -0.002]
    r = paired_verdict(_runs([0.8 + d for d in deltas]), _runs([0.8] * 4), True, 0.005)
    assert r["verdict"] == "inconclusive"
    n = int(r["seeds_needed"])
    mean, sd = abs(statistics.mean(deltas)), statistics.stdev(deltas)
    fits = lambda k: stats.t.ppf(0.95, k - 1) * sd / k**0.5 < 0.005 - mean  # noqa: E731
    assert fits(n) and not fits(n - 1)
    # |mean| beyond δ: seeds enough for the 95 % interval to exclude 0 (then worse or better)
    far = pd.Series([0.02, 0.05, -0.01]).to_numpy()
    n = int(seeds_needed(far, 0.005))
    shows = lambda k: stats.t.ppf(0.975, k - 1) * far.std(ddof=1) / k**0.5 < far.mean()  # noqa: E731
    assert shows(n) and not shows(n - 1)


def test_the_fixture_report_is_the_committed_table(tmp_path):
    build([FIXTURE], tmp_path / "r", "csv")
    got = pd.read_csv(tmp_path / "r" / "comparison.csv")
    want = pd.read_csv(EXPECTED)
    pd.testing.assert_frame_equal(got, want)


def test_the_fixture_verdict_by_hand():
    rows = {}
    for path in FIXTURE.rglob("summary.json"):
        s = json.loads(path.read_text())
        rows[s["precision_preset"], s["seed"]] = s["final"]["accuracy"]
    deltas = [rows["mixed", seed] - rows["fp32", seed] for seed in range(4)]
    low, high = stats.ttest_1samp(deltas, 0).confidence_interval(0.90)
    table = pd.read_csv(EXPECTED).set_index("arm")
    mixed = table.loc["mixed loss_scale=dynamic"]
    assert mixed["tost_low"] == pytest.approx(low) and mixed["tost_high"] == pytest.approx(high)
    assert mixed["verdict"] == ("equivalent" if -0.005 < low and high < 0.005 else mixed["verdict"])
    assert mixed["margin"] == pytest.approx(0.005)  # the plan's 0.5 points
    assert not mixed["exploratory"] and table.loc["mixed loss_scale=1", "exploratory"]  # not a planned arm


def test_the_plan_is_printed_above_the_verdicts_and_other_metrics_are_exploratory(tmp_path):
    build([FIXTURE], tmp_path / "r", "md")
    md = (tmp_path / "r" / "report.md").read_text()
    answer = md.index("## The answer")
    assert md.index("**Plan** (registered 2026-12-04)") > answer
    assert md.index('reads "not reproduced at this scale"): mixed is worse') < md.index("| experiment | metric | arm |")
    build([FIXTURE], tmp_path / "t", "md", metric="train_loss")
    md = (tmp_path / "t" / "report.md").read_text()
    assert "not the plan's accuracy: **exploratory**" in md
    assert md.count("exploratory: ") >= 2  # every arm's verdict cell
    build([FIXTURE], tmp_path / "m", "csv", margin_specs=["2"])  # a margin other than the plan's
    assert pd.read_csv(tmp_path / "m" / "comparison.csv").query("not control")["exploratory"].all()


def test_an_amended_plan_says_so_and_its_schema_takes_the_date():
    from mptrain.report.tables import plan_markdown
    from mptrain.schema.plan import check

    plan = {"claim": "c", "metric": "perplexity", "margin": 1.0, "arms": ["mixed"], "seeds": 3,
            "refuted_if": "r", "registered": "2026-12-04", "amended": "2026-12-06"}
    assert plan_markdown(plan, "perplexity").startswith("**Plan** (registered 2026-12-04, amended 2026-12-06 before")
    check({"plan": plan})  # a known key: no refusal
    assert "amended" not in plan_markdown({**plan, "amended": None}, "perplexity")


def test_exported_records_regenerate_the_same_tables(tmp_path):
    source = tmp_path / "runs"
    shutil.copytree(FIXTURE, source)
    records = tmp_path / "records"
    assert len(export_runs([source], records)) == 12
    build([source], tmp_path / "a", "csv")
    build([records], tmp_path / "b", "csv")
    for name in ("comparison.csv",):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_export_runs_from_the_command_line(tmp_path, capsys):
    main([str(FIXTURE), "--export-runs", str(tmp_path / "out")])
    assert "12 run records" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out" / "precision=fp32" / "seed=0").iterdir()) == [
        "scalars.json", "summary.json"]


def test_the_report_opens_with_a_forest_plot_and_reads_accuracy_in_points(tmp_path):
    build([FIXTURE], tmp_path / "r", "md")
    md = (tmp_path / "r" / "report.md").read_text()
    assert (tmp_path / "r" / "verdicts-forest.png").stat().st_size > 0
    assert md.index("(verdicts-forest.png)") < md.index("| experiment | metric | arm |")
    assert "(±0.5 pts)" in md and "±0.005" not in md
    assert "needs ≈" in md  # the inconclusive arm says how many seeds it would take


def test_a_plan_may_name_every_tasks_primary_metric():
    """A registered plan names its metric before the runs: every task family's primary metric must be one it may
    name (the detection task's map_50 was once missing, and its plan refused every run), and its Task class says
    which family it is (mptrain/families.py: every family, with no list here to keep)."""
    import importlib

    from mptrain.families import TASKS
    from mptrain.schema.plan import METRICS
    from mptrain.tasks.base import Task

    for family in TASKS.values():
        assert family.metric in METRICS, family.name
        module = importlib.import_module(family.builder.partition(":")[0])
        classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Task) and c is not Task]
        assert any(getattr(c, "family", None) == family.name for c in classes), family.name


def test_a_run_is_known_by_the_preset_of_the_mode_it_ran():
    """An experiment that sets precision.mode over the default preset (fp32) ran that mode: the plan's arm is the
    mode, not 'fp32' (which would make every arm the control's namesake and every verdict exploratory)."""
    from mptrain.schema.precision import preset_name

    assert preset_name("fp32", "bf16") == "bf16"  # mode: bf16 set over the default preset
    assert preset_name("mixed_scale1", "mixed") == "mixed_scale1"  # a variant keeps its own name
    assert preset_name("fp16_naive_norm16", "fp16_naive") == "fp16_naive_norm16"
    assert preset_name("bf16_pure", "bf16") == "bf16"  # another mode's preset, its mode overridden
    assert preset_name(None, "mx") == "mx"


def test_a_section_that_changes_what_its_plan_registered_is_exploratory():
    """The sec. 3.1 check with weight decay off reused repro_master_weights' plan: its section must not read as
    the registered verdict; a plan's own swept keys (settings: [optim.lr]) and the CPU's kernels are not changes."""
    from mptrain.report.render import experiment_title
    from mptrain.report.tables import off_plan_settings, plan_markdown

    plan = {"metric": "perplexity", "margin": 2.0, "settings": ["optim.lr"]}
    setting = "experiment=p optim.lr=0.01 optim.weight_decay=0 precision.cpu_fp16=emulate"
    assert off_plan_settings(setting, plan) == ["optim.weight_decay=0"]
    assert off_plan_settings("experiment=p optim.lr=0.01 precision.cpu_bf16=native", plan) == []
    assert "changed what the plan registered (optim.weight_decay=0): **exploratory**" in \
        plan_markdown(plan, "perplexity", ["optim.weight_decay=0"])
    assert experiment_title("transformer", "text", setting) == \
        "transformer on text · p (optim.lr=0.01 optim.weight_decay=0)"


def _summaries(tmp_path, arms, run_seeds, machine, **plan):
    """Fixture summaries re-labelled: `machine` is how its CPU resolved cpu_fp16; the arms are bf16 ones; `plan`:
    keys of the fixture's plan replaced."""
    template = json.loads(next(FIXTURE.rglob("summary.json")).read_text())
    template["plan"] = {**template["plan"], **plan}
    for arm in arms:
        for seed in run_seeds:
            s = dict(template, precision=arm, precision_preset=arm, seed=seed, cpu_fp16=machine, cpu_bf16="native",
                     loss_scale=None, arithmetic=None,
                     fp16_kernels=None, bf16_kernels=None if arm == "fp32" else "native",
                     overrides=["+experiment=fixture", f"precision={arm}", f"seed={seed}"],
                     final={"accuracy": 0.90 + (0.002 * seed if arm == "fp32" else 0.002 * seed - 0.01)})
            folder = tmp_path / machine / f"{arm}-{seed}"
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps(s))


def test_seeds_from_another_machine_pool_where_its_policy_decided_nothing(tmp_path):
    """mx_optim_state's seeds 3-4 ran where cpu_fp16=auto resolves to emulate, its seeds 0-2 where it resolved to
    native: no run of it had FP16 arithmetic, so they are one experiment; cpu_bf16, which its arms used, stays."""
    from mptrain.report.runs import load_runs

    _summaries(tmp_path, ["fp32", "bf16"], [0, 1, 2], "native")
    _summaries(tmp_path, ["fp32", "bf16"], [3, 4], "emulate")
    runs = load_runs([tmp_path])
    assert runs["setting"].nunique() == 1 and "precision.cpu_bf16=native" in runs["setting"].iloc[0]
    assert "cpu_fp16" not in runs["setting"].iloc[0]


def test_seeds_added_after_the_plan_make_its_verdict_exploratory(tmp_path):
    """Adding seeds to an inconclusive arm until it decides is optional stopping: past the plan's seeds (the
    fixture's plan registers 4) the verdict is exploratory and says why."""
    from mptrain.report.runs import load_runs
    from mptrain.report.tables import comparison

    _summaries(tmp_path, ["fp32", "mixed"], [0, 1, 2, 3, 4], "emulate")  # mixed: the fixture plan's arm
    row = next(iter(comparison(load_runs([tmp_path])).values())).query("arm == 'mixed'").iloc[0]
    assert row["pairs"] == 5 and row["exploratory"] and "more than the plan's 4" in row["verdict_note"]
    shutil.rmtree(tmp_path / "emulate" / "fp32-4")
    row = next(iter(comparison(load_runs([tmp_path])).values())).query("arm == 'mixed'").iloc[0]
    assert row["pairs"] == 4 and not row["exploratory"]


# -- the distribution-free check and Holm's adjustment (issue 48) --------------------------------------------------
def test_the_sign_flip_test_enumerates_every_sign_pattern():
    import itertools

    import numpy as np

    from mptrain.report.paired_verdict import sign_flip_p, smallest_p

    assert sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(0.25) == smallest_p(3)  # all one side: 2 of 8 patterns
    deltas = np.array([0.3, -0.1, 0.5, 0.2, 0.45, -0.05])
    patterns = [np.array(signs) * deltas for signs in itertools.product((1, -1), repeat=len(deltas))]
    by_hand = np.mean([abs(p.mean()) >= abs(deltas.mean()) - 1e-12 for p in patterns])
    assert sign_flip_p(deltas) == pytest.approx(by_hand)
    one_sided = np.mean([p.mean() >= deltas.mean() - 1e-12 for p in patterns])
    assert sign_flip_p(deltas, alternative="greater") == pytest.approx(one_sided)


def test_holm_multiplies_the_ranked_p_values_and_keeps_them_monotone():
    from mptrain.report.paired_verdict import holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2, float("nan"), 0.001]) == pytest.approx([0.2, float("nan"), 0.002], nan_ok=True)
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_the_p_values_agree_with_the_intervals_and_scipy():
    """TOST's p < 0.05 exactly when the 90 % interval lies inside ±δ; the t-test's p is scipy's paired t-test."""
    control = _runs([0.90, 0.91, 0.89, 0.905, 0.895])
    for shift, margin in ((-0.002, 0.005), (-0.004, 0.005), (0.001, 0.002)):
        arm = _runs([m + shift + e for m, e in zip(control["metric"], (0.001, -0.002, 0.0015, 0.0, -0.001))])
        r = paired_verdict(arm, control, higher_is_better=True, margin=margin)
        assert (r["tost_p"] < 0.05) == (-margin < r["tost_low"] and r["tost_high"] < margin)
        assert r["t_p"] == pytest.approx(stats.ttest_rel(arm["metric"], control["metric"]).pvalue)


@pytest.mark.parametrize("deltas, t_verdict, flip_verdict", [
    ([-0.20, -0.10, -0.30, -0.15, -0.25], "equivalent", "equivalent"),  # the worked example: n = 5 reaches 1/32
    ([-0.20, -0.10, -0.30], "equivalent", "inconclusive"),  # n = 3: the sign-flip's smallest one-sided p is 1/8
    ([-1.0, -1.1, -0.9, -1.2, -1.05, -0.95], "worse", "worse"),
])  # fmt: skip
def test_the_sign_flip_verdict_beside_the_t_tests(deltas, t_verdict, flip_verdict):
    control = _runs([0.9] * len(deltas))
    arm = _runs([0.9 + d / 100 for d in deltas])
    r = paired_verdict(arm, control, higher_is_better=True, margin=0.005)
    assert (r["verdict"], r["signflip_verdict"]) == (t_verdict, flip_verdict)


def test_the_report_shows_the_check_flags_small_n_and_adjusts_by_holm(tmp_path):
    from mptrain.report.paired_verdict import holm_verdicts

    verdicts = [{"verdict": "worse", "t_p": 0.03, "tost_p": 0.9}, {"verdict": "worse", "t_p": 0.01, "tost_p": 0.9},
                {"verdict": "equivalent", "t_p": 0.5, "tost_p": 0.001}, {"verdict": "worse", "t_p": 0.04, "tost_p": 1}]
    holm_verdicts(verdicts)  # ranked: 0.001 x 4, 0.01 x 3, 0.03 x 2, 0.04 x 1 (raised to the 0.06 before it)
    assert [v["holm_p"] for v in verdicts] == pytest.approx([0.06, 0.03, 0.004, 0.06])
    assert [v["holm_verdict"] for v in verdicts] == ["inconclusive", "worse", "equivalent", "inconclusive"]
    build([FIXTURE], tmp_path / "report", "md", with_figures=False)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "exact sign-flip permutation test" in text and "| verdict after Holm |" in text


# -- the margin rule and the seeds a plan names (issue 48) ------------------------------------------------------------
def test_a_plan_that_names_its_seeds_labels_any_other_seed_exploratory(tmp_path):
    from mptrain.report.runs import load_runs
    from mptrain.report.tables import comparison

    _summaries(tmp_path, ["fp32", "mixed"], [5, 6, 7], "emulate", seeds=[5, 6, 7])
    row = next(iter(comparison(load_runs([tmp_path])).values())).query("arm == 'mixed'").iloc[0]
    assert row["pairs"] == 3 and not row["exploratory"]
    _summaries(tmp_path / "more", ["fp32", "mixed"], [2], "emulate", seeds=[5, 6, 7])  # a seed exploration saw
    row = next(iter(comparison(load_runs([tmp_path])).values())).query("arm == 'mixed'").iloc[0]
    assert row["exploratory"] and "seed 2 not among the plan's" in row["verdict_note"]


def test_a_plan_without_a_margin_judges_by_the_rule_and_another_margin_shows_the_rules_verdict(tmp_path):
    """The fixture's Δs are -1 point on every seed: inside a registered ±1.5, outside the rule's ±0.28 (Table 1's
    largest difference), so the plan's verdict stands and the rule's reads beside it."""
    from mptrain.families import metric
    from mptrain.report.runs import load_runs
    from mptrain.report.tables import comparison, plan_markdown, verdict_cell

    assert metric("accuracy").rule == 0.28 and "Inception v3" in metric("accuracy").rule_source
    _summaries(tmp_path / "own", ["fp32", "mixed"], [0, 1, 2, 3], "emulate", margin=1.5)
    row = next(iter(comparison(load_runs([tmp_path / "own"])).values())).query("arm == 'mixed'").iloc[0]
    assert row["verdict"] == "equivalent" and row["rule_verdict"] == "worse"
    assert "(by the margin rule: worse)" in verdict_cell(row, "accuracy")
    assert "the margin rule's ±0.28" in plan_markdown({"metric": "accuracy", "margin": 1.5}, "accuracy")
    _summaries(tmp_path / "rule", ["fp32", "mixed"], [0, 1, 2, 3], "emulate", margin=None)
    row = next(iter(comparison(load_runs([tmp_path / "rule"])).values())).query("arm == 'mixed'").iloc[0]
    assert row["margin"] == pytest.approx(0.0028) and row["verdict"] == "worse" and row["rule_verdict"] == ""


def test_the_plan_schema_takes_named_seeds_and_leaves_the_margin_to_the_rule():
    from omegaconf import OmegaConf

    from mptrain.errors import UserError
    from mptrain.schema.plan import PlanConfig, check

    assert OmegaConf.structured(PlanConfig).margin is None
    plan = {"claim": "c", "metric": "bleu", "refuted_if": "r"}
    check(OmegaConf.create({"plan": {**plan, "seeds": [5, 6, 7]}}))
    with pytest.raises(UserError, match="plan.seeds must be a positive count, or a list of distinct"):
        check(OmegaConf.create({"plan": {**plan, "seeds": [5, 5]}}))


def test_a_report_on_some_seeds_says_so_and_check_remakes_it(tmp_path, capsys):
    _summaries(tmp_path / "runs", ["fp32", "mixed"], [0, 1, 2, 3], "emulate")
    main([str(tmp_path / "runs"), "--seeds", "1-3", "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "report.md").read_text()
    assert "--seeds 1-3" in text and "(n=3)" in text
    with pytest.raises(SystemExit) as stop:
        main(["--check", str(tmp_path / "report")])
    assert stop.value.code == 0 and "1 reports remade the same" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "runs"), "--seeds", "7-x"])
    assert stop.value.code == 2 and "--seeds '7-x': give seeds as a list and ranges" in capsys.readouterr().err
