"""model=ssd on dataset=fashion_mnist_detection: the canvases, the mAP, FP16 steps, every mode, bad input."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from cli_helpers import mptrain, read_summary, train_inprocess
from mptrain.data.detection import EMPTY, draw_canvases
from mptrain.precision import MODES
from mptrain.tasks.detection import mean_average_precision, truth

TINY_SSD = ["debug=tiny_ssd", "trainer.progress=false"]


def _layout(**overrides):
    cfg = {"canvas": 64, "min_objects": 1, "max_objects": 4, "min_size": 10, "max_size": 30, "seed": 3}
    return OmegaConf.create({**cfg, **overrides})


def _items(n=50):
    """Items with a known footprint: a solid rectangle inside each 28 x 28 square, at a different place in each."""
    g = torch.Generator().manual_seed(0)
    items = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i in range(n):
        top, left = torch.randint(0, 10, (2,), generator=g).tolist()
        height, width = torch.randint(8, 18, (2,), generator=g).tolist()
        items[i, top:top + height, left:left + width] = 200
    return items, torch.arange(n) % 10


def test_canvases_are_deterministic_per_seed_and_split():
    items, labels = _items()
    a = draw_canvases(items, labels, 20, _layout(), "train")
    b = draw_canvases(items, labels, 20, _layout(), "train")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other_seed = draw_canvases(items, labels, 20, _layout(seed=4), "train")
    other_split = draw_canvases(items, labels, 20, _layout(), "test")
    assert not torch.equal(a[0], other_seed[0]) and not torch.equal(a[0], other_split[0])


def test_every_box_is_tight_around_its_item_and_nothing_lies_outside_the_boxes():
    items, labels = _items()
    images, targets = draw_canvases(items, labels, 30, _layout(), "train")
    counts = (targets[:, :, 0] != EMPTY).sum(1)
    assert counts.min() >= 1 and counts.max() <= 4 and len(set(counts.tolist())) > 1
    for image, rows in zip(images[:, 0], targets):
        covered = torch.zeros_like(image, dtype=torch.bool)
        for cls, x1, y1, x2, y2 in rows[rows[:, 0] != EMPTY].long().tolist():
            assert 0 <= cls < 10 and 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            box = image[y1:y2, x1:x2] > 0
            # tight: every edge row and column of the box holds some of the item
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            covered[y1:y2, x1:x2] = True
        assert not (image[~covered] > 0).any()  # every lit pixel belongs to a box


def test_real_canvases_hold_real_items_with_their_classes(compose_cfg):
    from mptrain.data import build_data

    cfg = compose_cfg(*TINY_SSD)
    data = build_data(cfg.dataset, torch.device("cpu"), seed=0)
    assert data.spec.boxes and data.spec.num_classes == 10 and data.spec.image_size == 48
    x, targets = next(iter(data.train))
    assert x.shape == (8, 1, 48, 48) and targets.shape == (8, 4, 5)
    again = build_data(cfg.dataset, torch.device("cpu"), seed=1)  # another run seed: the same canvases
    assert torch.equal(data.test.images, again.test.images)


def test_mean_average_precision_on_hand_made_boxes():
    """Two objects, one found exactly (score 0.9), one missed, one false alarm (0.8): precision 1 up to recall 0.5,
    then nothing; COCO's 101-point interpolation gives AP = 51/101 at every IoU threshold."""
    targets = torch.tensor([[[0, 10, 10, 30, 30], [0, 50, 50, 80, 80], [EMPTY] * 5]], dtype=torch.float32)
    found = [{"boxes": torch.tensor([[10.0, 10, 30, 30], [0, 60, 20, 90]]), "scores": torch.tensor([0.9, 0.8]),
              "labels": torch.tensor([0, 0])}]  # fmt: skip
    metric = mean_average_precision()
    metric.update(found, truth(targets))
    scores = metric.compute()
    assert float(scores["map_50"]) == pytest.approx(51 / 101, abs=1e-6)
    assert float(scores["map"]) == pytest.approx(51 / 101, abs=1e-6)
    metric = mean_average_precision()
    metric.update([{**found[0], "labels": torch.tensor([1, 1])}], truth(targets))  # the right boxes, wrong class
    assert float(metric.compute()["map_50"]) == 0.0


def test_fp16_steps_of_ssd_are_finite_and_its_loss_scaler_backs_off_then_applies(compose_cfg, tmp_path):
    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer

    cfg = compose_cfg(*TINY_SSD, "precision=mixed", "trainer.max_steps=6", "trainer.log_every=1")
    trainer = build_trainer(cfg, torch.device("cpu"), tmp_path, RecordingLogger(), None, [])
    first = trainer._train_step(next(iter(trainer.data.train)))
    assert torch.isfinite(first["loss"]) and next(trainer.task.model.parameters()).dtype == torch.float16
    trainer.fit(evaluate=False)
    stepper = trainer.steppers["model"]
    skipped = stepper.skipped_steps
    assert skipped < 6  # it applied updates
    assert float(stepper.current_scale) == 2.0 ** (16 - skipped)  # halved once per overflow, no growth in 6 steps
    assert all(torch.isfinite(p).all() for p in trainer.task.model.parameters())
    assert all(torch.isfinite(m).all() for m in stepper.masters.master_params)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_trains_ssd_a_few_steps(tmp_path, mode):
    train_inprocess(*TINY_SSD, f"precision={mode}", "trainer.max_steps=2", "trainer.eval_max_batches=1",
                    f"hydra.run.dir={tmp_path}")  # fmt: skip
    summary = read_summary(tmp_path)
    if mode == "fp16_naive":  # FP16 Adam: its eps and second moment round to 0 in FP16 (docs/modes.md)
        assert summary["status"] in ("completed", "diverged")
        return
    assert summary["status"] == "completed" and summary["primary_metric"] == "map_50"
    assert 0.0 <= summary["final"]["map_50"] <= 1.0 and "map" in summary["final"]


@pytest.mark.e2e
def test_mptrain_model_ssd_prints_its_map(tmp_path):
    out = mptrain(*TINY_SSD, "precision=mixed", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}",
                  cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "eval map_50" in out.stdout and read_summary(tmp_path / "run")["higher_is_better"] is True
