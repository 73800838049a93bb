"""Translation (model=gnmt): teacher-forced cross-entropy in FP32, corpus BLEU and chrF of the decoded held-out split.

BLEU and chrF are sacrebleu's, on detokenised text with the placeholders restored, against the human translation;
BLEU is the primary metric (in BLEU points, as sacrebleu prints it), chrF beside it; the held-out perplexity is
exp of the mean token negative log-likelihood (without label smoothing). Under data parallelism each rank decodes
its share and the sufficient statistics (n-gram matches and totals, lengths) are summed over ranks before the
score is computed, so the score is the corpus score of the whole split.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mptrain.data.translation_set import PAD
from mptrain.tasks.base import Task


def build(model_cfg, data, precision) -> Task:
    """model.task=translation (families.TASKS): the translator and how it is decoded."""
    from mptrain.models import build_model

    model = build_model(model_cfg, data.spec)
    return TranslationTask(precision.prepare(model), data.spec, model_cfg.label_smoothing, model_cfg.beam_width,
                           model_cfg.length_penalty)


def metrics_for(target: str):
    """sacrebleu's BLEU (its tokenizer for the target language) and chrF."""
    from sacrebleu.metrics import BLEU, CHRF

    tokenize = "zh" if target.startswith("zh") else "char" if target in ("ja", "ko", "th") else "13a"
    return BLEU(tokenize=tokenize), CHRF()


def corpus_statistics(metric, hypotheses: list[str], references: list[str]) -> torch.Tensor:
    """The metric's sufficient statistics summed over the sentences (they add over a corpus's parts)."""
    stats = metric._extract_corpus_statistics(hypotheses, [references])
    return torch.tensor([sum(column) for column in zip(*stats)], dtype=torch.float64)


def score_from(metric, stats: torch.Tensor) -> float:
    return float(metric._compute_score_from_stats([int(v) if float(v).is_integer() else float(v)
                                                   for v in stats.tolist()]).score)


class TranslationTask(Task):
    family = "translation"

    def __init__(self, model: nn.Module, spec, label_smoothing: float, beam_width: int, length_penalty: float):
        self.model, self.trained = model, model
        self.spec, self.label_smoothing = spec, label_smoothing
        self.beam_width, self.length_penalty = beam_width, length_penalty

    def networks(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def wrap_training_forward(self, wrap) -> None:
        self.trained = wrap(self.trained)

    def _logits(self, batch, precision, net=None):
        source, (target_in, _, _) = batch
        with precision.autocast():
            return (net or self.model)(source, target_in)

    def _loss(self, batch, precision, net=None, smoothing: float = 0.0):
        _, (_, target_out, _) = batch
        logits = self._logits(batch, precision, net)
        # the softmax over the vocabulary is a reduction: FP32
        return F.cross_entropy(logits.float().flatten(0, 1), target_out.flatten(), ignore_index=PAD,
                               label_smoothing=smoothing)

    def train_step(self, batch, steppers, precision):
        stepper = steppers["model"]
        stepper.zero_grad()
        loss = self._loss(batch, precision, self.trained, self.label_smoothing)
        stepper.backward(loss)
        stepper.step()
        return {"loss": loss.detach()}

    def check_loss(self, batch, precision, nets=None):
        return self._loss(batch, precision, nets["model"] if nets else self.trained, self.label_smoothing)

    @torch.no_grad()
    def eval_step(self, batch, precision):
        return {"loss": self._loss(batch, precision)}

    def decode(self, source: torch.Tensor, precision) -> list[list[int]]:
        from mptrain.models.gnmt import beam_search, greedy

        limit = 2 * source.shape[1] + 10
        with precision.autocast():
            if self.beam_width == 1:
                return greedy(self.model, source, limit)
            return beam_search(self.model, source, self.beam_width, limit, self.length_penalty)

    def evaluate(self, batches, precision) -> dict[str, float]:
        """Held-out perplexity over every target token, and corpus BLEU / chrF of the decoded split."""
        self.start_pass(training=False)
        bleu, chrf = metrics_for(self.spec.target)
        references = self.spec.references["test"]
        totals = torch.zeros(2, dtype=torch.float64)
        stats = {name: corpus_statistics(metric, [""], [""]) * 0 for name, metric in (("bleu", bleu), ("chrf", chrf))}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    _, (_, target_out, index) = batch
                    tokens = int((target_out != PAD).sum())
                    totals += torch.tensor([float(self._loss(batch, precision)) * tokens, tokens], dtype=torch.float64)
                    pairs = [references[i] for i in index.tolist()]
                    hypotheses = [self.spec.detokenize(ids, placeholders)
                                  for ids, (_, placeholders) in zip(self.decode(batch[0], precision), pairs)]
                    for name, metric in (("bleu", bleu), ("chrf", chrf)):
                        part = corpus_statistics(metric, hypotheses, [r for r, _ in pairs])
                        stats[name] += part
        finally:
            self.model.train(was_training)
        device = next(self.model.parameters()).device
        if self.reduce_over_ranks is not None:
            totals = self.reduce_over_ranks(totals.to(device)).cpu()
            stats = {k: self.reduce_over_ranks(v.to(device)).cpu() for k, v in stats.items()}
        loss = totals[0].item() / max(totals[1].item(), 1.0)
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"),
                "bleu": score_from(bleu, stats["bleu"]), "chrf": score_from(chrf, stats["chrf"])}

    def describe(self) -> dict:
        return {"corpus": self.spec.corpus, "decoding": {"beam_width": self.beam_width,
                                                         "length_penalty": self.length_penalty},
                "attention": "multiplicative (Luong's general score, scaled)"}
