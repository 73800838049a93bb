"""The three families through the CLI: logged tags, summary keys, artifacts, and the 18-run sweep."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import mptrain, read_summary, scalar_tags

MODES = ["fp32", "fp16_naive", "fp16_master", "mixed", "amp", "bf16"]
JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TINY_TEXT = ["dataset=synthetic_text", "model.width=8", "dataset.batch_size=4", "dataset.bptt=8",
             "trainer.log_every=2", "trainer.perf_warmup_steps=1"]
TINY_IMAGES = ["dataset=synthetic", "dataset.image_size=16", "dataset.channels=1", "dataset.train_size=64",
               "dataset.test_size=48", "dataset.batch_size=8", "trainer.log_every=2", "trainer.perf_warmup_steps=1"]
PRIMARY = {"lstm_lm": "perplexity", "lstm_classifier": "accuracy", "dcgan": "fid"}


def _image_tags(tb_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return acc.Tags()["images"]


@pytest.mark.e2e
def test_language_model_run_logs_perplexity_bpc_and_saves_the_vocabulary(tmp_path):
    run = tmp_path / "run"
    out = mptrain("model=lstm_lm", "precision=mixed", *TINY_TEXT, "trainer.max_steps=6", "trainer.eval_every=2",
                  f"hydra.run.dir={run}", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    s = read_summary(run)
    assert s["primary_metric"] == "perplexity" and s["family"] == "rnn" and s["status"] == "completed"
    assert 1 < s["final"]["perplexity"] < 40 and s["final"]["bpc"] > 0
    assert [h["step"] for h in s["history"]][:3] == [2, 4, 6]  # mid-epoch evaluations, then the last step
    assert {"train/loss", "train/perplexity", "train/bpc", "eval/loss", "eval/perplexity", "eval/bpc",
            "scaler/loss_scale", "optim/lr"} <= scalar_tags(run / "tb").keys()
    vocab = (run / "vocab.json").read_text()
    assert '"<unk>"' in vocab and '"sha256"' in vocab


@pytest.mark.e2e
def test_gan_run_logs_both_scalers_images_and_a_named_fid(tmp_path):
    run = tmp_path / "run"
    out = mptrain("model=dcgan", "precision=mixed", *TINY_IMAGES, "trainer.max_steps=4", "model.width=4",
                  "model.fid.extractor_steps=20", "trainer.media_every=2", f"hydra.run.dir={run}", cwd=tmp_path,
                  env={"MPTRAIN_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    s = read_summary(run)
    assert s["primary_metric"] == "fid" and s["final"]["fid"] > 0 and s["family"] == "gan"
    extractor = s["fid_feature_extractor"]
    assert extractor["name"] == "mptrain-smallcnn-v1" and 0 <= extractor["test_accuracy"] <= 1
    assert Path(extractor["path"]).is_relative_to(tmp_path / "cache")
    assert set(s["final_loss_scale"]) == {"g", "d"} and set(s["skipped_steps_by_network"]) == {"g", "d"}
    tags = scalar_tags(run / "tb").keys()
    assert {"gan/loss_d", "gan/loss_g", "gan/d_real", "gan/d_fake", "eval/fid",
            "scaler/loss_scale_g", "scaler/loss_scale_d", "scaler/skipped_steps_g", "scaler/skipped_steps_d"} <= tags
    assert "gan/samples" in _image_tags(run / "tb")


@pytest.mark.e2e
def test_sequence_classifier_reads_images_row_by_row(tmp_path):
    run = tmp_path / "run"
    out = mptrain("model=lstm_classifier", "precision=bf16", *TINY_IMAGES, "model.width=8", "trainer.max_steps=4",
                  f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    s = read_summary(run)
    assert s["primary_metric"] == "accuracy" and s["family"] == "rnn" and 0 <= s["final"]["accuracy"] <= 1


@pytest.mark.e2e
@pytest.mark.parametrize("args, message", [
    (["model=resnet", "dataset=synthetic_text"], "model=resnet reads image data but dataset=synthetic_text is text"),
    (["model=lstm_lm", "dataset=synthetic"], "model=lstm_lm reads text data but dataset=synthetic is image"),
    (["model=lstm_lm", "dataset.path=/nonexistent/corpus.txt"], "dataset.path=/nonexistent/corpus.txt does not exist"),
    (["model=lstm_lm", "dataset=synthetic_text", "model.cell=rnn"], "model.cell must be lstm or gru"),
    (["model=dcgan", "dataset=synthetic", "dataset.image_size=30"], "28, 32, 64"),
])
def test_family_mistakes_get_one_line(tmp_path, args, message):
    run = tmp_path / "run"
    out = mptrain(*args, f"hydra.run.dir={run}", cwd=tmp_path, env={"MPTRAIN_CACHE": str(tmp_path / "cache")})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert not run.exists()  # refused before training: no run folder


def _sweep(tmp_path: Path, name: str, *overrides: str) -> list[dict]:
    sweep = tmp_path / name
    out = mptrain("-m", "model=lstm_lm,lstm_classifier,dcgan", *overrides, "model.width=8", "dataset.batch_size=16",
                  "trainer.max_steps=10", "trainer.log_every=5", "trainer.eval_max_batches=2",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=3000, env={"MPTRAIN_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    return [read_summary(p.parent) for p in sweep.rglob("summary.json")]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(not (JARGON.exists() and FASHION_MNIST.is_dir()),
                    reason="needs Debian's jargon-text and dataset-fashion-mnist (make data)")
def test_every_family_in_every_mode_on_real_data(tmp_path):
    """The issue's sweep: 3 families x 6 modes, 10 steps each, on the Jargon File and Fashion-MNIST.

    Every run ends with its summary. fp16_naive ends `diverged`, for a real reason: all three
    families train with Adam, whose second moment (g² ~ 1e-8) and eps=1e-8 both flush to zero
    in FP16 state, so m / (sqrt(v) + eps) is inf. With a representable eps it completes."""
    summaries = _sweep(tmp_path, "modes", f"precision={','.join(MODES)}")
    assert sorted((s["model"], s["precision"]) for s in summaries) == sorted((m, p) for m in PRIMARY for p in MODES)
    for s in summaries:
        run = (s["model"], s["precision"], s.get("error"))
        assert s["dataset"] == ("text" if s["model"] == "lstm_lm" else "fashion_mnist")
        assert s["primary_metric"] == PRIMARY[s["model"]]
        if s["precision"] == "fp16_naive":
            assert s["status"] == "diverged" and "non-finite" in s["error"] and "at step 5" in s["error"], run
            assert any("optim.eps=1e-08 is 0 in float16" in w for w in s["warnings"]), run  # named up front
            continue
        assert s["status"] == "completed" and s["steps"] == 10, run
        assert s["final"][PRIMARY[s["model"]]] is not None, run

    # ++: the sweep is first composed with the default model (SGD, no eps); each job then sets it
    fixed = _sweep(tmp_path, "naive_eps", "precision=fp16_naive", "++optim.eps=1e-4")
    assert sorted(s["model"] for s in fixed) == sorted(PRIMARY)
    assert all(s["status"] == "completed" and s["steps"] == 10 for s in fixed), [s.get("error") for s in fixed]


@pytest.mark.e2e
@pytest.mark.slow
def test_transformer_trains_in_every_mode_and_reports(tmp_path):
    """The transformer through the CLI in all six modes at tiny size (fp16_naive with an eps FP16 can hold),
    then mptrain-report on the sweep."""
    import subprocess
    import sys

    sweep = tmp_path / "sweep"
    tiny = ["model=transformer", *TINY_TEXT, "model.heads=2", "model.context=8", "trainer.max_steps=4",
            "optim.eps=1e-4", "optim.warmup_steps=0"]
    out = mptrain("-m", f"precision={','.join(MODES)}", *tiny, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = [read_summary(p.parent) for p in sweep.rglob("summary.json")]
    assert sorted(s["precision"] for s in summaries) == sorted(MODES)
    for s in summaries:
        assert s["status"] == "completed" and s["family"] == "transformer", (s["precision"], s.get("error"))
        assert 1 < s["final"]["perplexity"] < 40
    report = subprocess.run([str(Path(sys.executable).with_name("mptrain-report")), str(sweep)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr
    assert "transformer" in (sweep / "report" / "report.md").read_text()
