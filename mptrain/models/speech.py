"""model=deepspeech2: a DeepSpeech-2-style recogniser (Amodei et al., 2016), the paper's speech model in small.

Two 2-D convolutions over (mel band, time) with BatchNorm and DeepSpeech 2's clipped ReLU (min(max(x, 0), 20)),
the first striding time by 2; bidirectional GRUs whose two directions are summed, each preceded by sequence-wise
BatchNorm (statistics over the batch and the valid time steps, the paper's choice for recurrent layers); a Linear
head to the characters and CTC's blank. The recurrences are whole-sequence `nn.GRU` calls (run_recurrent: the
fused emulated recurrence on a CPU) on a padded batch, without PackedSequence: the backward direction is a second
GRU run over each utterance reversed within its own length, so both directions start at the utterance's own
first step and the padding only ever follows it (an utterance reads the same alone or padded; tested), and each
layer's output is zeroed past every utterance's length.
"""

from __future__ import annotations

import torch
from torch import nn

from mptrain.models.rnn import run_recurrent

TIME_STRIDE = 2  # the front end's stride in time: one output step per 20 ms of 10 ms frames


def reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, C) with each row's first lengths[b] steps in reverse order and its padding left where it is."""
    steps = torch.arange(x.shape[1], device=x.device)[None, :].expand(x.shape[0], -1)
    source = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    return x.gather(1, source[..., None].expand_as(x))


class SequenceBatchNorm(nn.Module):
    """BatchNorm over the batch and the valid time steps of (B, T, C), padding left out of the statistics."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape)
        out[mask] = self.norm(x[mask]).to(x.dtype)
        return out


class DeepSpeech2(nn.Module):
    def __init__(self, n_mels: int, vocab_size: int, channels: int = 16, width: int = 128, layers: int = 3):
        super().__init__()
        clip = nn.Hardtanh(0.0, 20.0)
        self.front = nn.Sequential(
            nn.Conv2d(1, channels, (11, 11), stride=(2, TIME_STRIDE), padding=(5, 5), bias=False),
            nn.BatchNorm2d(channels), clip,
            nn.Conv2d(channels, channels, (11, 11), stride=(2, 1), padding=(5, 5), bias=False),
            nn.BatchNorm2d(channels), clip,
        )  # fmt: skip
        features = channels * (((n_mels + 1) // 2 + 1) // 2)  # mel bands after two stride-2 convolutions
        self.norms = nn.ModuleList(SequenceBatchNorm(features if i == 0 else width) for i in range(layers))
        self.forward_rnns = nn.ModuleList(nn.GRU(features if i == 0 else width, width, batch_first=True)
                                          for i in range(layers))
        self.backward_rnns = nn.ModuleList(nn.GRU(features if i == 0 else width, width, batch_first=True)
                                           for i in range(layers))
        self.head = nn.Linear(width, vocab_size)
        self.width, self.time_stride = width, TIME_STRIDE

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """Time steps of the output for utterances of `frames` feature frames (ceil(frames / stride))."""
        return torch.div(frames + self.time_stride - 1, self.time_stride, rounding_mode="floor")

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, mels, T) features and their valid frame counts → (B, T', vocab) logits and T' per utterance."""
        x = features
        for i, layer in enumerate(self.front):
            x = layer(x)
            if i % 3 == 2:  # after each block: padding back to zero, so the next convolution reads what alone it would
                valid = torch.arange(x.shape[-1], device=x.device)[None, :] < self.output_lengths(frames)[:, None]
                x = x * valid[:, None, None, :].to(x.dtype)
        x = x.flatten(1, 2).transpose(1, 2)  # (B, C, mels', T') -> (B, T', C * mels')
        lengths = self.output_lengths(frames).clamp(max=x.shape[1])
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        for norm, ahead, back in zip(self.norms, self.forward_rnns, self.backward_rnns):
            x = norm(x, mask)
            forward, _ = run_recurrent(ahead, x, None)
            backward, _ = run_recurrent(back, reverse_within(x, lengths), None)
            x = (forward + reverse_within(backward, lengths)) * mask[..., None].to(forward.dtype)  # directions summed
        return self.head(x), lengths


def build_deepspeech2(cfg, spec) -> nn.Module:
    return DeepSpeech2(spec.n_mels, spec.vocab_size, cfg.channels, cfg.width, cfg.layers)
