"""Recurrent models: a stacked LSTM/GRU language model and a row-by-row image classifier.

``model.width`` is the number of hidden units, ``model.layers`` the stack depth,
``model.cell`` lstm or gru.
"""

from __future__ import annotations

import torch
from torch import nn

from mptrain.precision import emulation

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _cast_state(state, dtype):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.to(dtype) for s in state)
    return state.to(dtype)


def run_recurrent(rnn: nn.RNNBase, x: torch.Tensor, state: State | None):
    """``rnn(x, state)``, with autocast's low-precision recurrence also on the CPU, and FP16 and BF16 emulated whole.

    On CUDA autocast runs cuDNN's RNN in FP16/BF16. On the CPU autocast routes it to
    oneDNN, which refuses low-precision RNNs on CPUs without native FP16/BF16 ("could not
    create a primitive descriptor"); there we do what autocast would: run the recurrence
    with low-precision copies of the weights and inputs (gradients reach the FP32 weights).
    Under emulated kernels (precision.cpu_fp16, cpu_bf16) a low-precision recurrence runs as a fused GPU
    kernel would: low precision in and out, FP32 inside (`emulation.low_recurrence`).
    """
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            weights = {name: p.to(dtype) for name, p in rnn.named_parameters()}
            return _recurrence(rnn, weights, x.to(dtype), _cast_state(state, dtype))
    return _recurrence(rnn, None, x, state)


def _recurrence(rnn: nn.RNNBase, weights: dict | None, x: torch.Tensor, state: State | None):
    """The layer with `weights` in place of its own (None: its own), emulated whole under emulated kernels."""
    if emulation.emulating(x):
        return emulation.low_recurrence(rnn, weights or dict(rnn.named_parameters()), x, state)
    return rnn(x, state) if weights is None else torch.func.functional_call(rnn, weights, (x, state))


def _recurrent_layer(cfg, input_size: int) -> nn.RNNBase:
    layers, dropout = cfg.layers, cfg.dropout
    return CELLS[cfg.cell](input_size, cfg.width, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)


class LanguageModel(nn.Module):
    """Embedding → stacked LSTM/GRU → projection to the vocabulary (tied to the embedding when sizes allow)."""

    def __init__(self, vocab_size: int, embed: int, rnn: nn.RNNBase, dropout: float, tie: bool):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed)
        self.rnn = rnn
        self.drop = nn.Dropout(dropout)
        self.project = nn.Linear(rnn.hidden_size, embed) if tie and embed != rnn.hidden_size else None
        self.decoder = nn.Linear(embed if tie else rnn.hidden_size, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if tie:  # Press & Wolf 2017: input and output embeddings share one matrix
            self.decoder.weight = self.embedding.weight
        nn.init.zeros_(self.decoder.bias)

    def initial_state(self, batch_size: int, device: torch.device) -> State:
        weight = next(self.rnn.parameters())
        shape = (self.rnn.num_layers, batch_size, self.rnn.hidden_size)
        zeros = lambda: torch.zeros(shape, dtype=weight.dtype, device=device)  # noqa: E731
        return (zeros(), zeros()) if isinstance(self.rnn, nn.LSTM) else zeros()

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        out, state = run_recurrent(self.rnn, self.drop(self.embedding(tokens)), state)
        out = self.drop(out)
        if self.project is not None:
            out = self.project(out)
        return self.decoder(out), state


class RowSequenceClassifier(nn.Module):
    """Reads a (C, H, W) image as H time steps of C·W features (sequential MNIST); classifies the last state."""

    def __init__(self, rnn: nn.RNNBase, num_classes: int):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        rows = images.permute(0, 2, 1, 3).reshape(n, h, c * w)
        out, _ = run_recurrent(self.rnn, rows, None)
        return self.head(out[:, -1])


def build_lstm_lm(cfg, spec) -> LanguageModel:
    embed = cfg.embed or cfg.width
    return LanguageModel(spec.vocab_size, embed, _recurrent_layer(cfg, embed), cfg.dropout, cfg.tie_weights)


def build_lstm_classifier(cfg, spec) -> RowSequenceClassifier:
    return RowSequenceClassifier(_recurrent_layer(cfg, spec.in_channels * spec.image_size), spec.num_classes)
