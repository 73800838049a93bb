"""dataset=speech_en | speech_zh: the spoken catalog sentences (speech.py) as padded, length-bucketed batches.

A batch is `(features, (frames, targets, target_lengths))`: features (B, 1, N_MELS, T) float32 normalised by the
training split's per-band mean and deviation, zero past each utterance's `frames`; targets (B, S) character ids
(0 is CTC's blank, padding is 0 past `target_lengths`). Batches hold utterances of similar length (sorted, then
cut), and their order is shuffled per epoch from (seed, epoch); DeepSpeech 2's SortaGrad (the first epoch in
length order) is `dataset.sortagrad`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mptrain.data.loaders import DataModule, IndexBatchLoader
from mptrain.data.seeds import stream_seed
from mptrain.data.speech import (
    FEATURES_VERSION,
    N_MELS,
    catalog_sentences,
    in_test_split,
    keep,
    speak_all,
    target_text,
)
from mptrain.errors import UserError

BLANK = "<blank>"


@dataclass(frozen=True)
class SpeechSpec:
    """What a recogniser needs to know about its input."""

    name: str
    n_mels: int
    vocab_size: int  # characters + CTC's blank (id 0)
    language: str
    characters: tuple[str, ...] = ()  # by id: the blank first
    words: bool = True  # the targets have words (syllables) between spaces: WER is reported
    kind = "speech"  # the data kind a task family reads (mptrain/families.py)


class SpeechLoader(IndexBatchLoader):
    def __init__(self, features: list[torch.Tensor], targets: list[torch.Tensor], batch_size: int, device, *,
                 shuffle: bool, seed: int = 0, sortagrad: bool = False, mean=None, std=None):
        self.features, self.targets = features, targets
        self.batch_size, self.shuffle, self.seed, self.sortagrad = batch_size, shuffle, seed, sortagrad
        self.device, self.mean, self.std = torch.device(device), mean, std
        self._batch()

    def _batch(self) -> None:
        """Utterances of similar length together: sorted by frames, then cut into batches."""
        by_length = sorted(range(len(self.features)), key=lambda i: (self.features[i].shape[0], i))
        size = self.batch_size
        self.batches = [by_length[i:i + size] for i in range(0, len(by_length), size)]
        if self.shuffle:  # a short last batch would be a step of another size: dropped, as the image loader does
            self.batches = [b for b in self.batches if len(b) == size]

    def keep_alignable(self, output_lengths) -> int:
        """Leave out the utterances CTC cannot align: fewer output steps (`output_lengths(frames)`) than their
        characters plus one blank between each repeated pair. Returns how many were left out."""
        frames = torch.tensor([f.shape[0] for f in self.features])
        steps = output_lengths(frames).tolist()
        needed = [len(t) + int((t[1:] == t[:-1]).sum()) for t in self.targets]
        kept = [i for i, (s, n) in enumerate(zip(steps, needed)) if s >= n]
        dropped = len(self.features) - len(kept)
        if dropped:
            self.features = [self.features[i] for i in kept]
            self.targets = [self.targets[i] for i in kept]
            self._batch()
        return dropped

    @property
    def num_samples(self) -> int:
        return len(self.features)

    def epoch_batches(self) -> list[list[int]]:
        order = list(range(len(self.batches)))
        if self.shuffle and not (self.sortagrad and self.epoch == 0):
            generator = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch))
            order = torch.randperm(len(order), generator=generator).tolist()
        return [self.batches[b] for b in order]

    def collate(self, index: list[int]):
        frames = torch.tensor([self.features[i].shape[0] for i in index])
        x = torch.zeros(len(index), int(frames.max()), N_MELS)
        for row, i in enumerate(index):
            x[row, : frames[row]] = (self.features[i].float() - self.mean) / self.std
        lengths = torch.tensor([len(self.targets[i]) for i in index])
        y = torch.zeros(len(index), int(lengths.max()), dtype=torch.long)
        for row, i in enumerate(index):
            y[row, : lengths[row]] = self.targets[i]
        features = x.transpose(1, 2).unsqueeze(1).to(self.device)  # (B, 1, mels, T)
        return features, (frames.to(self.device), y.to(self.device), lengths.to(self.device))


def build_speech_data(cfg, device, seed: int) -> DataModule:
    """Sentences → split by hash → the first train_size / test_size of each (in a seeded order) spoken, cached."""
    from mptrain.data.speech import cached

    language = cfg.name.removeprefix("speech_")
    if cfg.targets == "pinyin" and language != "zh":
        raise UserError(f"dataset.targets=pinyin is Mandarin's; dataset={cfg.name} writes characters (letters): drop "
                        "dataset.targets or use dataset=speech_zh")
    sentences, catalogs = catalog_sentences(language)
    kept = [s for s in sentences if keep(s, language, cfg.min_units, cfg.max_units)]
    splits = {"train": [s for s in kept if not in_test_split(s, cfg.test_share)],
              "test": [s for s in kept if in_test_split(s, cfg.test_share)]}
    wanted = {"train": cfg.train_size, "test": cfg.test_size}
    for split, chosen in splits.items():
        if len(chosen) < wanted[split]:
            raise UserError(f"dataset.{split}_size={wanted[split]} but the {language} catalogs give {len(chosen)} "
                            f"{split} sentences of {cfg.min_units}-{cfg.max_units} "
                            f"{'characters' if language == 'zh' else 'words'}; ask for fewer or widen "
                            "dataset.min_units / max_units")
        order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        splits[split] = [chosen[i] for i in order[: wanted[split]]]
    key = {"version": FEATURES_VERSION, "language": language, "snr_db": cfg.snr_db, "seed": cfg.seed,
           "sentences": dict(splits)}

    def make():
        return {split: [(u.features, u.text, u.voice) for u in speak_all(chosen, language, cfg.seed + n, cfg.snr_db)]
                for n, (split, chosen) in enumerate(splits.items())}

    spoken = cached(key, Path(os.path.expanduser(cfg.cache_dir)), make)
    spoken = {split: [(f, target_text(text, cfg.targets), v) for f, text, v in items]  # what is written
              for split, items in spoken.items()}
    characters = sorted({c for _, text, _ in spoken["train"] for c in text})
    index = {c: i + 1 for i, c in enumerate(characters)}  # 0 is CTC's blank
    unknown = sorted({c for _, text, _ in spoken["test"] for c in text} - set(index))
    test = [(f, t, v) for f, t, v in spoken["test"] if not set(t) & set(unknown)]  # a character never trained on
    stacked = torch.cat([f.float() for f, _, _ in spoken["train"]])
    mean, std = stacked.mean(dim=0), stacked.std(dim=0).clamp_min(1e-3)

    def loader(items, batch_size, shuffle):
        return SpeechLoader([f for f, _, _ in items], [torch.tensor([index[c] for c in t]) for _, t, _ in items],
                            batch_size, device, shuffle=shuffle, seed=seed, sortagrad=cfg.sortagrad, mean=mean,
                            std=std)

    spec = SpeechSpec(name=cfg.name, n_mels=N_MELS, vocab_size=len(characters) + 1, language=language,
                      characters=(BLANK, *characters), words=language != "zh" or cfg.targets == "pinyin")
    artifact = {"language": language, "targets": cfg.targets, "characters": [BLANK, *characters], "catalogs": catalogs,
                "utterances": {"train": len(spoken["train"]), "test": len(test)},
                "test_dropped_unknown_characters": len(spoken["test"]) - len(test)}
    return DataModule(spec=spec, train=loader(spoken["train"], cfg.batch_size, True),
                      test=loader(test, cfg.eval_batch_size, False), artifacts={"characters.json": artifact})
