"""Language modelling (the recurrent family): next-token cross-entropy with truncated BPTT.

The hidden state is carried from one chunk to the next within a pass (the
loader continues each stream) and detached between chunks, so gradients flow
back through at most `dataset.bptt` steps. Perplexity is exp(mean loss per
token); bits per character is the mean loss / ln 2 for character-level text.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mptrain.tasks.base import Task


def detach_state(state):
    """A recurrent state cut from its graph (truncated BPTT); None stays None."""
    if state is None:  # a transformer carries nothing between chunks
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def build(model_cfg, data, precision) -> Task:
    """model.task=language_model (families.TASKS): a transformer attends within a chunk of at most its context."""
    from mptrain.errors import UserError
    from mptrain.models import build_model

    model = build_model(model_cfg, data.spec)
    context = getattr(model, "context", None)
    if context is not None and data.train.bptt > context:
        raise UserError(f"dataset.bptt={data.train.bptt} is longer than model.context={context}; use "
                        f"dataset.bptt={context} or less, or model.context={data.train.bptt}")
    return LanguageModelTask(precision.prepare(model), data.spec.level)


class LanguageModelTask(Task):
    family = "language_model"

    def __init__(self, model, level: str):
        """`model`: (tokens, state) → (logits, state), with `initial_state(batch, device)` (an LSTM LM or a
        transformer, whose state is None)."""
        self.model = model
        self.trained = model  # what the training forward runs: the model, or its DDP replica
        self.level = level
        self._states = {True: None, False: None}  # carried hidden state, keyed by training or not

    def networks(self):
        return {"model": self.model}

    def wrap_training_forward(self, wrap) -> None:
        self.trained = wrap(self.trained)

    @property
    def state(self):
        """The training pass's carried hidden state."""
        return self._states[True]

    def start_pass(self, training: bool) -> None:
        # each kind of pass has its own state: an evaluation in the middle of an epoch leaves training's intact
        self._states[training] = None

    def state_dict(self) -> dict:
        return {"hidden": self._states[True]}

    def load_state_dict(self, state: dict) -> None:
        self._states[True] = state["hidden"]

    def _loss(self, batch, precision, training: bool, net=None):
        x, y = batch
        state = self._states[training]
        if state is None or _batch_of(state) != x.shape[0]:  # (a transformer's state is always None)
            state = self.model.initial_state(x.shape[0], x.device)
        with precision.autocast():
            logits, state = (self.model if net is None else net)(x, state)
        self._states[training] = detach_state(state)  # truncated BPTT: the next chunk starts from values, not a graph
        # softmax over the vocabulary is a reduction: computed in FP32
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def train_step(self, batch, steppers, precision):
        stepper = steppers["model"]
        stepper.zero_grad()
        loss = self._loss(batch, precision, training=True, net=self.trained)
        stepper.backward(loss)
        stepper.step()
        return {"loss": loss.detach()}

    def check_loss(self, batch, precision, nets=None):
        x, y = batch
        net = nets["model"] if nets else self.trained
        model = nets["model"] if nets else self.model
        with precision.autocast():
            logits, _ = net(x, model.initial_state(x.shape[0], x.device))  # from a fresh state: no carried history
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    @torch.no_grad()
    def eval_step(self, batch, precision):
        return {"loss": self._loss(batch, precision, training=False)}

    def replay_forward(self, batch, precision) -> None:
        carried = self._states[True]
        try:
            self._loss(batch, precision, training=True)
        finally:
            self._states[True] = carried

    def derived_metrics(self, means):
        loss = means.get("loss")
        if loss is None:
            return {}
        derived = {"perplexity": math.exp(loss) if loss < 700 else float("inf")}
        if self.level == "char":
            derived["bpc"] = loss / math.log(2)
        return derived

    def batch_size(self, batch) -> int:
        return batch[1].numel()  # tokens predicted: the unit perplexity averages over


def _batch_of(state) -> int:
    first = state[0] if isinstance(state, tuple) else state
    return first.shape[1]
