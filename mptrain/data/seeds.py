"""Per-epoch random streams for shuffling and augmentation, derived from (run seed, epoch); and the place of a text
in [0, 1) that splits a corpus by content (the same on every machine, whatever the order it was read in)."""

from __future__ import annotations

import hashlib


def stream_seed(seed: int, epoch: int) -> int:
    # Hash rather than add: (seed=1, epoch=0) and (seed=0, epoch=1) must not share a stream.
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def text_unit(text: str) -> float:
    """A number in [0, 1) from a SHA-256 of the text: which split a sentence falls in, and its place in the split."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
