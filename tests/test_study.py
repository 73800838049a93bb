"""`mptrain.check`, `mptrain.study` and `mptrain-study`: the numerics answer and a whole study from Python and
from one command, on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cli_helpers import mptrain

TINY = ["model=mlp", "model.depth=2", "model.width=16", "dataset=synthetic", "dataset.train_size=64",
        "dataset.test_size=32", "dataset.batch_size=16"]


def _batch(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(10, (n,), generator=g)


def test_check_answers_with_the_scan_of_mptrain_numerics():
    import mptrain

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    before = [p.detach().clone() for p in model.parameters()]
    answer = mptrain.check(model, _batch())
    assert answer.loss_scale is not None and answer.loss_scale >= 1 and answer.first_fp16_overflow is None
    assert answer.fp8_keep_bf16 == [] and "recommended static scale for model" in str(answer)
    assert all(torch.equal(a, b) and p.grad is None for a, b, p in zip(before, model.parameters(), model.parameters()))


def test_check_finds_an_overflowing_output_and_gradients_fp16_would_flush():
    import mptrain

    loud = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Linear(8, 10))
    with torch.no_grad():
        loud[1].weight.fill_(1e5)  # outputs far beyond 65504
    answer = mptrain.check(loud, _batch())
    assert answer.first_fp16_overflow == "model.1" and "model.1" in answer.near_fp16_limit

    quiet = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    answer = mptrain.check(quiet, _batch(), loss_fn=lambda out, y: 1e-9 * nn.functional.cross_entropy(out, y))
    assert answer.flushed_frac > 0.5 and answer.loss_scale is not None and answer.loss_scale > 2**10


def test_check_refuses_what_it_cannot_read_in_one_line():
    import mptrain

    with pytest.raises(mptrain.UserError, match=r"^mptrain.check takes a batch \(inputs, targets\)"):
        mptrain.check(nn.Linear(4, 2), torch.zeros(3, 4))
    with pytest.raises(mptrain.UserError, match=r"^the output \(3, 2\) does not match targets \(5,\)"):
        mptrain.check(nn.Linear(4, 2), (torch.zeros(3, 4), torch.zeros(5, dtype=torch.long)))


def test_a_study_from_python_gives_the_verdict_table_and_the_report(tmp_path, monkeypatch):
    import mptrain

    monkeypatch.chdir(tmp_path)
    result = mptrain.study(model="mlp", data="synthetic", precisions=["fp32", "mixed"], seeds=2, steps=2,
                           overrides=TINY[1:3] + TINY[4:], numerics_steps=2, out=tmp_path / "study")
    table = result.table
    assert list(table["arm"].str.split().str[0]) == ["fp32", "mixed"]
    assert table.loc[1, "verdict"] in ("equivalent", "inconclusive", "worse", "better", "not worse")
    assert set(result.numerics) >= {"recommended", "first_fp16_overflow", "fp8_keep_bf16"}
    assert (result.out / "report" / "report.md").is_file() and (result.out / "numerics.json").is_file()
    assert len(list((result.out / "runs").glob("*/seed=*/summary.json"))) == 4
    assert "report:" in str(result)


@pytest.mark.parametrize("kwargs, says", [
    ({"precisions": ["mixed", "bf16"]}, r"fp32 is missing"),
    ({"precisions": ["fp32", "fp17"]}, r"unknown: fp17"),
    ({"seeds": 1}, r"needs seeds >= 2"),
    ({"overrides": ["precision=mixed"]}, r"sets precision and seed itself"),
    ({"overrides": ["model.depht=3"]}, r"model.depht"),
])
def test_a_study_refuses_bad_settings_before_it_runs_anything(tmp_path, kwargs, says):
    import mptrain

    out = tmp_path / "study"
    with pytest.raises(mptrain.UserError, match=says):
        mptrain.study(**{"model": TINY, "steps": 1, "out": out, **kwargs})
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(mptrain.UserError, match=r"is not empty"):
        mptrain.study(model=TINY, steps=1, out=out)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.e2e
def test_the_study_command_runs_the_same_study(tmp_path):
    out = mptrain(*TINY, "--modes", "fp32,bf16", "--seeds", "2", "--steps", "2",
                  "--numerics-steps", "2", "--out", str(tmp_path / "s"), cwd=tmp_path, script="mptrain-study")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FP16 loss scale for model" in out.stdout and "report:" in out.stdout
    bad = mptrain("--seeds", "0", *TINY, cwd=tmp_path, script="mptrain-study")
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("mptrain-study: error: argument --seeds")


def test_layer_groups_put_the_same_layer_of_every_block_together():
    from mptrain.studies.layers import group_layers

    layers = ["blocks.0.attn.qkv", "blocks.0.mlp.0", "blocks.1.attn.qkv", "blocks.1.mlp.0", "g.0", "g.3"]
    assert group_layers(layers, "kind") == ["blocks.*.attn.qkv", "blocks.*.mlp.0", "g.0", "g.3"]
    assert group_layers(layers, "layer") == layers


@pytest.mark.slow
def test_a_layer_study_ranks_each_group_against_bf16_and_finds_a_keep_list(tmp_path):
    """Each layer kind alone in MXFP4 against bf16, ranked; a keep-list search when all together are not
    equivalent; the report paired against bf16 (tiny transformer, 2 seeds, 4 steps: the verdicts are noise,
    the plumbing is what is tested)."""
    from mptrain.report.runs import load_runs
    from mptrain.studies.layers import run_layer_study

    lm = ["debug=tiny_lm", "model=transformer", "model.heads=2", "model.width=32", "model.context=8",
          "trainer.device=cpu"]
    result = run_layer_study(lm, "mxfp4", seeds=2, steps=4, out=tmp_path / "study", announce=lambda _: None,
                             margin=["perplexity=30"])
    control = result.table[result.table["control"]].iloc[0]
    assert result.table["margin"].dropna().iloc[0] == pytest.approx(0.30 * control["metric_mean"])  # --margin's
    groups = ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.0", "blocks.*.mlp.2"]
    assert sorted(g for g, _, _ in result.ranking) == sorted(groups)
    assert result.keep is None or set(result.keep) <= set(groups)
    runs = load_runs([result.out / "runs"])
    assert {"bf16", "mx block_format=mxfp4"} <= set(runs["arm"])
    assert (runs["arm"].str.contains("mx_only=").sum()) == 2 * len(groups)
    report = (result.out / "report" / "report.md").read_text()
    assert "Control: **bf16**" in report
    assert "smallest keep-list" in str(result) or "no keep-list" in str(result)


def test_a_bad_study_margin_is_one_line_before_anything_runs(tmp_path):
    import mptrain

    with pytest.raises(mptrain.UserError, match=r"--margin 'perplexity=x'"):
        mptrain.study(model=TINY, steps=1, margin="perplexity=x", out=tmp_path / "s")
    assert not (tmp_path / "s").exists()
