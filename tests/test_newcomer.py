"""A newcomer's first hour (issue 45): the README's commands in order, errors that point the right way, a failed
resume or a refused config that leaves every record as it was, cautious short studies, check's answer first, a
full disk said in one line, and where things are."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_helpers import mptrain, user_package

FIXTURE = Path(__file__).parent / "fixtures" / "records"
ROOT = Path(__file__).resolve().parents[1]

USER_PACKAGE = '''
import torch
import torch.nn as nn


class NanoLM(nn.Module):
    """nanoGPT's interface in small: a context of block_size tokens, and a refusal of anything longer."""

    def __init__(self, vocab_size, block_size, width=16):
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(block_size, width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, idx):
        t = idx.shape[1]
        assert t <= self.block_size, f"Cannot forward sequence of length {t}, block size is only {self.block_size}"
        return self.head(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)))


def mlp(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))
'''
MLP = ["model=mlp", "model.depth=2", "model.width=8", "dataset=synthetic", "dataset.train_size=64",
       "dataset.test_size=16", "dataset.batch_size=16", "trainer.progress=false"]


@pytest.fixture
def package(tmp_path, monkeypatch):
    with user_package(tmp_path, monkeypatch, "nanowrap", USER_PACKAGE):
        yield tmp_path


# -- 1. a user's runs/ beside the committed results ---------------------------------------------------------------
def _report_then_check(tmp_path: Path, header_edit=None) -> list:
    from mptrain.report.check import check
    from mptrain.report.make import build

    shutil.copytree(FIXTURE, tmp_path / "results" / "exp" / "runs")
    build([tmp_path / "results" / "exp" / "runs"], tmp_path / "results" / "exp" / "report", "md")
    report = tmp_path / "results" / "exp" / "report" / "report.md"
    if header_edit:
        report.write_text(header_edit(report.read_text()))
    other = tmp_path / "runs"  # the quick start's run folder at the top, with other runs in it
    shutil.copytree(FIXTURE, other)
    for summary in other.rglob("summary.json"):
        data = json.loads(summary.read_text())
        data["final"]["accuracy"] = 0.1
        summary.write_text(json.dumps(data))
    os.chdir(tmp_path)
    return check([tmp_path / "results"])


def test_a_report_names_its_records_relative_to_itself_and_a_top_level_runs_folder_changes_nothing(tmp_path,
                                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    checked = _report_then_check(tmp_path)
    assert [c.status for c in checked] == ["same"], checked
    header = (tmp_path / "results" / "exp" / "report" / "report.md").read_text().splitlines()[2]
    assert "`../runs` (relative to this report)" in header


def test_a_report_from_before_the_relative_header_is_found_from_the_report_never_the_working_directory(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    legacy = lambda text: text.replace("`../runs` (relative to this report)", "`runs`")  # noqa: E731
    checked = _report_then_check(tmp_path, legacy)
    assert [c.status for c in checked] == ["same"], checked


# -- 3. errors that point the right way ---------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("args, says", [
    (["precision=fp16"], "FP16 runs as mixed (the paper's recipe"),
    (["precison=mixed"], "precison is not a config group or key of mptrain; did you mean precision?"),
    (["precision=mixed,bf16"], "add -m to run one job per value (mptrain -m precision=mixed,bf16)"),
    (["-m", "precision=fp32,mixed", "--cfg", "job"], "drop -m and give one job's values"),
])  # fmt: skip
def test_a_misspelt_mode_group_or_sweep_says_what_to_type(tmp_path, args, says):
    out = mptrain(*args, cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and says in lines[0], out.stderr[-1500:]
    assert list(tmp_path.iterdir()) == []


def test_a_custom_language_model_on_text_is_told_about_model_task(package, tmp_path):
    import mptrain

    with pytest.raises(mptrain.UserError) as refused:
        mptrain.train(["model=custom", "model.net._target_=nanowrap.NanoLM", "dataset=synthetic_text",
                       f"hydra.run.dir={tmp_path / 'run'}"])
    assert "set model.task=language_model" in str(refused.value), str(refused.value)
    assert not (tmp_path / "run").exists()


def test_a_context_length_parameter_gets_dataset_bptt_and_a_short_one_is_refused_at_the_real_shape(package):
    from omegaconf import OmegaConf

    from mptrain.data.text import TextSpec
    from mptrain.errors import UserError
    from mptrain.models import build_model

    spec = TextSpec("synthetic_text", vocab_size=12, level="char", bptt=128)
    cfg = lambda **net: OmegaConf.create({"name": "custom", "task": "language_model",  # noqa: E731
                                          "net": {"_target_": "nanowrap.NanoLM", **net}})
    assert build_model(cfg(), spec).net.block_size == 128  # filled from dataset.bptt, as vocab_size is
    with pytest.raises(UserError) as refused:
        build_model(cfg(block_size=64), spec)
    said = str(refused.value)
    assert "batch of shape (2, 128)" in said and "block size is only 64" in said and "dataset.bptt" in said, said
    assert "\n" not in said


# -- 4. nothing lost: a failed resume, a refused config ----------------------------------------------------------
def test_a_resume_that_cannot_start_leaves_the_interrupted_record_as_it_was(package, tmp_path, monkeypatch):
    import mptrain

    run = tmp_path / "run"
    args = ["model=custom", "model.net._target_=nanowrap.mlp", "dataset=synthetic", "dataset.image_size=8",
            "dataset.train_size=64", "dataset.batch_size=16", "trainer.max_steps=4", "trainer.checkpoint_every=2",
            "trainer.progress=false", f"hydra.run.dir={run}"]
    mptrain.train(args)
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = "interrupted"  # as a SIGINT leaves it (tests/test_checkpoint.py sends the real signal)
    (run / "summary.json").write_text(json.dumps(summary))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".log"}

    sys.modules.pop("nanowrap", None)  # the continue command pasted without the user's PYTHONPATH
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    sys.path.remove(str(package))
    with pytest.raises(mptrain.UserError, match="cannot be imported"):
        mptrain.train([*args, "trainer.resume=auto"])
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".log"}
    assert after == before  # summary.json still says interrupted; no new event file, no new checkpoint


def test_the_continue_command_carries_the_pythonpath_the_run_needed(tmp_path, monkeypatch):
    from mptrain.run import resume_command

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", "src")
    line = resume_command(["model=custom", "model.net._target_=pkg.Net"], Path("runs/x"))
    assert line.startswith(f"PYTHONPATH={tmp_path / 'src'} mptrain model=custom model.net._target_=pkg.Net ")
    assert line.endswith("hydra.run.dir=runs/x trainer.resume=auto")


def test_a_config_refused_when_built_raises_in_python_and_leaves_no_folder(tmp_path, monkeypatch):
    import mptrain

    monkeypatch.chdir(tmp_path)
    with pytest.raises(mptrain.UserError, match="model=resnet reads image data but dataset=synthetic_text"):
        mptrain.train(["model=resnet", "dataset=synthetic_text", "trainer.max_steps=1"])
    assert list(tmp_path.iterdir()) == []


# -- 5. short studies say what they can ---------------------------------------------------------------------------
def test_a_report_on_short_runs_says_they_only_show_the_start_and_its_tables_agree_on_units(tmp_path):
    from mptrain.report.make import build

    build([FIXTURE], tmp_path / "r", "md")
    text = (tmp_path / "r" / "report.md").read_text()
    assert "**Short runs**" in text and "40 training steps a run" in text
    runs = [line for line in text.splitlines() if line.startswith("| <span")]
    assert runs and all(" pts |" in line for line in runs)  # accuracy in points, as in the comparison table


def test_an_inconclusive_arm_of_one_pair_and_an_arm_without_control_say_what_to_run():
    from mptrain.report.tables import verdict_cell

    one = {"control": False, "margin": 0.005, "verdict": "inconclusive", "differs": "", "seeds_needed": float("nan"),
           "pairs": 1}
    assert "at least 2 are needed for any verdict, 3 or more to judge" in verdict_cell(one, "accuracy")
    alone = {**one, "verdict": "no control"}
    assert "mptrain -m precision=fp32,<mode> seed=0,1,2" in verdict_cell(alone, "accuracy")


def test_a_short_study_counts_its_runs_logs_curves_and_cautions(tmp_path):
    from cli_helpers import scalar_tags
    from mptrain.studies.study import describe, run_study

    said = []

    result = run_study(MLP, ["fp32", "mixed"], seeds=2, steps=8, numerics_steps=1, out=tmp_path / "s",
                       announce=said.append)
    runs = [line for line in said if line.startswith("2/3 run")]
    assert runs == ["2/3 run 1/4: precision=fp32 seed=0", "2/3 run 2/4: precision=fp32 seed=1",
                    "2/3 run 3/4: precision=mixed seed=0", "2/3 run 4/4: precision=mixed seed=1"]
    printed = describe(result)
    assert "Short runs (this study): 8 training steps a run" in printed and "seeds_needed" in printed
    points = scalar_tags(tmp_path / "s" / "runs" / "fp32" / "seed=0" / "tb")["train/loss"]
    assert len(points) == 8  # trainer.log_every from --steps: a curve, not one dot


# -- 6. check's answer first, and exact zeros kept out of the scale -----------------------------------------------
class _Attention(nn.Module):
    """A causal self-attention LM with a fused qkv bias: the key slice's gradient is zero in exact arithmetic."""

    def __init__(self, vocab=40, width=32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(16, width)
        self.c_attn, self.head = nn.Linear(width, 3 * width), nn.Linear(width, vocab)

    def forward(self, idx):
        b, t = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(t))
        q, k, v = (z.view(b, t, 2, -1).transpose(1, 2) for z in self.c_attn(x).chunk(3, dim=-1))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + y.transpose(1, 2).reshape(b, t, -1))


def test_check_puts_its_answer_first_and_keeps_exact_zeros_out_of_the_scale():
    import mptrain

    torch.manual_seed(0)
    model, tokens = _Attention(), torch.randint(0, 40, (8, 16))
    answer = mptrain.check(model, (tokens, torch.randint(0, 40, (8, 16))))
    text = str(answer)
    assert text.startswith("FP16 loss scale: ") and text.index("per layer:") > text.index("Linear layers to keep")
    assert answer.exact_zeros == {"c_attn.bias": pytest.approx(1 / 3, abs=0.02)}  # the key slice, all of it
    row = lambda a: next(r for r in a.analysis["layers"] if r["layer"] == "model.c_attn.bias")  # noqa: E731
    assert row(answer)["flushed_frac"] == 0.0
    raw = mptrain.check(model, (tokens, torch.randint(0, 40, (8, 16))), exact_zeros=False)
    assert row(raw)["flushed_frac"] > 0.3 and row(raw)["min_scale"] > 2**10 * row(answer)["min_scale"]


# -- 7. names: the run log, the scaler's tags ---------------------------------------------------------------------
def test_a_run_logs_to_mptrain_log_and_tags_the_scaler_by_its_name(tmp_path):
    import mptrain
    from cli_helpers import scalar_tags

    mptrain.train([*MLP, "precision=mixed", "trainer.max_steps=2", "trainer.log_every=1",
                   f"hydra.run.dir={tmp_path / 'run'}"])
    assert (tmp_path / "run" / "mptrain.log").is_file()
    assert {"scaler/loss_scale", "scaler/skipped_steps"} <= scalar_tags(tmp_path / "run" / "tb").keys()


def test_an_older_runs_amp_tags_read_as_the_scalers(tmp_path):
    from mptrain.report.runs import SCALARS_FILE, load_scalars

    (tmp_path / SCALARS_FILE).write_text(json.dumps({"amp/loss_scale_g": [[1, 65536.0]], "train/loss": [[1, 2.0]]}))
    assert list(load_scalars(tmp_path, ("scaler/loss_scale",))) == ["scaler/loss_scale_g"]


# -- 8. a full disk -----------------------------------------------------------------------------------------------
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_that_meets_a_full_disk_is_one_line_and_the_last_whole_one_stays(tmp_path, monkeypatch,
                                                                                         capsys):
    import mptrain
    from mptrain import checkpoint

    real_save, calls = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):  # the first checkpoint fits; the second meets a full disk
        calls.append(1)
        if len(calls) > 1:
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from OSError(
                errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    run = tmp_path / "run"
    summary = mptrain.train([*MLP, "trainer.max_steps=6", "trainer.checkpoint_every=2", f"hydra.run.dir={run}"])
    assert summary["status"] == "failed"
    assert summary["error"] == (f"no space left on the device writing the checkpoint of step 4 to {run}; the last "
                                f"whole checkpoint is step 2 ({run / 'checkpoint.pt'}); free space there, then continue")
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("mptrain: continue with: mptrain ") and "trainer.resume=auto" in line for line in err)
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 2
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".checkpoint")) == []
    assert checkpoint.FILENAME == "checkpoint.pt"


def test_tensorboard_events_on_a_full_disk_are_one_line(tmp_path, monkeypatch):
    import mptrain
    from mptrain.telemetry.tensorboard import TensorBoardLogger

    monkeypatch.setattr(TensorBoardLogger, "scalars", lambda self, values, step: _no_space())
    summary = mptrain.train([*MLP, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"])
    assert summary["status"] == "failed" and summary["error"].startswith(
        "no space left on the device writing ") and "\n" not in summary["error"]


def test_a_summary_or_a_report_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    from mptrain.report import cli as report_cli
    from mptrain.run import _write_summary
    from mptrain.telemetry import summary as summary_module

    monkeypatch.setattr(summary_module, "write_summary", lambda *a: _no_space())
    with pytest.raises(SystemExit) as ended:
        _write_summary(tmp_path, {"status": "completed"})
    err = capsys.readouterr().err.strip().splitlines()
    assert ended.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"mptrain: error: no space left on the device writing {tmp_path / 'summary.json'}")

    monkeypatch.setattr(report_cli, "build", _no_space)
    with pytest.raises(SystemExit) as ended:
        report_cli.main([str(FIXTURE), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err.strip().splitlines()
    assert ended.value.code == 2 and len(err) == 1 and "no space left on the device writing the report" in err[0]


# -- 9. where things are -------------------------------------------------------------------------------------------
def test_the_layout_page_names_every_module_and_package():
    layout = (ROOT / "docs" / "layout.md").read_text()
    package = ROOT / "mptrain"
    names = [p.name for p in package.iterdir() if (p.suffix == ".py" and p.stem != "__init__" and p.stem != "__main__")
             or (p.is_dir() and (p / "__init__.py").is_file())]
    missing = [n for n in names if (n if n.endswith(".py") else f"{n}/") not in layout]
    assert not missing, missing
    assert all((p / "__init__.py").is_file() for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"
               and any(p.glob("*.py")))
