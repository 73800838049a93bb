"""A new user's first hour (issue: a crash, a lost run, silent overrides): each defect, tested at its root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import MPTRAIN, mptrain, read_summary
from mptrain.errors import UserError

NUMERICS = str(Path(sys.executable).with_name("mptrain-numerics"))
QUICK = ["model=mlp", "dataset=synthetic", "model.depth=2", "model.width=8", "dataset.train_size=64",
         "dataset.test_size=32", "dataset.batch_size=16", "trainer.max_steps=2"]


@pytest.mark.e2e
def test_runs_started_together_get_folders_of_their_own(tmp_path):
    """Two runs in the same second used to share runs/<...>/<second>/ and the second overwrote the first."""
    procs = [subprocess.Popen([MPTRAIN, *QUICK, f"seed={seed}"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2, 3)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    runs = sorted(tmp_path.glob("runs/mlp-synthetic-fp32/*/summary.json"))
    assert len(runs) == 3 and sorted(read_summary(r.parent)["seed"] for r in runs) == [1, 2, 3]


def test_claiming_a_run_folder_never_hands_out_one_twice(tmp_path):
    from mptrain.cli import claim_run_dir

    first, second = claim_run_dir(str(tmp_path), "2026-12-04_10-00-00"), claim_run_dir(str(tmp_path), "2026-12-04_10-00-00")
    assert first != second and Path(second).name == "2026-12-04_10-00-00_2"


@pytest.mark.parametrize("override, says", [
    ("+trainer.max_step=5", "trainer.max_step is not a key of trainer, so nothing would read it; did you mean "
                            "trainer.max_steps?"),
    ("+model._target_=foo.Bar", "model._target_ is not a key of model"),
    ("+foo=1", "foo is not a key mptrain reads"),
    ("+telemetry.numerics.evry=5", "telemetry.numerics.evry is not a key of telemetry.numerics, so nothing would read "
                                   "it; did you mean "
                                   "telemetry.numerics.every?"),
])
def test_a_key_nothing_reads_is_refused(compose_cfg, override, says):
    from mptrain import schema

    with pytest.raises(UserError) as refused:
        schema.validate(compose_cfg(override))
    assert str(refused.value).startswith(says) and "\n" not in str(refused.value)


@pytest.mark.e2e
def test_a_refused_config_leaves_no_run_folder(tmp_path):
    out = mptrain("+trainer.max_step=5", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("mptrain: error: trainer.max_step")
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
def test_help_lists_options_not_schemas_and_a_schema_choice_is_one_line(tmp_path):
    out = subprocess.run([MPTRAIN, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and "model: alexnet, custom, dcgan" in out.stdout and "_schema" not in out.stdout
    for cmd in ([MPTRAIN, "model=resnet_schema"], [NUMERICS, "model=resnet_schema"]):
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "model=resnet_schema is the schema behind the model options, not an option" in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
def test_numerics_lists_choices_and_suggests_a_close_one(tmp_path):
    done = subprocess.run([NUMERICS, "model=lstm"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "model=lstm is not an option of model; did you mean model=lstm_lm? choose one of alexnet" in done.stderr
    done = subprocess.run([MPTRAIN, "precision=mixd"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert "did you mean precision=mixed?" in done.stderr


TINY_IMAGES = ["dataset=synthetic", "dataset.image_size=16", "dataset.channels=1", "dataset.train_size=64",
               "dataset.test_size=32", "dataset.batch_size=8"]
TINY_TEXT = ["dataset=synthetic_text", "model.width=8", "dataset.batch_size=4", "dataset.bptt=8"]
EVERY_FAMILY = {
    "resnet": ["model=resnet", *TINY_IMAGES, "model.depth=8", "model.width=4"],
    "mlp": ["model=mlp", *TINY_IMAGES, "model.depth=3", "model.width=8"],
    "lstm_classifier": ["model=lstm_classifier", *TINY_IMAGES, "model.width=8"],
    "lstm_lm": ["model=lstm_lm", *TINY_TEXT],
    "transformer": ["model=transformer", *TINY_TEXT, "model.heads=2", "model.layers=1", "model.context=8"],
    "dcgan": ["model=dcgan", *TINY_IMAGES, "model.width=4", "model.fid.extractor_steps=5"],
}


# every family from a mixed-trained checkpoint; the recurrent ones from an fp32-trained one too
CHECKED = [(f, "mixed") for f in EVERY_FAMILY] + [("lstm_lm", "fp32"), ("lstm_classifier", "fp32")]


@pytest.mark.e2e
@pytest.mark.parametrize("family, mode", CHECKED)
def test_every_familys_checkpoint_goes_through_the_fp16_check(tmp_path, family, mode):
    """`mptrain-numerics --checkpoint` crashed on every LSTM LM checkpoint (an FP16 cast re-entered the emulated
    recurrence's FP32 call)."""
    run = tmp_path / "run"
    env = {"MPTRAIN_CACHE": str(tmp_path / "cache")}
    out = mptrain(*EVERY_FAMILY[family], f"precision={mode}", "trainer.max_steps=2", "trainer.checkpoint_every=2",
                  "trainer.eval_max_batches=1", f"hydra.run.dir={run}", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    done = subprocess.run([NUMERICS, "--checkpoint", str(run), "--batches", "2"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, env={**__import__("os").environ, **env})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "held-out batches forward with FP16 weights" in done.stdout


def test_the_emulated_recurrence_runs_its_module_hooks_once():
    import torch

    from mptrain.precision.emulation import EmulatedKernels, low_recurrence

    rnn = torch.nn.LSTM(4, 6, batch_first=True).half()
    calls = []
    rnn.register_forward_hook(lambda _m, _i, out: calls.append(out[0].dtype))
    x = torch.randn(2, 3, 4).half()
    with EmulatedKernels():
        out, _ = low_recurrence(rnn, dict(rnn.named_parameters()), x, None)
    assert out.dtype == torch.float16 and calls == []  # the caller's own call runs the hooks, not the FP32 inside


def test_one_stalled_window_does_not_carry_the_throughput(monkeypatch):
    """A 6-run sweep reported bf16 5.17x fp32 because both fp32 runs stalled for seconds in one window: the mean
    over all steps let one window dominate; the median window does not."""
    import torch

    from mptrain.telemetry import throughput as tp

    clock = iter([0.0, 1.0, 1.0, 2.0, 2.0, 12.0, 12.0, 13.0, 13.0, 14.0])  # window 3 stalls for 10 s
    monkeypatch.setattr(tp.time, "perf_counter", lambda: next(clock))
    t = tp.Throughput(torch.device("cpu"), warmup_steps=0)
    for _ in range(5):
        t.begin()
        for _ in range(10):
            t.count(100)
        t.end()
    median, steps, quartiles = t.median_rates()
    assert median == 1000.0 and steps == 10.0 and quartiles[0] <= 1000.0 <= quartiles[1]
    assert t.mean_rates()[0] == pytest.approx(5000 / 14)  # what the report used to show


def test_the_report_takes_the_median_run_and_flags_runs_that_disagree():
    import pandas as pd

    from mptrain.report.tables import _arm_row, speed_cell

    runs = pd.DataFrame({"status": "completed", "metric": [0.9, 0.9, 0.9], "samples_per_s": [772.0, 713.0, 106.0],
                         "peak_memory_mb": 1.0, "bytes_per_param": 1.0, "skipped_steps": 0, "final_loss_scale": None,
                         "lost_update_frac": None, "nearest_drop_frac": None, "drop_kept_frac": None})
    row = _arm_row("fp32", runs)
    assert row["samples_per_s"] == 713.0
    assert "runs differ by 628%: measure speed with mptrain-bench" in speed_cell({**row, "control": True})


def test_a_loss_scale_reads_as_a_power_of_two():
    from mptrain.telemetry.summary import format_scale, format_summary

    assert format_scale(65536.0) == "65536 (2^16)" and format_scale(0.25) == "0.25 (2^-2)"
    assert "final loss scale  g: 32768 (2^15); d: 1024 (2^10)" in format_summary(
        {"final_loss_scale": {"g": 32768.0, "d": 1024.0}})


@pytest.mark.e2e
def test_an_fp32_run_logs_no_skipped_steps_and_the_log_line_shows_the_scale(tmp_path):
    from cli_helpers import scalar_tags

    out = mptrain(*QUICK, "precision=fp32", "trainer.log_every=1", f"hydra.run.dir={tmp_path}/a", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not any(t.startswith(("amp/", "scaler/")) for t in scalar_tags(tmp_path / "a" / "tb"))
    out = mptrain(*QUICK, "precision=mixed", "trainer.log_every=1", "trainer.progress=false",
                  f"hydra.run.dir={tmp_path}/b", cwd=tmp_path)
    assert "loss_scale 65536 (2^16)" in out.stderr + out.stdout and "6.554e+04" not in out.stderr + out.stdout
    assert "scaler/skipped_steps" in scalar_tags(tmp_path / "b" / "tb")


@pytest.mark.e2e
def test_the_interrupt_line_is_the_whole_resume_command_and_the_report_sees_one_run(tmp_path):
    """The SIGTERM hint said `trainer.resume=<dir>`, which, followed literally, was refused (the overrides were not
    reapplied), left a stray folder, and the resumed part went to a new folder the report filed apart."""
    import shlex

    from cli_helpers import sigterm_once_training
    from mptrain.report.runs import load_runs

    args = ["model=mlp", "dataset=synthetic", "model.depth=2", "model.width=8", "precision=mixed",
            "trainer.max_steps=3000", "trainer.log_every=1", "seed=3"]
    # a signal 0.2 s after the first events: 400 steps of this MLP (2 ms each on one thread) once finished before
    # it came, and the signal then met a process past its handlers (-15 instead of 130)
    done = sigterm_once_training(*args, watch=tmp_path / "runs", cwd=tmp_path, after=0.2)
    assert done.returncode == 130, done.stderr[-2000:]
    line = next(ln for ln in done.stderr.splitlines() if ln.startswith("mptrain: continue with: "))
    command = [w for w in shlex.split(line.removeprefix("mptrain: continue with: ")) if not w.startswith("PYTHONPATH=")]
    assert command[0] == "mptrain" and "precision=mixed" in command and "trainer.resume=auto" in command
    resumed = subprocess.run([MPTRAIN, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    folders = list(tmp_path.glob("runs/*/*"))
    assert len(folders) == 1
    summary = read_summary(folders[0])
    assert summary["status"] == "completed" and summary["steps"] == 3000 and summary["resumed_from"]["step"] > 0
    runs = load_runs([tmp_path / "runs"])
    setting = runs["setting"].iloc[0]
    assert len(runs) == 1 and "trainer.resume" not in setting and "model.depth=2" in setting


@pytest.mark.parametrize("group", ["model", "dataset", "precision", "optim"])
def test_readme_config_groups_table_lists_every_option(group):
    """The groups table (README's, now docs/configuration.md's) listed 6 of the 12 precision options: it names every
    option of every group now."""
    import re

    from mptrain.paths import group_options

    readme = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith(f"| `{group}` |"))
    named = set(re.findall(r"`([a-z0-9_]+)`", row))
    assert set(group_options(group)) <= named, set(group_options(group)) - named


@pytest.mark.parametrize("page", ["README.md", "docs/modes.md"])
def test_the_mode_tables_have_a_row_per_mode_and_agree(page):
    from mptrain.schema.precision import MODES

    root = Path(__file__).resolve().parents[1]

    def table(path):
        text = (root / path).read_text()
        return text[text.index("| mode | weights held |"):].split("\n\n")[0]

    rows = {line.split("|")[1].strip().split()[0].strip("`") for line in table(page).splitlines()[2:]}
    assert rows == set(MODES)
    assert table("README.md") == table("docs/modes.md")


@pytest.mark.parametrize("override", ["seed=-1", "seed=4294967296"])
def test_a_seed_numpy_would_refuse_is_one_line(compose_cfg, override):
    from mptrain import schema

    with pytest.raises(UserError, match=r"^seed must be an integer in \[0, 2\^32\)"):
        schema.validate(compose_cfg(override))


@pytest.mark.e2e
def test_the_docs_build_strictly(tmp_path):
    """docs/ with MkDocs (Material), --strict: a broken link, or a page missing from the nav, fails."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        pytest.skip("the docs extra is not installed (make test installs it)")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([str(mkdocs), "build", "--strict", "-d", str(tmp_path / "site")], cwd=root,
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                              "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()


def test_readme_is_a_front_page_and_links_only_what_exists():
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#:]+)\)", readme):
        assert (root / target).exists(), target


def _readme_commands() -> list[str]:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("make ")]


@pytest.mark.e2e
@pytest.mark.parametrize("command", _readme_commands())
def test_every_readme_command_is_accepted_as_shown(tmp_path, command):
    """Each `mptrain` line of README composes and validates exactly as written (`--cfg job`: no training); each
    other console script exists and answers --help. `make run` / `make test` are what CI itself runs."""
    import shlex

    words = [w for w in shlex.split(command.replace("PYTHONPATH=. ", "")) if w not in ("-m", "--multirun")]
    script = str(Path(sys.executable).with_name(words[0]))
    args = [*words[1:], "--cfg", "job"] if words[0] == "mptrain" else ["--help"]
    env = {**__import__("os").environ, "HOME": str(tmp_path)}
    args = [__import__("os").path.expandvars(a.replace("$HOME", str(tmp_path))) for a in args]  # as the shell would
    done = subprocess.run([script, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"{command}: {done.stderr[-1500:]}"
    assert not (tmp_path / "runs").exists()
