"""dataset=catalog_pairs: the catalogs' message pairs (catalog_pairs.py) as subword batches for a translation model.

One SentencePiece vocabulary for both languages (unigram, trained once on the training split's two sides and
cached; the placeholder tokens ⟨0⟩..⟨9⟩ are symbols of their own, so a model copies them whole). A batch is
`(source, (target_in, target_out, index))`: source ids (B, S), all of one length (batches are cut from groups of
equal source length, so the encoder reads no padding and needs no mask); target_in starts with BOS, target_out
ends with EOS, both padded with 0 (PAD) past each sentence; `index` finds the pair's text for BLEU. The order of
batches, and of the pairs within each length group, is shuffled per epoch from (seed, epoch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mptrain.data import catalog_pairs as cp
from mptrain.data.loaders import DataModule, IndexBatchLoader
from mptrain.data.seeds import stream_seed, text_unit
from mptrain.errors import UserError

log = logging.getLogger(__name__)
VOCAB_VERSION = 1  # bump when extraction or the tokenizer's training changes: the cache key carries it
PAD, BOS, EOS, UNK = 0, 1, 2, 3
MIN_TRAIN_PAIRS = 200


@dataclass(frozen=True)
class TranslationSpec:
    """What a translation model and its task need to know about the data."""

    name: str
    vocab_size: int
    source: str
    target: str
    tokenizer: object = field(compare=False, repr=False)  # a sentencepiece.SentencePieceProcessor
    references: dict = field(compare=False, repr=False, default_factory=dict)  # split -> [(target text, src ph)]
    corpus: dict = field(compare=False, repr=False, default_factory=dict)  # summary.json's record of the corpus
    kind = "pairs"  # the data kind a task family reads (mptrain/families.py)

    def detokenize(self, ids: list[int], placeholders: list[str]) -> str:
        """Subword ids (no BOS/EOS/PAD) to text, each ⟨k⟩ back to the source's k-th placeholder."""
        return cp.restore(self.tokenizer.decode(ids), placeholders)


class PairLoader(IndexBatchLoader):
    def __init__(self, sources: list[list[int]], targets: list[list[int]], batch_size: int, device, *,
                 shuffle: bool, seed: int = 0):
        self.sources, self.targets = sources, targets
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.device = torch.device(device)
        self.groups: dict[int, list[int]] = {}
        for i, s in enumerate(sources):
            self.groups.setdefault(len(s), []).append(i)

    def epoch_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch))
        batches = []
        for length in sorted(self.groups):
            members = self.groups[length]
            if self.shuffle:
                members = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            cut = [members[i:i + self.batch_size] for i in range(0, len(members), self.batch_size)]
            # training: every step a full batch (the remainder of a length group waits for another epoch's draw)
            batches += [b for b in cut if len(b) == self.batch_size] if self.shuffle else cut
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    @property
    def num_samples(self) -> int:
        return len(self.sources)

    def collate(self, index: list[int]):
        source = torch.tensor([self.sources[i] for i in index])
        longest = max(len(self.targets[i]) for i in index) + 1
        target_in = torch.full((len(index), longest), PAD)
        target_out = torch.full((len(index), longest), PAD)
        for row, i in enumerate(index):
            t = self.targets[i]
            target_in[row, : len(t) + 1] = torch.tensor([BOS, *t])
            target_out[row, : len(t) + 1] = torch.tensor([*t, EOS])
        device = self.device
        return source.to(device), (target_in.to(device), target_out.to(device), torch.tensor(index).to(device))


def train_tokenizer(texts: list[str], vocab_size: int, path: Path):
    """A unigram SentencePiece model over `texts`, written to `path` (atomically); deterministic for its input."""
    import sentencepiece as spm

    path.parent.mkdir(parents=True, exist_ok=True)
    corpus = path.with_suffix(".txt.tmp")
    corpus.write_text("\n".join(texts) + "\n")
    prefix = str(path.with_suffix("")) + ".tmp"
    try:
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=prefix, vocab_size=vocab_size, model_type="unigram",
            character_coverage=1.0, pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK, num_threads=1,
            shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2,
            user_defined_symbols=[cp.TOKEN.format(i) for i in range(cp.MAX_PLACEHOLDERS)],
        )  # fmt: skip
    except RuntimeError as e:  # e.g. a vocabulary larger than the text allows
        raise UserError(f"dataset.vocab_size={vocab_size}: SentencePiece could not train on {len(texts)} "
                        f"sentences ({str(e).splitlines()[0]}); use a smaller dataset.vocab_size") from None
    finally:
        corpus.unlink(missing_ok=True)
    os.replace(prefix + ".model", path)
    Path(prefix + ".vocab").unlink(missing_ok=True)


def _enough(cfg, train: int, held_out: int) -> None:
    if train < MIN_TRAIN_PAIRS or train < cfg.batch_size or not held_out:
        raise UserError(f"the {cfg.source}-{cfg.target} corpus has {train} training and {held_out} {cfg.eval_split} "
                        f"pairs after filtering ({cfg.min_words}-{cfg.max_words} words, at most {cfg.max_tokens} "
                        f"subwords; at least {max(MIN_TRAIN_PAIRS, cfg.batch_size)} training pairs needed): widen "
                        "dataset.min_words / max_words / max_tokens or pick a language with more catalogs")


def build_translation_data(cfg, device, seed: int) -> DataModule:
    """Pairs → filtered by words → split by hash → tokenized (vocabulary cached) → loaders."""
    import sentencepiece as spm

    corpus = cp.extract(cfg.source, cfg.target)
    record = corpus.record(cfg.source, cfg.target)
    if record["matches_reference"] is False:
        log.warning("this machine's %s corpus differs from the reference image's (sha256 %s, not the reference's): "
                    "its catalogs or their versions differ (summary.json's corpus record lists them)",
                    record["pair"], corpus.checksum[:12])
    kept = sorted((p for p in corpus.pairs if cfg.min_words <= cp.words(p[0]) <= cfg.max_words
                   and cp.words(p[1]) <= 2 * cfg.max_words), key=lambda p: text_unit(p[0]))  # a size's first N
    splits = {"train": [], "valid": [], "test": []}
    for pair in kept:
        splits[cp.split_of(pair[0], cfg.valid_share, cfg.test_share)].append(pair)
    splits["train"] = splits["train"][: cfg.train_size]  # the vocabulary learns from the pairs trained on
    _enough(cfg, len(splits["train"]), len(splits[cfg.eval_split]))  # before a vocabulary is trained on too little
    key = json.dumps({"version": VOCAB_VERSION, "sha256": corpus.checksum, "min": cfg.min_words,
                      "max": cfg.max_words, "shares": [cfg.valid_share, cfg.test_share], "vocab": cfg.vocab_size,
                      "train_size": cfg.train_size})
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(os.path.expanduser(cfg.cache_dir)) / f"spm-{cfg.source}-{cfg.target}-{digest}.model"
    if not path.is_file():
        log.info("training a %d-piece SentencePiece vocabulary on %d %s-%s training pairs (cached: %s)",
                 cfg.vocab_size, len(splits["train"]), cfg.source, cfg.target, path)
        train_tokenizer([t for p in splits["train"] for t in p[:2]], cfg.vocab_size, path)
    tokenizer = spm.SentencePieceProcessor(model_file=str(path))

    def encoded(pairs, size=None):
        ids = [(tokenizer.encode(p[0]), tokenizer.encode(p[1]), p) for p in pairs]
        ids = [x for x in ids if 0 < len(x[0]) <= cfg.max_tokens and 0 < len(x[1]) <= cfg.max_tokens]
        return ids[:size]

    train = encoded(splits["train"])
    held_out = encoded(splits[cfg.eval_split], cfg.test_size)
    _enough(cfg, len(train), len(held_out))
    record.update({"pairs_kept": {"train": len(train), "valid": len(splits["valid"]), "test": len(splits["test"]),
                                  "evaluated": f"{cfg.eval_split}: {len(held_out)}"}, "vocabulary": path.name})
    spec = TranslationSpec(name=cfg.name, vocab_size=tokenizer.get_piece_size(), source=cfg.source,
                           target=cfg.target, tokenizer=tokenizer,
                           references={"test": [(cp.restore(p[1], p[3]), p[2]) for _, _, p in held_out]},
                           corpus=record)  # fmt: skip

    def loader(items, batch_size, shuffle):
        return PairLoader([a for a, _, _ in items], [b for _, b, _ in items], batch_size, device, shuffle=shuffle,
                          seed=seed)

    return DataModule(spec=spec, train=loader(train, cfg.batch_size, True),
                      test=loader(held_out, cfg.eval_batch_size, False), artifacts={"corpus.json": record})
