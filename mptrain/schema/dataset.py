"""The `dataset` group's schemas: image sets (real and synthetic) and text streams (real and synthetic)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional

from omegaconf import MISSING

from mptrain.families import TASKS
from mptrain.schema.rules import (
    NON_NEGATIVE,
    OPEN_UNIT,
    POSITIVE_INT,
    SEED,
    Rule,
    check_fields,
    is_int,
    is_number,
    keyword_mapping,
    knob,
    list_of,
    one_of,
)

DEFAULT_ROOT = "~/.cache/mptrain/data"
JARGON = "/usr/share/doc/jargon-text/jargon.txt.gz"
IMAGE_SETS = ("fashion_mnist", "mnist", "cifar10", "synthetic", "image_folder", "custom", "fashion_mnist_detection")
TEXT_SETS = ("text", "synthetic_text")
# the sets a family brings with its own schema (mptrain/families.py), by data kind
FAMILY_SETS = {t.data_kind: o.names for t in TASKS.values() for o in t.options if o.group == "dataset"}
SPLIT = list_of(Rule(lambda v: is_number(v) and v > 0, "> 0"), length=3, extra=lambda v: math.isclose(sum(v), 1.0),
                text="three positive fractions summing to 1")


@dataclass
class DatasetConfig:
    name: str = knob(MISSING, "images: fashion_mnist | mnist | cifar10 | synthetic | image_folder | custom; boxes: "
                              "fashion_mnist_detection; text: text | synthetic_text"
                              + "".join(f"; {kind}: {' | '.join(names)}" for kind, names in FAMILY_SETS.items()),
                     one_of(*IMAGE_SETS, *TEXT_SETS, *(n for names in FAMILY_SETS.values() for n in names)),
                     example="fashion_mnist")
    batch_size: int = knob(128, "samples (images, or text streams) per optimizer step and rank", POSITIVE_INT)
    eval_batch_size: int = knob(512, "samples per evaluation batch", POSITIVE_INT)


@dataclass
class ImageDataConfig(DatasetConfig):
    root: str = knob(DEFAULT_ROOT, "where the dataset's files are looked for (and downloaded to)")
    download: bool = knob(True, "let torchvision download what is missing")
    augment: bool = knob(True, "random crop (and horizontal flip where it suits the images)")


@dataclass
class SyntheticImageConfig(ImageDataConfig):
    augment: bool = knob(False, "ignored: synthetic images are not augmented")
    num_classes: int = knob(10, "classes (one smooth random template each)", POSITIVE_INT)
    channels: int = knob(3, "image channels", POSITIVE_INT)
    image_size: int = knob(32, "height = width in pixels", POSITIVE_INT)
    train_size: int = knob(2048, "training images", POSITIVE_INT)
    test_size: int = knob(512, "held-out images", POSITIVE_INT)
    noise: float = knob(1.0, "gaussian noise over the templates (larger: harder)", NON_NEGATIVE)
    seed: int = knob(0, "the data's own seed (the same images whichever run seed trains)", SEED)


FOLDER = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a folder")


@dataclass
class ImageFolderConfig(ImageDataConfig):
    """Your own images: one sub-folder per class (mptrain/data/image_folder.py says the split rule)."""

    path: str = knob(MISSING, "a folder with one sub-folder of images per class (or train/ and val/ inside it)",
                     FOLDER, example="data/flowers")
    image_size: int = knob(32, "images resized (shorter side) and centre-cropped to this square", POSITIVE_INT)
    channels: int = knob(3, "3 (RGB) or 1 (grayscale)", one_of(1, 3))
    valid_fraction: float = knob(0.1, "without train/ and val/: each class's share held out", OPEN_UNIT)
    seed: int = knob(0, "the split's own seed (the same split whichever run seed trains)", SEED)


DATASET_TARGET = keyword_mapping("a mapping: _target_ (a Dataset class or factory) and its keyword arguments")


@dataclass
class CustomDataConfig(ImageDataConfig):
    """A torch Dataset of your own giving (image, label) (mptrain/data/custom.py says the rules)."""

    augment: bool = knob(False, "random crop and horizontal flip (off: your Dataset's own transforms rule)")
    train: Any = knob(None, "the training Dataset: _target_ and its arguments", DATASET_TARGET)
    test: Any = knob(None, "the held-out Dataset (null: hold out valid_fraction of train)", DATASET_TARGET)
    valid_fraction: float = knob(0.1, "without dataset.test: each class's share of train held out", OPEN_UNIT)
    seed: int = knob(0, "the split's own seed", SEED)
    num_classes: Optional[int] = knob(None, "null: the Dataset's classes attribute, else the largest label + 1",
                                      POSITIVE_INT, example=10)


@dataclass
class DetectionCanvasConfig(ImageDataConfig):
    """Canvases of real Fashion-MNIST items with their boxes (mptrain/data/detection.py says how they are drawn)."""

    augment: bool = knob(False, "ignored: canvases are not augmented (their boxes would have to move too)")
    batch_size: int = knob(32, "canvases per optimizer step and rank", POSITIVE_INT)
    eval_batch_size: int = knob(128, "canvases per evaluation batch", POSITIVE_INT)
    canvas: int = knob(96, "canvas height = width in pixels", POSITIVE_INT)
    min_objects: int = knob(1, "fewest items on a canvas", POSITIVE_INT)
    max_objects: int = knob(4, "most items on a canvas (each gets a cell of a ceil(sqrt(n)) grid)", POSITIVE_INT)
    min_size: int = knob(16, "smallest item side in pixels (resized from 28)", POSITIVE_INT)
    max_size: int = knob(44, "largest item side in pixels (at most the grid cell)", POSITIVE_INT)
    train_size: int = knob(16000, "training canvases (drawn from the training items)", POSITIVE_INT)
    test_size: int = knob(2000, "held-out canvases (drawn from the test items)", POSITIVE_INT)
    seed: int = knob(0, "the canvases' own seed (the same canvases whichever run seed trains)", SEED)


@dataclass
class TextStreamConfig(DatasetConfig):  # what every text source shares: tokens, splits, streams
    level: str = knob("char", "char (reports bits per character) | word", one_of("char", "word"))
    lowercase: bool = knob(False, "lower-case the text before tokenizing")
    split: List[float] = knob([0.9, 0.05, 0.05], "train, valid, test fractions (cut at line ends)", SPLIT)
    eval_split: str = knob("test", "the held-out split the trainer evaluates", one_of("valid", "test"))
    min_freq: int = knob(1, "tokens seen fewer times in train become <unk>", POSITIVE_INT)
    max_vocab: Optional[int] = knob(None, "keep at most this many tokens (the most frequent)", POSITIVE_INT,
                                    example=10000)
    batch_size: int = knob(32, "parallel streams", POSITIVE_INT)
    eval_batch_size: int = knob(32, "parallel streams when evaluating", POSITIVE_INT)
    bptt: int = knob(64, "tokens per truncated-BPTT chunk", POSITIVE_INT)


@dataclass
class TextDataConfig(TextStreamConfig):
    path: str = knob(JARGON, "a UTF-8 text file, plain or .gz (the Jargon File by default)")


@dataclass
class SyntheticTextConfig(TextStreamConfig):
    split: List[float] = knob([0.8, 0.1, 0.1], "train, valid, test fractions (cut at line ends)", SPLIT)
    batch_size: int = knob(16, "parallel streams", POSITIVE_INT)
    eval_batch_size: int = knob(16, "parallel streams when evaluating", POSITIVE_INT)
    bptt: int = knob(32, "tokens per truncated-BPTT chunk", POSITIVE_INT)
    vocab_size: int = knob(16, "letters of the Markov source (at most 26)",
                           Rule(lambda v: is_int(v) and 1 <= v <= 26, "an integer in [1, 26]"))
    branching: int = knob(3, "successors each letter may have", POSITIVE_INT)
    size: int = knob(20000, "characters generated", POSITIVE_INT)
    seed: int = knob(0, "the source's own seed", SEED)


SCHEMAS = {"image_schema": ImageDataConfig, "synthetic_image_schema": SyntheticImageConfig,
           "image_folder_schema": ImageFolderConfig, "custom_data_schema": CustomDataConfig,
           "text_schema": TextDataConfig, "synthetic_text_schema": SyntheticTextConfig,
           "detection_schema": DetectionCanvasConfig}  # + the families' (schema/__init__.py adds them)
BY_NAME = {"fashion_mnist": ImageDataConfig, "mnist": ImageDataConfig, "cifar10": ImageDataConfig,
           "synthetic": SyntheticImageConfig, "image_folder": ImageFolderConfig, "custom": CustomDataConfig,
           "text": TextDataConfig, "synthetic_text": SyntheticTextConfig,
           "fashion_mnist_detection": DetectionCanvasConfig}


def check(cfg) -> None:
    check_fields(cfg.dataset, DatasetConfig, "dataset")  # the name first: it picks the schema
    check_fields(cfg.dataset, BY_NAME[cfg.dataset.name], "dataset")
