"""The speech family's options (mptrain/families.py): `model=deepspeech2` and `dataset=speech_en | speech_zh`.
Torch-free: read with the schema, before anything heavy is imported."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mptrain.schema.dataset import DatasetConfig
from mptrain.schema.model import ModelConfig
from mptrain.schema.rules import OPEN_UNIT, POSITIVE_INT, SEED, Rule, is_number, knob, one_of


@dataclass
class DeepSpeech2Config(ModelConfig):
    """A DeepSpeech-2-style recogniser (mptrain/models/speech.py): convolutions, bidirectional GRUs, CTC."""

    family: str = knob("rnn", "how reports group it")
    task: str = knob("speech", "the Task that trains it", one_of("speech"))
    augment: bool = knob(False, "ignored: utterances are not augmented")
    channels: int = knob(16, "channels of the two convolutions", POSITIVE_INT)
    width: int = knob(128, "hidden units of each GRU direction (the two are summed)", POSITIVE_INT)
    layers: int = knob(3, "bidirectional GRU layers", POSITIVE_INT)


@dataclass
class SpeechDataConfig(DatasetConfig):
    """Catalog sentences spoken by espeak-ng, as log-mel features (mptrain/data/speech.py says how)."""

    batch_size: int = knob(16, "utterances per optimizer step and rank", POSITIVE_INT)
    eval_batch_size: int = knob(32, "utterances per evaluation batch", POSITIVE_INT)
    train_size: int = knob(3000, "training utterances (distinct sentences)", POSITIVE_INT)
    test_size: int = knob(300, "held-out utterances (sentences the training split never has)", POSITIVE_INT)
    min_units: int = knob(4, "shortest sentence: characters (zh) or words (en)", POSITIVE_INT)
    max_units: int = knob(12, "longest sentence: characters (zh) or words (en)", POSITIVE_INT)
    test_share: float = knob(0.1, "the share of sentences the hash puts in the held-out split", OPEN_UNIT)
    snr_db: float = knob(20.0, "white noise this many dB below each utterance's power",
                         Rule(lambda v: is_number(v) and math.isfinite(v), "a finite number"))
    sortagrad: bool = knob(True, "the first epoch in length order, short first (DeepSpeech 2's SortaGrad)")
    targets: str = knob("characters", "what is written: characters (Han characters for zh, letters for en) | pinyin "
                                      "(zh: tonal pinyin syllables, e.g. da3 kai1)", one_of("characters", "pinyin"))
    cache_dir: str = knob("${oc.env:MPTRAIN_CACHE,'~/.cache/mptrain'}/speech", "where the features are cached")
    seed: int = knob(0, "the data's own seed: sentences chosen, voices, rates, pitches, noise", SEED)
