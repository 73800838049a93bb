"""A GPT-style decoder language model: token + learned position embeddings, pre-LayerNorm blocks of causal
self-attention (torch's scaled_dot_product_attention) and a GELU MLP, a final LayerNorm and a tied output head.

Each chunk of `dataset.bptt` tokens is attended within itself (no state is carried between chunks, unlike the
LSTM), so `model.context` must be at least `dataset.bptt`. Every sub-layer is a module of its own (attention
input and output projections, the MLP's two Linears and its GELU) so that the numerics probes see each output:
the forward-overflow sites of FP16 transformers (attention outputs, the FFN's second Linear).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mptrain.errors import UserError


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop_attn, self.drop_mlp = nn.Dropout(dropout), nn.Dropout(dropout)  # one module per site: probes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_attn(self.attn(self.ln1(x)))
        return x + self.drop_mlp(self.mlp(self.ln2(x)))


class TransformerLM(nn.Module):
    """(B, T) token ids → (B, T, vocab) logits; `state` is accepted and returned as None (nothing is carried)."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, context: int, dropout: float,
                 tie_weights: bool = True):
        super().__init__()
        self.context = context
        self.embedding = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, vocab_size, bias=False)
        self.apply(_init_gpt2)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    def initial_state(self, batch_size: int, device: torch.device) -> None:
        return None

    def forward(self, tokens: torch.Tensor, state=None) -> tuple[torch.Tensor, None]:
        t = tokens.shape[1]  # at most self.context: the task's builder checks dataset.bptt against it
        positions = torch.arange(t, device=tokens.device)
        x = self.drop(self.embedding(tokens) + self.position(positions))
        for block in self.blocks:
            x = block(x)
        return self.decoder(self.ln_f(x)), None


def _init_gpt2(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def build_transformer(cfg, spec) -> TransformerLM:
    if cfg.width % cfg.heads:
        raise UserError(f"model.width={cfg.width} must be a multiple of model.heads={cfg.heads}; "
                        f"e.g. model.heads={math.gcd(cfg.width, 4) or 1}")
    return TransformerLM(spec.vocab_size, cfg.width, cfg.layers, cfg.heads, cfg.context, cfg.dropout,
                         cfg.tie_weights)
