"""Token streams for language modelling: a UTF-8 text file (or a synthetic source) on the device.

The text is split contiguously (train, valid, test; each cut at a line end) so no
held-out sentence leaks into training; the vocabulary comes from the train split
alone (unseen tokens map to ``<unk>``) and is saved in the run dir. Each split is
laid out as ``batch_size`` parallel streams; consecutive batches continue each
stream, which is what lets a language model carry its hidden state across
truncated-BPTT chunks.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mptrain.data.loaders import DataModule
from mptrain.data.seeds import stream_seed
from mptrain.errors import UserError
from mptrain.schema.dataset import JARGON  # Debian: jargon-text

UNK, EOS = "<unk>", "<eos>"
WORD_PATTERN = re.compile(r"\w+|[^\w\s]|\n")  # words, punctuation marks, line ends


@dataclass(frozen=True)
class TextSpec:
    """What a language model needs to know about its input."""

    name: str
    vocab_size: int
    level: str  # char | word: bits per character is reported for char level
    bptt: int = 4  # tokens per training chunk (dataset.bptt): a model's context must hold them
    kind = "text"  # the data kind a task family reads (mptrain/families.py)


class Vocabulary:
    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        self.unk = self.index.get(UNK)

    @classmethod
    def from_train(cls, train: list[str], min_freq: int, max_size: int | None) -> Vocabulary:
        counts = Counter(train)
        # most frequent first, ties by token: the same text always gives the same ids
        kept = [t for t, c in sorted(counts.items(), key=lambda tc: (-tc[1], tc[0])) if c >= min_freq]
        if max_size is not None:
            kept = kept[: max_size - 1]
        return cls([UNK, *kept])

    def encode(self, tokens: list[str]) -> torch.Tensor:
        return torch.tensor([self.index.get(t, self.unk) for t in tokens], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.tokens)


class StreamLoader:
    """(x, y) chunks of ``bptt`` tokens from ``batch_size`` parallel streams; y is x shifted by one."""

    def __init__(self, ids: torch.Tensor, batch_size: int, bptt: int, *, shuffle: bool, seed: int = 0):
        self.ids = ids
        self.batch_size, self.bptt, self.shuffle, self.seed = batch_size, bptt, shuffle, seed
        self.epoch = 0
        self.shard(0, 1)

    def shard(self, rank: int, world: int) -> None:
        """Data parallelism: lay the text out as `batch_size * world` streams and keep rank's `batch_size`
        of them (N ranks of batch B see exactly what one process of batch N*B sees)."""
        streams = self.batch_size * world
        columns = self.ids.numel() // streams
        if world > 1 and columns < 2 * (self.bptt if self.shuffle else 1) + 1:  # as build_text_data asks
            raise UserError(f"{self.ids.numel()} tokens are too few for {streams} streams ({world} ranks x "
                            f"{self.batch_size}) of bptt={self.bptt}; use a smaller dataset.batch_size or dataset.bptt")
        layout = self.ids[: columns * streams].view(streams, columns)
        self.streams = layout[rank * self.batch_size : (rank + 1) * self.batch_size]

    @property
    def num_samples(self) -> int:
        return self.streams.numel()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        usable = self.streams.shape[1] - 1  # the last token is only ever a target
        if self.shuffle:  # a random start offset in [0, bptt) per epoch; same count every epoch
            return (usable - (self.bptt - 1)) // self.bptt
        return -(-usable // self.bptt)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        offset = 0
        if self.shuffle:  # vary where chunks start so the same contexts are not cut the same way
            generator = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch))
            offset = int(torch.randint(self.bptt, (1,), generator=generator))
        usable = self.streams.shape[1] - 1
        for i in range(len(self)):
            start = offset + i * self.bptt
            end = min(start + self.bptt, usable)
            yield self.streams[:, start:end], self.streams[:, start + 1 : end + 1]


def read_text(path: str) -> str:
    file = Path(path).expanduser()
    fix = "point dataset.path at a UTF-8 text file (plain or .gz)"
    if path == JARGON:
        fix = "apt-get install jargon-text (Debian's Jargon File), or " + fix
    if not file.is_file():
        raise UserError(f"dataset.path={path} does not exist; fix: {fix}")
    try:
        raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
        return raw.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise UserError(f"dataset.path={path} cannot be read ({err}); fix: {fix}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"dataset.path={path} is not UTF-8 text ({err.reason} at byte {err.start}); fix: {fix}") from None


def tokenize(text: str, level: str, lowercase: bool) -> list[str]:
    if lowercase:
        text = text.lower()
    if level == "char":
        return list(text)
    return [EOS if t == "\n" else t for t in WORD_PATTERN.findall(text)]


def split_at_lines(text: str, fractions: list[float]) -> list[str]:
    """Contiguous train/valid/test parts of ``text``, each boundary moved to the next line end."""
    cuts, total, start = [], 0.0, 0
    for fraction in fractions[:-1]:
        total += fraction
        cut = text.find("\n", max(start, int(len(text) * total)))
        cut = len(text) if cut < 0 else cut + 1
        cuts.append((start, cut))
        start = cut
    cuts.append((start, len(text)))
    return [text[a:b] for a, b in cuts]


def synthetic_text(cfg) -> str:
    """A first-order Markov source over ``vocab_size`` letters, each followed by one of a few successors."""
    vocab, size, branching = cfg.vocab_size, cfg.size, cfg.branching
    generator = torch.Generator().manual_seed(cfg.seed)
    successors = torch.stack([torch.randperm(vocab, generator=generator)[:branching] for _ in range(vocab)])
    picks = torch.randint(branching, (size,), generator=generator)
    letters, state = [], 0
    for pick in picks.tolist():
        state = int(successors[state, pick])
        letters.append(chr(ord("a") + state))
    return "".join("".join(letters[i : i + 64]) + "\n" for i in range(0, size, 64))


def build_text_data(cfg, device: torch.device, seed: int):
    """The text DataModule: train and held-out stream loaders on ``device`` plus the vocab artifact."""
    name = cfg.name
    level, eval_split, bptt = cfg.level, cfg.eval_split, cfg.bptt
    batch_size, eval_batch_size = cfg.batch_size, cfg.eval_batch_size

    if name == "synthetic_text":
        text, source = synthetic_text(cfg), "synthetic"
    else:
        source = cfg.path
        text = read_text(source)
    parts = split_at_lines(text, list(cfg.split))
    tokens = [tokenize(part, level, cfg.lowercase) for part in parts]
    vocab = Vocabulary.from_train(tokens[0], cfg.min_freq, cfg.max_vocab)
    ids = [vocab.encode(t).to(device) for t in tokens]
    held_out = ids[1] if eval_split == "valid" else ids[2]
    for split_name, part, size in (("train", ids[0], batch_size), (eval_split, held_out, eval_batch_size)):
        if part.numel() // size < 2 * (bptt if split_name == "train" else 1) + 1:
            raise UserError(
                f"the {split_name} split of {source} has {part.numel()} tokens, too few for "
                f"{size} streams of bptt={bptt}; use a longer text or a smaller dataset.batch_size / dataset.bptt"
            )
    train = StreamLoader(ids[0], batch_size, bptt, shuffle=True, seed=seed)
    test = StreamLoader(held_out, eval_batch_size, bptt, shuffle=False)
    artifact = {
        "source": source,
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "level": level,
        "split_tokens": {k: int(t.numel()) for k, t in zip(("train", "valid", "test"), ids)},
        "unk_tokens": {k: int((t == vocab.unk).sum()) for k, t in zip(("train", "valid", "test"), ids)},
        "eval_split": eval_split,
        "tokens": vocab.tokens,
    }
    spec = TextSpec(name=name, vocab_size=len(vocab), level=level, bptt=bptt)
    return DataModule(spec=spec, train=train, test=test, artifacts={"vocab.json": artifact})
