"""model=gnmt: a GNMT-style translator (Wu et al., 2016), the paper's sec. 4.4 model in small.

Encoder: a bidirectional LSTM layer (its two directions concatenated), then unidirectional layers, residual from
the third. Decoder: the bottom LSTM layer's outputs query a multiplicative attention over the encoder's outputs
(Luong's "general" score q . W k, scaled by 1/sqrt(width)); the context enters every layer above the bottom one
(GNMT's wiring), residual from the third; the top layer's output is projected to the vocabulary (tied to the
embedding by default). Teacher forcing runs every layer as one whole-sequence `nn.LSTM` call (run_recurrent: the
fused emulated recurrence on a CPU), and the attention is torch's scaled_dot_product_attention, which the emulated
kernels' layers path computes itself (precision/attention.py): no product falls back to op-by-op emulation. The
attention needs no mask: a batch's sources all have one length (data/translation_set.py).

Decoding runs the same layers a step at a time with their states carried: greedy, and beam search with the
log-probabilities summed in FP32 and GNMT's length normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mptrain.data.translation_set import BOS, EOS, PAD
from mptrain.models.rnn import run_recurrent


class GNMT(nn.Module):
    def __init__(self, vocab_size: int, width: int = 256, encoder_layers: int = 2, decoder_layers: int = 2,
                 dropout: float = 0.2, tie_embeddings: bool = True):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, width, padding_idx=PAD)
        self.encoder_first = nn.LSTM(width, width, batch_first=True, bidirectional=True)
        self.encoder = nn.ModuleList(nn.LSTM(2 * width if i == 0 else width, width, batch_first=True)
                                     for i in range(encoder_layers - 1))
        self.attention_key = nn.Linear(width, width, bias=False)
        self.decoder = nn.ModuleList(nn.LSTM(width if i == 0 else 2 * width, width, batch_first=True)
                                     for i in range(decoder_layers))
        self.out = nn.Linear(width, vocab_size)
        if tie_embeddings:
            self.out.weight = self.embedding.weight
        self.drop = nn.Dropout(dropout)
        self.width = width

    def encode(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) ids → the encoder's outputs (B, S, W) and their attention keys."""
        x, _ = run_recurrent(self.encoder_first, self.drop(self.embedding(source)), None)
        for i, lstm in enumerate(self.encoder):
            out, _ = run_recurrent(lstm, self.drop(x), None)
            x = out + x if i >= 1 else out  # residual from the third layer
        return x, self.attention_key(x)

    def decode(self, target_in: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor, states=None):
        """(B, T) ids → (B, T, vocab) logits and each layer's final state (T = 1: one decoding step)."""
        states = states or [None] * len(self.decoder)
        new_states = []
        x, state = run_recurrent(self.decoder[0], self.drop(self.embedding(target_in)), states[0])
        new_states.append(state)
        context = F.scaled_dot_product_attention(x.unsqueeze(1), keys.unsqueeze(1), memory.unsqueeze(1),
                                                 scale=1 / math.sqrt(self.width)).squeeze(1)
        for i, (lstm, s) in enumerate(zip(self.decoder[1:], states[1:])):
            out, state = run_recurrent(lstm, self.drop(torch.cat([x, context.to(x.dtype)], dim=-1)), s)
            new_states.append(state)
            x = out + x if i >= 1 else out
        # (B*T, W) rows into the projection: one matrix product, where a 3-D input makes the emulated Linear's
        # weight gradient a batched product (4x its time here)
        return self.out(self.drop(x).flatten(0, 1)).unflatten(0, x.shape[:2]), new_states

    def forward(self, source: torch.Tensor, target_in: torch.Tensor) -> torch.Tensor:
        memory, keys = self.encode(source)
        return self.decode(target_in, memory, keys)[0]


def _reorder(states, order: torch.Tensor):
    return [tuple(s.index_select(1, order) for s in state) for state in states]


@torch.no_grad()
def greedy(model: GNMT, source: torch.Tensor, max_length: int) -> list[list[int]]:
    """The most likely token at each step, until EOS (or max_length)."""
    memory, keys = model.encode(source)
    token = torch.full((source.shape[0], 1), BOS, device=source.device)
    states, out = None, []
    done = torch.zeros(source.shape[0], dtype=torch.bool, device=source.device)
    for _ in range(max_length):
        logits, states = model.decode(token, memory, keys, states)
        token = F.log_softmax(logits[:, -1].float(), dim=-1).argmax(dim=-1, keepdim=True)
        out.append(token.squeeze(1))
        done |= token.squeeze(1) == EOS
        if bool(done.all()):
            break
    return _until_eos(torch.stack(out, dim=1))


@torch.no_grad()
def beam_search(model: GNMT, source: torch.Tensor, width: int, max_length: int, alpha: float) -> list[list[int]]:
    """Beam search over `width` hypotheses per sentence; log-probabilities summed in FP32; a finished hypothesis
    keeps its score (it can only extend by EOS at no cost); the best by GNMT's length-normalised score."""
    batch, device = source.shape[0], source.device
    memory, keys = model.encode(source)
    memory, keys = memory.repeat_interleave(width, 0), keys.repeat_interleave(width, 0)
    scores = torch.full((batch, width), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live hypothesis to start from
    token = torch.full((batch * width, 1), BOS, device=device)
    finished = torch.zeros(batch * width, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * width, device=device)
    history = torch.empty(batch * width, 0, dtype=torch.long, device=device)
    states = None
    for _ in range(max_length):
        logits, states = model.decode(token, memory, keys, states)
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)
        logp[finished] = float("-inf")
        logp[finished, EOS] = 0.0
        vocab = logp.shape[-1]
        top, index = (scores.reshape(-1, 1) + logp).view(batch, width * vocab).topk(width, dim=-1)
        beam, token = index // vocab, index % vocab
        order = (beam + torch.arange(batch, device=device)[:, None] * width).flatten()
        states = _reorder(states, order)
        lengths = lengths[order] + (~finished[order]).float()
        finished = finished[order] | (token.flatten() == EOS)
        history = torch.cat([history[order], token.reshape(-1, 1)], dim=1)
        scores, token = top, token.reshape(-1, 1)
        if bool(finished.all()):
            break
    penalty = ((5.0 + lengths) / 6.0) ** alpha
    best = (scores.flatten() / penalty).view(batch, width).argmax(dim=-1)
    return _until_eos(history.view(batch, width, -1)[torch.arange(batch, device=device), best])


def _until_eos(tokens: torch.Tensor) -> list[list[int]]:
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(EOS)] if EOS in row else row)
    return out


def build_gnmt(cfg, spec) -> nn.Module:
    return GNMT(spec.vocab_size, cfg.width, cfg.encoder_layers, cfg.decoder_layers, cfg.dropout, cfg.tie_embeddings)
