"""Object detection (model=ssd): the MultiBox loss in FP32, mean average precision over the whole held-out split.

mAP is not a mean of per-batch values: an evaluation collects every canvas's detections and scores them once with
torchmetrics' MeanAveragePrecision (COCO's evaluation through pycocotools): `map_50` (mAP at IoU 0.5, the primary
metric, as VOC and the paper's SSD report it) and `map` (COCO's mean over IoU 0.50:0.95).
"""

from __future__ import annotations

import torch

from mptrain.errors import UserError
from mptrain.tasks.base import Task
from mptrain.telemetry.meters import MeanMeter


def mean_average_precision():
    """torchmetrics' MeanAveragePrecision on boxes (x1, y1, x2, y2 in pixels), COCO's evaluation."""
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError as e:
        raise UserError(f"model=ssd scores detections with torchmetrics and pycocotools ({e}); install them: "
                        "pip install 'mptrain[detection]'") from None
    return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")


def truth(targets: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Padded targets (N, K, 5) as the metric's per-image boxes and labels."""
    kept = [rows[rows[:, 0] >= 0] for rows in targets]
    return [{"boxes": rows[:, 1:].cpu(), "labels": rows[:, 0].long().cpu()} for rows in kept]


def build(model_cfg, data, precision) -> Task:
    """model.task=detection (families.TASKS)."""
    from mptrain.models import build_model

    return DetectionTask(precision.prepare(build_model(model_cfg, data.spec)))


class DetectionTask(Task):
    family = "detection"

    def __init__(self, model):
        self.model = model
        self.trained = model
        mean_average_precision()  # a missing library is one line now, not after the first epoch

    def networks(self):
        return {"model": self.model}

    def wrap_training_forward(self, wrap) -> None:
        self.trained = wrap(self.trained)

    def distribute(self, wrap, reduce) -> None:
        raise UserError("model=ssd trains on one device for now (its mAP is scored over the whole held-out split, "
                        "which data parallelism shards); drop trainer.devices")

    def _losses(self, x, targets, precision, net=None):
        with precision.autocast():
            head = (self.trained if net is None else net)(x)
        losses = self.model.loss(head, targets)  # FP32: matching, box encoding, hard-negative mining
        return losses["bbox_regression"] + losses["classification"], losses, head

    def train_step(self, batch, steppers, precision):
        x, targets = batch
        stepper = steppers["model"]
        stepper.zero_grad()
        loss, parts, _ = self._losses(x, targets, precision)
        stepper.backward(loss)
        stepper.step()
        return {"loss": loss.detach(), "loss_box": parts["bbox_regression"].detach(),
                "loss_class": parts["classification"].detach()}

    def check_loss(self, batch, precision, nets=None):
        x, targets = batch
        return self._losses(x, targets, precision, nets["model"] if nets else None)[0]

    @torch.no_grad()
    def eval_step(self, batch, precision):
        x, targets = batch
        loss, _, _ = self._losses(x, targets, precision, self.model)
        return {"loss": loss}

    @torch.no_grad()
    def evaluate(self, batches, precision) -> dict[str, float]:
        meter, metric = MeanMeter(), mean_average_precision()
        for x, targets in batches:
            loss, _, head = self._losses(x, targets, precision, self.model)
            meter.add({"loss": loss}, len(x))
            found = [{k: v.cpu() for k, v in d.items()} for d in self.model.detect(head)]
            metric.update(found, truth(targets))
        means, _ = meter.read(self.reduce_over_ranks)
        scores = metric.compute()
        return {**means, "map_50": float(scores["map_50"]), "map": float(scores["map"])}
