"""Speech recognition (model=deepspeech2): CTC loss computed in FP32, greedy CTC decoding, character and word
error rates over the whole held-out split.

CER = character edits / reference characters, summed over utterances and data-parallel ranks (not a mean of
per-utterance rates); WER the same over words (English words, or Mandarin's pinyin syllables; Mandarin
characters have no spaces to count words by). Both are
fractions in summary.json, printed in points. Edit distances: rapidfuzz's Levenshtein (jiwer's own backend).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from mptrain.errors import UserError
from mptrain.tasks.base import Task
from mptrain.telemetry.meters import MeanMeter

log = logging.getLogger(__name__)


def build(model_cfg, data, precision) -> Task:
    """model.task=speech (families.TASKS): the recogniser, with the utterances CTC cannot align left out."""
    from mptrain.models import build_model

    model = build_model(model_cfg, data.spec)
    for split, loader in (("train", data.train), ("test", data.test)):
        dropped = loader.keep_alignable(model.output_lengths)
        if dropped:
            log.warning("%d %s utterance(s) left out: fewer output steps after the front end's stride %d than CTC "
                        "needs for their characters", dropped, split, model.time_stride)
        if loader.num_samples == 0:
            raise UserError(f"every {split} utterance is too short for its characters after the front end's time "
                            f"stride {model.time_stride}; use dataset.max_units smaller or a slower voice")
    return SpeechTask(precision.prepare(model), data.spec.characters, data.spec.words)


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor, characters: tuple[str, ...]) -> list[str]:
    """Best path: the most likely symbol per step, repeats merged, blanks (id 0) removed."""
    best = logits.argmax(dim=-1).cpu()
    texts = []
    for row, n in zip(best, lengths.cpu().tolist()):
        path = row[:n]
        kept = path[torch.cat([torch.tensor([True]), path[1:] != path[:-1]])] if n else path
        texts.append("".join(characters[i] for i in kept.tolist() if i != 0))
    return texts


def edit_counts(references: list[str], hypotheses: list[str], words: bool) -> tuple[int, int]:
    """(edits, reference units) summed over the pairs: characters, or words split at spaces."""
    from rapidfuzz.distance import Levenshtein

    split = (lambda s: s.split()) if words else (lambda s: s)
    edits = sum(Levenshtein.distance(split(r), split(h)) for r, h in zip(references, hypotheses))
    return edits, sum(len(split(r)) for r in references)


class SpeechTask(Task):
    family = "speech"

    def __init__(self, model: nn.Module, characters: tuple[str, ...], words: bool):
        self.model, self.trained = model, model
        self.characters, self.words = characters, words

    def networks(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def wrap_training_forward(self, wrap) -> None:
        self.trained = wrap(self.trained)

    def _forward(self, batch, precision, net=None):
        features, (frames, targets, target_lengths) = batch
        with precision.autocast():
            logits, lengths = (net or self.model)(features, frames)
        # the softmax and CTC's sums over alignments are reductions: FP32, as the paper computes them
        log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
        loss = F.ctc_loss(log_probs, targets, lengths, target_lengths, blank=0, reduction="mean")
        return loss, logits, lengths

    def train_step(self, batch, steppers, precision):
        stepper = steppers["model"]
        stepper.zero_grad()
        loss, _, _ = self._forward(batch, precision, self.trained)
        stepper.backward(loss)
        stepper.step()
        return {"loss": loss.detach()}

    def check_loss(self, batch, precision, nets=None):
        return self._forward(batch, precision, nets["model"] if nets else self.trained)[0]

    @torch.no_grad()
    def eval_step(self, batch, precision):
        return {"loss": self._forward(batch, precision)[0]}

    def references(self, batch) -> list[str]:
        _, (_, targets, target_lengths) = batch
        return ["".join(self.characters[i] for i in row[:n].tolist()) for row, n in zip(targets, target_lengths)]

    def evaluate(self, batches, precision) -> dict[str, float]:
        """Held-out loss (mean over utterances) and CER / WER over the whole split and every rank."""
        self.start_pass(training=False)
        meter, counts = MeanMeter(), torch.zeros(4, dtype=torch.float64)
        with torch.no_grad():
            for batch in batches:
                loss, logits, lengths = self._forward(batch, precision)
                meter.add({"loss": loss}, self.batch_size(batch))
                references, hypotheses = self.references(batch), greedy_decode(logits, lengths, self.characters)
                counts += torch.tensor([*edit_counts(references, hypotheses, False),
                                        *edit_counts(references, hypotheses, True)], dtype=torch.float64)
        means, _ = meter.read(self.reduce_over_ranks)
        if self.reduce_over_ranks is not None:
            counts = self.reduce_over_ranks(counts.to(next(self.model.parameters()).device)).cpu()
        char_edits, chars, word_edits, words = counts.tolist()
        metrics = {**means, "cer": char_edits / chars if chars else float("nan")}
        if self.words:
            metrics["wer"] = word_edits / words if words else float("nan")
        return metrics
