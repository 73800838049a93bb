"""`python -m mptrain.scripts.lm_by_frequency`: a language model's held-out loss split by training frequency,
recomputed from finished runs' checkpoints."""

from __future__ import annotations

import json
import math

import pytest

from cli_helpers import read_summary, train_inprocess
from mptrain.scripts import lm_by_frequency

TINY_LM = ["model=lstm_lm", "dataset=synthetic_text", "model.width=8", "dataset.batch_size=4", "dataset.bptt=8",
           "trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.eval_every=null"]  # fmt: skip


@pytest.mark.e2e
def test_it_reproduces_each_runs_perplexity_and_splits_it_by_band(tmp_path, capsys):
    runs = []
    for mode in ("fp32", "mixed_scale1"):
        run = tmp_path / mode
        assert train_inprocess(*TINY_LM, f"precision={mode}", "seed=3", f"hydra.run.dir={run}")["status"] == "completed"
        runs.append(run)
    out = tmp_path / "bands.json"
    assert lm_by_frequency.main([*map(str, runs), "--json", str(out), "--md", str(tmp_path / "bands.md")]) == 0
    records = json.loads(out.read_text())
    for run, record in zip(runs, records):
        final = read_summary(run)["final"]["perplexity"]
        assert record["perplexity"] == pytest.approx(final, rel=1e-5)  # the run's own evaluation, recomputed
        total_loss = sum(record["loss_sum"]) / sum(record["tokens"])
        assert math.exp(total_loss) == pytest.approx(record["perplexity"])  # the bands add up to the whole
    assert records[0]["unk_flushed_share"] is None  # fp32 has no FP16 gradient to flush
    assert records[1]["final_loss_scale"] == 1 and 0 <= records[1]["unk_flushed_share"] <= 1
    table = capsys.readouterr().out
    assert "| mixed_scale1 | **all** |" in table and "(n=1)" in table and "| mixed_scale1 | " in table.split("<unk>)")[-1]
    assert (tmp_path / "bands.md").read_text().startswith("| mode | band")


def test_a_folder_without_a_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    assert lm_by_frequency.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run dir with a checkpoint" in err[0]


@pytest.mark.parametrize("tokens, scale", [(2048, 128.0), (2048, 1.0), (2048, 65536.0), (32, 1.0)])
def test_the_flush_threshold_is_where_fp16_rounds_the_logit_gradient_to_zero(tokens, scale):
    import torch

    p = math.exp(lm_by_frequency.flush_logprob(tokens, scale))
    gradient = torch.tensor([p * 0.999, p * 1.001], dtype=torch.float64) / tokens * scale  # as the loss's mean gives
    assert gradient.half().tolist() == [0.0, 2.0**-24]
