"""The task families, declared once: what each trains on, what it is judged by, how the benchmark feeds it.

A model option (conf/model/*.yaml) names its task (`model.task`); everything that depends on the task reads its
record here: the data kind a model of it reads and the dataset options that give it, the primary metric with its
direction, the unit the tables print it in and the unit of its equivalence margin, the synthetic data
`mptrain-bench` trains it on, the builder that makes its Task, and the model and dataset options it brings with
their schemas and builders (import paths, loaded when needed, so this module stays torch-free: the schema reads it
before torch is imported). A new family adds its own files and one record below: its options are registered in
Hydra's ConfigStore, checked, documented (docs/configuration.md) and built from the record alone.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """A held-out metric a run can be judged by."""

    name: str
    higher_is_better: bool
    scale: float = 1.0  # tables print value x scale (accuracy in points)
    unit: str = ""  # printed after the scaled value
    margin: float = 1.0  # the default equivalence margin: in the printed unit if absolute, else % of the control
    absolute: bool = False
    digits: int = 4  # decimals the tables print
    # the margin rule (docs/runs-and-reports.md), in the margin unit: the paper's largest FP32-vs-mixed difference
    # on this metric, else twice a published seed-to-seed standard deviation; None where neither exists
    rule: float | None = None
    rule_source: str = ""

    @property
    def margin_unit(self) -> str:
        """What a margin of this metric is given in (a plan's `margin`, `--margin`)."""
        return "points" if self.absolute else "% of the control's mean"

    def margin_value(self, given: float | None, control_mean: float) -> float:
        """δ in the metric's own units, from a margin given in its margin unit (None: the default)."""
        value = self.margin if given is None else given
        return value / self.scale if self.absolute else value / 100 * abs(control_mean)


METRICS = {m.name: m for m in (
    Metric("accuracy", higher_is_better=True, scale=100.0, unit=" pts", margin=0.5, absolute=True, digits=2,
           rule=0.28, rule_source="Table 1's largest FP32-vs-mixed difference (Inception v3, 73.85 -> 74.13)"),
    Metric("perplexity", higher_is_better=False, rule=1.3,
           rule_source="twice the seed-to-seed SD of Transformer-XL base's validation perplexity at its earliest "
                       "published stage (42.62 +- 0.273 at step 5,000, 16 seeds: 0.64 %; NVIDIA "
                       "DeepLearningExamples, PyTorch/LanguageModeling/Transformer-XL, training stability test)"),
    Metric("bpc", higher_is_better=False),  # bits per character: a char-level LM's second figure
    Metric("fid", higher_is_better=False),
    Metric("loss", higher_is_better=False),
    Metric("map_50", higher_is_better=True, rule=0.87,
           rule_source="Table 2's largest FP32-vs-mixed difference (Faster R-CNN, 69.1 -> 69.7 mAP: 0.87 %)"),
    # character / word error rates: fractions in summary.json, printed in points; a margin in points
    Metric("cer", higher_is_better=False, scale=100.0, unit=" pts", margin=1.0, absolute=True, digits=2,
           rule=0.81, rule_source="Table 3's largest FP32-vs-mixed difference (Mandarin, 15.82 -> 15.01 CER)"),
    Metric("wer", higher_is_better=False, scale=100.0, unit=" pts", margin=1.0, absolute=True, digits=2),
    # sacrebleu's corpus BLEU and chrF, in their own points (0-100)
    Metric("bleu", higher_is_better=True, unit=" BLEU", margin=1.0, absolute=True, digits=2, rule=0.65,
           rule_source="twice the seed-to-seed SD of GNMT v2's test BLEU after its first epoch (0.326 over 50 "
                       "seeds; NVIDIA DeepLearningExamples, PyTorch/Translation/GNMT, training stability test)"),
    Metric("chrf", higher_is_better=True, unit=" chrF", margin=1.0, absolute=True, digits=2),
)}  # fmt: skip


@dataclass(frozen=True)
class Option:
    """Options of a config group a family brings (conf/<group>/<name>.yaml): the schema they extend, registered
    as `schema_name` for their defaults lists, and what builds them. Both are "module:attribute" import paths; the
    schema's module is torch-free (it is imported with the schema, before torch)."""

    group: str  # "model" | "dataset"
    names: tuple[str, ...]
    schema_name: str
    schema: str
    builder: str  # model: (model cfg, data spec) -> nn.Module; dataset: (dataset cfg, device, seed) -> DataModule


@dataclass(frozen=True)
class TaskFamily:
    """One value of `model.task`: the Task that trains a model, and what it needs."""

    name: str
    builder: str  # "module:function" (model cfg, data, precision) -> Task; imported when a run builds it
    data_kind: str  # what its data spec says it is (DataSpec.kind / TextSpec.kind)
    datasets: tuple[str, ...]  # the dataset options that give that kind, for a mismatch's one line
    metric: str  # the primary metric, a key of METRICS
    bench_dataset: str  # the data mptrain-bench trains it on (synthetic where the family has it, else real)
    tiny: tuple[str, ...] = ()  # overrides for a run of a few seconds on a CPU (the suite's, a user's first try)
    custom: bool = False  # model=custom can be trained as it (models/custom.py knows the network's interface)
    options: tuple[Option, ...] = ()  # the model and dataset options the family brings (the older ones: in-tree)

    @property
    def primary(self) -> Metric:
        return METRICS[self.metric]

    def build(self, model_cfg, data, precision):
        return load(self.builder)(model_cfg, data, precision)


def load(path: str):
    """The attribute an import path "module:attribute" names."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


IMAGES = ("fashion_mnist", "mnist", "cifar10", "synthetic")  # the image options a mismatch's line names
TASKS = {t.name: t for t in (
    TaskFamily("classification", "mptrain.tasks.classification:build", "image", IMAGES, "accuracy", "synthetic",
               tiny=("debug=tiny", "model.depth=8"), custom=True),
    TaskFamily("language_model", "mptrain.tasks.language_model:build", "text", ("text", "synthetic_text"),
               "perplexity", "synthetic_text", tiny=("debug=tiny_lm",), custom=True),
    TaskFamily("gan", "mptrain.tasks.gan:build", "image", IMAGES, "fid", "synthetic",
               tiny=("model=dcgan", "dataset=synthetic", "dataset.image_size=16", "dataset.channels=1",
                     "dataset.train_size=64", "dataset.test_size=32", "dataset.batch_size=8", "model.width=4",
                     "model.fid.extractor_steps=5", "trainer.max_steps=4"),
               custom=True),
    TaskFamily("detection", "mptrain.tasks.detection:build", "boxes", ("fashion_mnist_detection",), "map_50",
               "fashion_mnist_detection", tiny=("debug=tiny_ssd",)),
    TaskFamily("speech", "mptrain.tasks.speech:build", "speech", ("speech_en", "speech_zh"), "cer", "speech_zh",
               tiny=("debug=tiny_speech",),
               options=(Option("model", ("deepspeech2",), "deepspeech2_schema", "mptrain.schema.speech:DeepSpeech2Config",
                               "mptrain.models.speech:build_deepspeech2"),
                        Option("dataset", ("speech_en", "speech_zh"), "speech_schema",
                               "mptrain.schema.speech:SpeechDataConfig", "mptrain.data.speech_set:build_speech_data"))),
    TaskFamily("translation", "mptrain.tasks.translation:build", "pairs", ("catalog_pairs",), "bleu",
               "catalog_pairs", tiny=("debug=tiny_gnmt",),
               options=(Option("model", ("gnmt",), "gnmt_schema", "mptrain.schema.translation:GNMTConfig",
                               "mptrain.models.gnmt:build_gnmt"),
                        Option("dataset", ("catalog_pairs",), "catalog_pairs_schema",
                               "mptrain.schema.translation:CatalogPairsConfig",
                               "mptrain.data.translation_set:build_translation_data"))),
)}  # fmt: skip


def options(group: str) -> list[Option]:
    """The options of `group` the families bring, in the records' order."""
    return [o for t in TASKS.values() for o in t.options if o.group == group]


def datasets_text(kind: str) -> str:
    """`dataset=fashion_mnist, mnist, cifar10 or synthetic`: the options that give data of this kind."""
    names = list(dict.fromkeys(d for t in TASKS.values() if t.data_kind == kind for d in t.datasets))
    return "dataset=" + (", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0])


def metric(name: str) -> Metric:
    """A metric's record; a metric no family declares (a run of an older mptrain) is judged as lower-is-better
    loss-like, in its own unit with a relative margin."""
    return METRICS.get(name) or Metric(name, higher_is_better=False)
