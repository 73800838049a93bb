"""Per-epoch random streams for shuffling and augmentation, derived from (run seed, epoch)."""

from __future__ import annotations

import hashlib


def stream_seed(seed: int, epoch: int) -> int:
    # Hash rather than add: (seed=1, epoch=0) and (seed=0, epoch=1) must not share a stream.
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
