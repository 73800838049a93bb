"""Sweeps, presets and `mptrain-report`: a real sweep in, tables and plots out, numbers checked against summary.json."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import TINY, mptrain, read_summary, scalar_tags

REPORT = str(Path(sys.executable).with_name("mptrain-report"))
CONF = Path(__file__).resolve().parents[1] / "conf"


def report(*args, cwd):
    return subprocess.run([REPORT, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """fp32, bf16 and fp16_naive (whose Adam diverges: eps 1e-8 is 0 in FP16) x 2 seeds with numerics on,
    and a sweep whose job fails on a bad value."""
    root = tmp_path_factory.mktemp("sweep")
    out = mptrain("-m", "precision=fp32,bf16,fp16_naive", "seed=0,1", "optim=adam", *TINY, "trainer.max_steps=4",
                  "telemetry.numerics.every=2", f"hydra.sweep.dir={root}/ok", cwd=root)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    failed = mptrain("-m", "precision=fp32", "seed=7", *TINY, "dataset.train_size=-1", f"hydra.sweep.dir={root}/bad",
                     cwd=root)  # fmt: skip
    assert failed.returncode == 0, failed.stderr[-3000:]  # a failed job does not stop the sweep
    return root


def run_dirs(root: Path) -> list[Path]:
    return [p.parent for p in sorted(root.rglob("summary.json")) if "report" not in p.parts]


def summaries(root: Path) -> list[dict]:
    return [read_summary(d) for d in run_dirs(root)]


def _lost_updates(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "numerics.jsonl").read_text().splitlines()]
    lost = [r for r in records if r["kind"] == "lost_update"]
    return sum(r["count"] * r["lost_update_frac"] for r in lost) / sum(r["count"] for r in lost)


def test_sweep_names_folders_by_overrides_and_records_the_failure(sweep):
    names = sorted(p.parent.relative_to(sweep).as_posix() for p in sweep.rglob("summary.json"))
    assert any(n.startswith("ok/debug=tiny,optim=adam,precision=bf16,") and n.endswith("/seed=1") for n in names)
    bad = [s for s in summaries(sweep) if s["seed"] == 7]
    assert len(bad) == 1 and bad[0]["status"] == "failed" and "train_size" in bad[0]["error"]


@pytest.mark.e2e
def test_report_numbers_equal_the_summaries(sweep, tmp_path):
    out = report(str(sweep), "--format", "json", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    rows = {r["arm"]: r for r in data["comparison"] if "train_size=-1" not in r["setting"]}  # the `ok` sweep
    runs = summaries(sweep)
    for arm in ("fp32", "bf16"):
        done = [s for s in runs if s["precision"] == arm and s["status"] == "completed"]
        accuracy = [s["final"]["accuracy"] for s in done]
        assert rows[arm]["metric_mean"] == pytest.approx(statistics.mean(accuracy))
        assert rows[arm]["metric_std"] == pytest.approx(statistics.stdev(accuracy))
        assert rows[arm]["samples_per_s"] == pytest.approx(statistics.median(s["samples_per_s"] for s in done))
        assert rows[arm]["peak_memory_mb"] == pytest.approx(statistics.mean(s["peak_memory_bytes"] for s in done) / 2**20)
        bytes_per_param = [s["bytes_per_parameter"]["model"]["total"] for s in done]
        assert rows[arm]["bytes_per_param"] == pytest.approx(statistics.mean(bytes_per_param))
        lost = [_lost_updates(d) for d in run_dirs(sweep / "ok") if read_summary(d)["precision"] == arm]
        assert rows[arm]["lost_update_frac"] == pytest.approx(statistics.mean(lost))
    fp32, naive = rows["fp32"], rows["fp16_naive"]
    assert fp32["control"] and fp32["status"] == "2 completed"
    assert naive["status"] == "2 diverged" and naive["runs"] == 2 and naive["metric_mean"] is None  # shown, not dropped
    assert rows["bf16"]["speedup_vs_fp32"] == pytest.approx(rows["bf16"]["samples_per_s"] / fp32["samples_per_s"])
    assert rows["bf16"]["delta_vs_fp32"] == pytest.approx(rows["bf16"]["metric_mean"] - fp32["metric_mean"])
    assert len(data["runs"]) == 7 and "failed" in {r["status"] for r in data["runs"]}


@pytest.mark.e2e
def test_report_markdown_html_and_plots(sweep, tmp_path):
    target = tmp_path / "sweep"
    shutil.copytree(sweep, target)
    out = report(str(target), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    folder = target / "report"
    text = (folder / "report.md").read_text()
    assert "**fp32** (control)" in text and "| bf16 |" in text and "2 diverged" in text and "1 failed" in text
    images = sorted(p.name for p in folder.glob("*.png"))
    assert any(n.endswith("-accuracy.png") for n in images) and any(n.endswith("-grad-exponents.png") for n in images)
    assert any(n.endswith("-speed-memory.png") for n in images) and any(n.endswith("-forward-headroom.png") for n in images)
    assert any(n.endswith("-fp8-operands.png") for n in images)  # what tensorwise FP8 would do to its Linear head
    assert "| loss-scale verdict |" in text
    assert "Forward headroom:" in text and " bit) |" in text  # per module: amax and headroom below 65504
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == sum(1 for line in text.splitlines() if line.startswith("!["))
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()  # not a Hydra app
    csv = report(str(target), "--format", "csv", cwd=tmp_path)
    assert csv.returncode == 0 and (folder / "comparison.csv").is_file() and not (folder / "report.md").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("make, says", [
    (lambda p: p.mkdir(), "no runs under"),
    (lambda p: None, "is not a directory"),
])  # fmt: skip
def test_report_on_a_folder_without_runs_is_one_line(tmp_path, make, says):
    target = tmp_path / "empty"
    make(target)
    out = report(str(target), cwd=tmp_path)
    assert out.returncode == 2 and says in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr and not (target / "report").exists()


@pytest.mark.parametrize("preset, swept", [
    ("ablation_cnn", {"precision": "fp32,fp16_naive,fp16_master,mixed,amp,bf16", "seed": "0,1,2"}),
    ("ablation_lstm", {"precision": "fp32,mixed_scale1,mixed_scale128,mixed,amp,bf16", "seed": "0,1,2"}),
    ("ablation_gan", {"precision": "fp32,mixed_scale1,amp,bf16", "seed": "0,1,2"}),
    ("ablation_transformer", {"precision": "fp32,mixed_scale1,mixed,amp,bf16", "seed": "0,1,2"}),
    ("ablation_master", {"precision": "fp32,mixed,bf16,bf16_pure,bf16_sr,bf16_kahan", "seed": "0,1,2"}),
    ("ablation_fp8", {"precision": "fp32,bf16,fp8", "seed": "0,1,2"}),
    ("ablation_master_lm", {"precision": "fp32,mixed,bf16,bf16_pure,bf16_sr,bf16_kahan", "seed": "0,1,2"}),
    ("loss_scale_sweep", {"precision.loss_scale": "1,8,128,1024,32768,dynamic", "seed": "0,1,2"}),
])  # fmt: skip
def test_presets_compose_and_sweep_what_they_say(preset, swept):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={preset}"], return_hydra_config=True)
    assert dict(cfg.hydra.sweeper.params) == swept
    header = (CONF / "experiment" / f"{preset}.yaml").read_text().splitlines()[:6]
    assert any(f"mptrain -m +experiment={preset}" in line for line in header)


@pytest.mark.e2e
@pytest.mark.slow
def test_ablation_cnn_preset_then_report(tmp_path):
    """The judged path: the preset at small sizes, then the report, from the installed commands."""
    small = [*TINY, "trainer.max_steps=3", "trainer.eval_max_batches=1", "++optim.eps=1e-4"]
    out = mptrain("-m", "+experiment=ablation_cnn", *small, f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path,
                  timeout=1800)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((tmp_path / "sweep").rglob("summary.json"))) == 18
    made = report(str(tmp_path / "sweep"), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    text = (tmp_path / "sweep" / "report" / "report.md").read_text()
    for mode in ("fp16_naive", "fp16_master", "mixed loss_scale=dynamic", "amp loss_scale=dynamic", "bf16"):
        assert f"| {mode} | 3 |" in text, mode


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed (make test installs it)")
def test_report_html_renders_in_headless_chromium(sweep, tmp_path):
    out = report(str(sweep), "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    page = tmp_path / "r" / "check.html"
    # the page reports on itself: how many images it holds and how many failed to decode
    probe = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
             "document.title='images='+i.length+' broken='+i.filter(x=>!x.complete||x.naturalWidth===0).length+"
             "' tables='+document.querySelectorAll('table').length;});</script>")  # fmt: skip
    page.write_text((tmp_path / "r" / "report.html").read_text().replace("</body>", probe + "</body>"))
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    title = dom.stdout.split("<title>", 1)[1].split("</title>", 1)[0]
    images = int(title.split("images=")[1].split()[0])
    assert images >= 3 and "broken=0" in title and "tables=0" not in title, title


def test_cpu_fp16_emulation_is_part_of_the_setting_not_the_arm():
    from mptrain.report.runs import arm_label, setting_label

    summary = {"precision": "fp32", "loss_scale": None,
               "overrides": ["precision=fp32", "precision.cpu_fp16=emulate", "optim.lr=0.01", "seed=1"]}
    assert arm_label(summary) == "fp32"  # still the control
    assert setting_label(summary) == "optim.lr=0.01 precision.cpu_fp16=emulate"
    mixed = {"precision": "mixed", "loss_scale": 1, "overrides": ["precision=mixed", "precision.loss_scale=1"]}
    assert arm_label(mixed) == "mixed loss_scale=1" and setting_label(mixed) == ""
    # summaries that record the resolved choice: auto and an explicit emulate are one setting, native another
    auto = {"precision": "mixed", "cpu_fp16": "emulate", "overrides": ["precision=mixed"]}
    explicit = {"precision": "fp32", "cpu_fp16": "emulate", "overrides": ["precision.cpu_fp16=emulate"]}
    native = {"precision": "mixed", "cpu_fp16": "native", "overrides": ["precision.cpu_fp16=native"]}
    assert setting_label(auto) == setting_label(explicit) == "precision.cpu_fp16=emulate"
    assert setting_label(native) == "precision.cpu_fp16=native"


T_975 = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105}  # Student t quantiles, from a printed table
T_95 = {1: 6.313751515}


@pytest.mark.e2e
def test_verdicts_recomputed_by_hand_from_the_summaries(sweep, tmp_path):
    out = report(str(sweep / "ok"), "--format", "json", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {r["arm"]: r for r in json.loads((tmp_path / "r" / "report.json").read_text())["comparison"]}
    by = {(s["precision"], s["seed"]): s for s in summaries(sweep / "ok")}
    deltas = [by["bf16", seed]["final"]["accuracy"] - by["fp32", seed]["final"]["accuracy"] for seed in (0, 1)]
    mean, half = statistics.mean(deltas), T_975[1] * statistics.stdev(deltas) / 2**0.5
    bf16 = rows["bf16"]
    assert bf16["pairs"] == 2 and bf16["paired_delta"] == pytest.approx(mean)
    if half:  # two seeds may land on identical accuracies: a zero-width interval
        assert (bf16["ci_low"], bf16["ci_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    half90 = T_95[1] * statistics.stdev(deltas) / 2**0.5  # equivalence: two one-sided tests, the 90 % interval
    expected = ("equivalent" if -0.005 < mean - half90 and mean + half90 < 0.005 else
                "inconclusive" if mean - half <= 0 <= mean + half else "better" if mean > 0 else "worse")
    assert bf16["verdict"] == expected and bf16["margin"] == pytest.approx(0.005)
    assert rows["fp16_naive"]["verdict"] == "worse" and "diverged in 2 seed(s)" in rows["fp16_naive"]["verdict_note"]
    assert rows["fp32"]["verdict"] == "control"


@pytest.mark.e2e
def test_train_loss_verdicts_read_the_last_tenth_of_the_logged_losses(sweep, tmp_path):
    out = report(str(sweep / "ok"), "--metric", "train_loss", "--format", "json", "--out", str(tmp_path / "r"),
                 cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {r["arm"]: r for r in json.loads((tmp_path / "r" / "report.json").read_text())["comparison"]}

    def tail(run_dir):  # the last 10 % of the steps: with 4 steps logged every 2, step 4 alone
        events = scalar_tags(run_dir / "tb")["train/loss"]
        last = max(e.step for e in events)
        return statistics.mean(e.value for e in events if e.step >= 0.9 * last)

    by = {(read_summary(d)["precision"], read_summary(d)["seed"]): d for d in run_dirs(sweep / "ok")}
    deltas = [tail(by["bf16", seed]) - tail(by["fp32", seed]) for seed in (0, 1)]
    assert rows["bf16"]["pairs"] == 2 and rows["bf16"]["paired_delta"] == pytest.approx(statistics.mean(deltas))
    fp32_mean = statistics.mean(tail(by["fp32", seed]) for seed in (0, 1))
    assert rows["bf16"]["margin"] == pytest.approx(0.01 * fp32_mean)  # 1 % of the control's loss; lower is better


def _runs(arm: str, metrics: list[float], status: str = "completed"):
    import pandas as pd

    return pd.DataFrame({"seed": range(len(metrics)), "status": status, "metric": metrics, "arm": arm})


@pytest.mark.parametrize("arm, higher, margin, verdict", [
    ([0.900, 0.902, 0.899, 0.901, 0.900], True, 0.005, "equivalent"),  # inside ±0.5 points
    ([0.880, 0.882, 0.879, 0.881, 0.880], True, 0.005, "worse"),  # 2 points below, tight
    ([0.920, 0.922, 0.919, 0.921, 0.920], True, 0.005, "better"),
    ([0.880, 0.930, 0.870, 0.925, 0.895], True, 0.005, "inconclusive"),  # spread wider than the margin, around 0
    ([0.900], True, 0.005, "inconclusive"),  # one pair: no interval
    ([30.5, 30.7, 30.4, 30.5, 30.6], False, 0.3, "worse"),  # perplexity up by 0.5 > 1 % of 30: lower is better
])
def test_each_verdict_from_constructed_runs(arm, higher, margin, verdict):
    from mptrain.report.paired_verdict import paired_verdict

    control = _runs("fp32", [0.900, 0.901, 0.900, 0.900, 0.901] if higher else [30.0, 30.1, 29.9, 30.0, 30.1])
    result = paired_verdict(_runs("x", arm), control, higher, margin)  # pairs: the seeds both arms have
    assert result["verdict"] == verdict
    if len(arm) >= 2:
        deltas = [a - c for a, c in zip(arm, control["metric"])]
        half = T_975[len(arm) - 1] * statistics.stdev(deltas) / len(arm) ** 0.5
        assert result["ci_low"] == pytest.approx(statistics.mean(deltas) - half)


@pytest.mark.e2e
def test_report_opens_with_the_answer_and_short_run_ids(sweep, tmp_path):
    out = report(str(sweep / "ok"), "--out", str(tmp_path / "r"), "--margin", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    md = (tmp_path / "r" / "report.md").read_text()
    first_section = md.index("\n## ")
    assert md[first_section:].startswith("\n## The answer")
    assert "| experiment | metric | arm | paired Δ vs fp32 (95 % CI) | verdict (±δ) |" in md
    assert "(±2 pts)" in md  # --margin 2: two accuracy points, read in points
    assert "`bf16-s0`" in md and "`fp16-naive-s1`" in md  # run ids, not 120-character folders
    bad = report(str(sweep / "ok"), "--margin", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--margin '-1'" in bad.stderr


def test_a_gans_per_network_loss_scales_read_as_g_and_d():
    from mptrain.report.runs import per_network

    assert per_network({"g": 4096.0, "d": 2048.0}) == "g 4096 / d 2048"


def test_forward_headroom_table_rows_and_bits():
    from mptrain.report.tables import headroom_markdown

    text = headroom_markdown({"fp32": {"m.a": 1.0, "m.b": 131008.0}, "bf16": {"m.a": 4.0}}, rows=1)
    assert "| `m.b` | 1.31e+05 (-1.0 bit) | - |" in text and "m.a" not in text  # the one closest to 65504
    assert headroom_markdown({}) == ""
    assert "| `m.a` | inf (non-finite) |" in headroom_markdown({"fp16_naive": {"m.a": math.inf}})  # a diverged run


@pytest.mark.e2e
def test_exported_runs_regenerate_the_tables(sweep, tmp_path):
    """`--export-runs`: compact records (no TensorBoard files) from which the report's tables come out the same."""
    out = report(str(sweep / "ok"), "--export-runs", str(tmp_path / "records"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not list((tmp_path / "records").rglob("tb"))
    for source, name in ((sweep / "ok", "a"), (tmp_path / "records", "b")):
        for metric in ("primary", "train_loss"):
            done = report(str(source), "--format", "csv", "--metric", metric, "--out", str(tmp_path / name / metric),
                          cwd=tmp_path)
            assert done.returncode == 0, done.stderr
    for metric in ("primary", "train_loss"):
        a = (tmp_path / "a" / metric / "comparison.csv").read_text()
        assert a == (tmp_path / "b" / metric / "comparison.csv").read_text()


def test_the_plan_names_the_control_and_optim_state_makes_an_arm():
    """A block-format study is judged against bf16 (its plan's control), and optim.state=8bit is an arm of its
    section, not an experiment of its own."""
    import pandas as pd

    from mptrain.report.runs import arm_label, setting_label
    from mptrain.report.tables import _control_arm

    summary = {"precision": "bf16", "overrides": ["optim.state=8bit", "model=transformer", "seed=1"]}
    assert arm_label(summary) == "bf16 state=8bit" and "optim.state" not in setting_label(summary)
    arms = {"bf16 state=fp32": pd.DataFrame({"preset": ["bf16"]}), "mx": pd.DataFrame({"preset": ["mx"]}),
            "fp32": pd.DataFrame({"preset": ["fp32"]})}
    assert _control_arm({"control": "bf16 state=fp32"}, arms) == "bf16 state=fp32"
    assert _control_arm({"control": "mx"}, arms) == "mx"  # by preset
    assert _control_arm(None, arms) == "fp32" and _control_arm({"control": "fp32"}, arms) == "fp32"


def test_dose_response_pairs_each_settings_delta_with_the_updates_it_lost(tmp_path):
    """Sec. 3.1's chart: one point per learning rate, x the arm's own lost-update share, y its paired Δ in points;
    a model seen in one setting only draws nothing."""
    import pandas as pd

    from mptrain.report import plots

    def table(delta, lost):
        t = pd.DataFrame({"arm": ["fp32", "fp16_naive"], "control": [True, False], "paired_delta": [None, delta],
                          "ci_low": [None, delta - 0.002], "ci_high": [None, delta + 0.002],
                          "lost_update_frac": [0.01, lost]})
        t.attrs["metric"] = "accuracy"
        return t

    tables = {("resnet", "fashion_mnist", "experiment=x optim.lr=0.1"): table(-0.001, 0.05),
              ("resnet", "fashion_mnist", "experiment=x optim.lr=0.01"): table(-0.02, 0.40)}
    points = plots.dose_points(tables)
    assert list(points) == [("resnet", "fashion_mnist", "accuracy", "fp16_naive")]
    (lr1, *first), (lr2, *second) = points[("resnet", "fashion_mnist", "accuracy", "fp16_naive")]
    assert (lr1, lr2) == ("optim.lr=0.1", "optim.lr=0.01")  # by share, labelled by what differs
    assert first == pytest.approx([5.0, -0.1, -0.3, 0.1]) and second == pytest.approx([40.0, -2.0, -2.2, -1.8])
    assert plots.dose_response(tables, tmp_path / "d.png").stat().st_size > 0
    assert plots.dose_response(dict(list(tables.items())[:1]), tmp_path / "e.png") is None
    tables[("resnet", "fashion_mnist", "experiment=x optim.lr=0.01")] = table(-0.02, 0.055)
    assert plots.dose_points(tables) == {}  # 5.0 % and 5.5 %: one dose, whatever the settings


def test_a_preset_that_puts_the_norms_in_fp16_is_an_arm_of_its_own():
    """fp16_naive_norm16 sets keep_norm_fp32=false inside its preset, unseen in the overrides: its runs were pooled
    with fp16_naive's until the summary said where the norms ran."""
    from mptrain.report.runs import arm_label

    def summary(norms, *overrides):
        return {"precision": "fp16_naive", "overrides": list(overrides),
                "arithmetic": {"accumulate": "fp32", "accumulate_block": None, "reductions": "fp32", "norms": norms}}

    assert arm_label(summary("fp32")) == "fp16_naive"
    assert arm_label(summary("fp16")) == "fp16_naive keep_norm_fp32=false"
    assert arm_label(summary("fp16", "precision.keep_norm_fp32=false")) == "fp16_naive keep_norm_fp32=false"
    assert arm_label(summary(None)) == "fp16_naive"  # records from before the field


def test_a_resumed_runs_relogged_steps_count_once_with_the_resumed_value(tmp_path):
    """A run cut off after step 230 and resumed from its step-200 checkpoint logs step 230 again: the report's
    curves and exported records keep one point per step, the resumed one (two points once broke the plots)."""
    from torch.utils.tensorboard import SummaryWriter

    from mptrain.report.runs import SCALARS_FILE, load_scalars

    run = tmp_path / "run"
    for points in (((100, 9.0), (200, 8.0), (230, 7.9)), ((230, 7.5), (300, 7.0))):  # before the cut; resumed
        writer = SummaryWriter(str(run / "tb"))
        for step, value in points:
            writer.add_scalar("eval/perplexity", value, step)
        writer.close()
    series = load_scalars(run, ("eval/",))["eval/perplexity"]
    assert list(series.index) == [100, 200, 230, 300] and series[230] == 7.5
    exported = tmp_path / "record"
    exported.mkdir()
    (exported / SCALARS_FILE).write_text(json.dumps({"eval/perplexity": [[230, 7.9], [300, 7.0], [230, 7.5]]}))
    assert load_scalars(exported, ("eval/",))["eval/perplexity"].to_dict() == {230: 7.5, 300: 7.0}
