"""The translation family's options (mptrain/families.py): `model=gnmt` and `dataset=catalog_pairs`.
Torch-free: read with the schema, before anything heavy is imported."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from mptrain.schema.dataset import DatasetConfig
from mptrain.schema.model import ModelConfig
from mptrain.schema.rules import HALF_OPEN_UNIT, NON_NEGATIVE, OPEN_UNIT, POSITIVE_INT, Rule, knob, one_of

LANGUAGE = Rule(lambda v: isinstance(v, str) and re.fullmatch(r"[a-z]{2,3}(_[A-Za-z]{2,4})?(@[A-Za-z]+)?", v) is not None,
                "a catalog language code (en, fr, de, es, zh_CN, sr@latin, ...)")


@dataclass
class GNMTConfig(ModelConfig):
    """A GNMT-style translator (mptrain/models/gnmt.py): LSTM encoder (bidirectional first layer) and decoder with
    multiplicative attention, greedy or beam-search decoding."""

    family: str = knob("rnn", "how reports group it")
    task: str = knob("translation", "the Task that trains it", one_of("translation"))
    augment: bool = knob(False, "ignored: sentences are not augmented")
    width: int = knob(512, "LSTM hidden units (each direction of the first encoder layer), and the embeddings",
                      POSITIVE_INT)
    encoder_layers: int = knob(2, "encoder LSTM layers: a bidirectional one, then unidirectional (residual from "
                                  "the third)", Rule(lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"))
    decoder_layers: int = knob(2, "decoder LSTM layers: the bottom one feeds the attention; the attention's context "
                                  "enters every layer above it (residual from the third)",
                               Rule(lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"))
    dropout: float = knob(0.2, "dropout on embeddings and between layers", HALF_OPEN_UNIT)
    label_smoothing: float = knob(0.1, "label smoothing of the training loss (held-out perplexity is without it)",
                                  HALF_OPEN_UNIT)
    beam_width: int = knob(4, "beam search's width when evaluating (1: greedy decoding)", POSITIVE_INT)
    length_penalty: float = knob(0.6, "GNMT's length-normalisation alpha: beams compared by log p / "
                                      "((5 + length) / 6)^alpha", NON_NEGATIVE)
    tie_embeddings: bool = knob(True, "one embedding matrix for source, target and output projection (the "
                                      "vocabulary is shared)")


@dataclass
class CatalogPairsConfig(DatasetConfig):
    """Message pairs of the machine's translation catalogs (mptrain/data/catalog_pairs.py says how)."""

    batch_size: int = knob(64, "sentence pairs per optimizer step and rank", POSITIVE_INT)
    eval_batch_size: int = knob(128, "sentence pairs per evaluation batch", POSITIVE_INT)
    source: str = knob("en", "the source language (en: the catalogs' msgids)", LANGUAGE)
    target: str = knob("fr", "the target language (any catalog language on this machine)", LANGUAGE)
    min_words: int = knob(3, "shortest source message kept, in words", POSITIVE_INT)
    max_words: int = knob(20, "longest source message kept, in words (the target: at most twice that)",
                          POSITIVE_INT)
    max_tokens: int = knob(48, "pairs with more subwords on either side are left out", POSITIVE_INT)
    vocab_size: int = knob(8000, "SentencePiece pieces, one vocabulary for both languages",
                           Rule(lambda v: isinstance(v, int) and v >= 32, "an integer >= 32"))
    valid_share: float = knob(0.05, "the share of source messages the hash puts in the validation split", OPEN_UNIT)
    test_share: float = knob(0.05, "the share of source messages the hash puts in the test split", OPEN_UNIT)
    eval_split: str = knob("test", "the held-out split the trainer evaluates: test | valid (tune on valid)",
                           one_of("test", "valid"))
    train_size: Optional[int] = knob(None, "training pairs used (null: all; the first N in the hash's order)",
                                     POSITIVE_INT, example=2000)
    test_size: Optional[int] = knob(None, "held-out pairs evaluated (null: the whole split)", POSITIVE_INT,
                                    example=200)
    cache_dir: str = knob("${oc.env:MPTRAIN_CACHE,'~/.cache/mptrain'}/translation",
                          "where the SentencePiece vocabulary is cached")
