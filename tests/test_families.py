"""The recurrent and GAN families: BPTT state, perplexity, per-network loss scalers, the Frechet distance."""

from __future__ import annotations

import gzip
import math

import pytest
import torch
from omegaconf import OmegaConf

from cli_helpers import train_inprocess
from mptrain.data import build_data
from mptrain.data import text as text_module
from mptrain.data.text import Vocabulary, split_at_lines
from mptrain.errors import UserError
from mptrain.families import TASKS
from mptrain.models.gan import build_dcgan
from mptrain.optim import build_optimizer
from mptrain.precision import Precision
from mptrain.tasks import build_task
from mptrain.telemetry import frechet
from mptrain.telemetry.frechet import frechet_distance, load_or_train_extractor

CPU = torch.device("cpu")


def _text_data(**extra):
    cfg = {"name": "synthetic_text", "batch_size": 4, "eval_batch_size": 4, "bptt": 8, "size": 4000, **extra}
    return build_data(OmegaConf.create(cfg), CPU, seed=0)


def _lm_task(compose_cfg, data, mode="fp32", *overrides):
    cfg = compose_cfg("model=lstm_lm", f"precision={mode}", "model.width=8", "model.layers=2", *overrides)
    precision = Precision(cfg.precision, CPU)
    task = build_task(cfg.model, data, precision)
    steppers = {n: precision.stepper(m, lambda p: build_optimizer(cfg.optim, p)) for n, m in task.networks().items()}
    return task, steppers, precision


# -- text data ----------------------------------------------------------------------------


def test_text_split_is_contiguous_at_line_ends_and_vocab_from_train_only():
    text = "".join(f"line {i}\n" for i in range(100)) + "zzz\n"
    train, valid, test = split_at_lines(text, [0.8, 0.1, 0.1])
    assert train + valid + test == text and all(p.endswith("\n") for p in (train, valid))
    vocab = Vocabulary.from_train(list(train), min_freq=1, max_size=None)
    assert "z" not in vocab.index and vocab.encode(["z"]).item() == vocab.unk  # unseen in train: <unk>
    assert Vocabulary.from_train(list(train), 1, None).tokens == vocab.tokens  # deterministic ids


def test_text_loader_continues_each_stream_from_batch_to_batch():
    data = _text_data()
    batches = list(data.test)
    first, second = batches[0], batches[1]
    assert torch.equal(first[0][:, 1:], first[1][:, :-1])  # y is x shifted by one
    assert torch.equal(second[0][:, 0], first[1][:, -1])  # the next chunk starts where the last ended
    assert data.spec.level == "char" and data.artifacts["vocab.json"]["tokens"][0] == "<unk>"


def test_text_file_plain_or_gz_and_clear_errors(tmp_path, monkeypatch):
    body = "the quick brown fox\n" * 400
    plain, packed = tmp_path / "a.txt", tmp_path / "a.txt.gz"
    plain.write_text(body)
    packed.write_bytes(gzip.compress(body.encode()))
    cfg = {"name": "text", "batch_size": 4, "eval_batch_size": 4, "bptt": 8, "level": "word"}
    specs = [build_data(OmegaConf.create({**cfg, "path": str(p)}), CPU, 0).spec for p in (plain, packed)]
    assert specs[0] == specs[1] and specs[0].vocab_size == 1 + 5  # <unk>, 4 words, <eos>
    missing_default = str(tmp_path / "jargon.txt.gz")  # the default corpus on a machine without it
    monkeypatch.setattr(text_module, "JARGON", missing_default)
    with pytest.raises(UserError, match="does not exist; fix: apt-get install jargon-text"):
        build_data(OmegaConf.create({**cfg, "path": missing_default}), CPU, 0)
    with pytest.raises(UserError, match="does not exist"):
        build_data(OmegaConf.create({**cfg, "path": str(tmp_path / "nope.txt")}), CPU, 0)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe" * 100)
    with pytest.raises(UserError, match="is not UTF-8 text"):
        build_data(OmegaConf.create({**cfg, "path": str(tmp_path / "bin.txt")}), CPU, 0)
    with pytest.raises(UserError, match="too few"):
        build_data(OmegaConf.create({**cfg, "path": str(plain), "bptt": 4000}), CPU, 0)


# -- language model ------------------------------------------------------------------------


def test_bptt_state_is_carried_and_detached_between_chunks(compose_cfg):
    data = _text_data()
    task, steppers, precision = _lm_task(compose_cfg, data)
    task.start_pass(training=True)
    batches = iter(data.train)
    task.train_step(next(batches), steppers, precision)
    carried = task.state
    assert all(s.grad_fn is None and not s.requires_grad for s in carried)  # detached: no graph into chunk 1
    assert all(s.abs().sum() > 0 for s in carried)  # but the values are carried
    seen = []
    task.model.rnn.register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
    task.train_step(next(batches), steppers, precision)  # backward must not reach the first chunk's graph
    assert all(s is c for s, c in zip(seen[0], carried))
    after = task.state
    task.evaluate(list(data.test)[:2], precision)  # an evaluation mid-epoch carries its own state
    assert task.state is after
    task.start_pass(training=True)
    assert task.state is None  # a new pass starts from zeros


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(compose_cfg):
    data = _text_data()
    task, _, precision = _lm_task(compose_cfg, data)
    with torch.no_grad():
        task.model.decoder.weight.zero_()  # tied: the embedding too; every logit is 0
        task.model.decoder.bias.zero_()
    task.model.eval()
    metrics = task.evaluate(data.test, precision)
    vocab = data.spec.vocab_size
    assert metrics["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert metrics["bpc"] == pytest.approx(math.log2(vocab), rel=1e-5)


@pytest.mark.parametrize("mode", ["amp", "bf16"])
def test_recurrent_layers_run_under_cpu_autocast(compose_cfg, mode):
    """oneDNN refuses low-precision LSTMs on this CPU; the model runs the recurrence itself."""
    data = _text_data()
    task, steppers, precision = _lm_task(compose_cfg, data, mode, "model.cell=gru")
    metrics = task.train_step(next(iter(data.train)), steppers, precision)
    assert torch.isfinite(metrics["loss"]) and task.state.dtype == precision.spec.autocast_dtype


# -- GAN ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 32, 64])
def test_dcgan_shapes(size):
    spec = OmegaConf.create({"in_channels": 3, "image_size": size})
    nets = build_dcgan(OmegaConf.create({"width": 4, "latent": 8}), spec)
    images = nets["g"](torch.randn(2, 8, 1, 1))
    assert images.shape == (2, 3, size, size) and nets["d"](images).shape == (2,)
    with pytest.raises(UserError, match="28, 32, 64"):
        build_dcgan(OmegaConf.create({"width": 4, "latent": 8}), OmegaConf.create({"in_channels": 1, "image_size": 30}))


def _gan(compose_cfg, tmp_path, mode="mixed"):
    cfg = compose_cfg("model=dcgan", f"precision={mode}", "dataset=synthetic", "dataset.image_size=16",
                      "dataset.channels=1", "dataset.train_size=64", "dataset.test_size=32", "dataset.batch_size=8",
                      "model.width=4", "model.latent=8", "precision.init_scale=1024", "model.fid.enabled=false")
    data = build_data(cfg.dataset, CPU, 0, augment=False)
    precision = Precision(cfg.precision, CPU)
    task = build_task(cfg.model, data, precision)
    steppers = {n: precision.stepper(m, lambda p: build_optimizer(cfg.optim, p)) for n, m in task.networks().items()}
    return task, steppers, precision, data


def test_gan_scalers_skip_independently(compose_cfg, tmp_path):
    task, steppers, precision, data = _gan(compose_cfg, tmp_path)
    batches = iter(data.train)
    task.train_step(next(batches), steppers, precision)
    poison = {"on": True}
    last_d = [p for p in task.d.parameters()][-1]
    last_d.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    before = {n: [p.detach().clone() for p in net.parameters()] for n, net in task.networks().items()}
    task.train_step(next(batches), steppers, precision)
    assert steppers["d"].skipped_steps == 1 and float(steppers["d"].current_scale) == 512.0  # halved, step skipped
    assert steppers["g"].skipped_steps == 0 and float(steppers["g"].current_scale) == 1024.0
    assert all(torch.equal(a, b) for a, b in zip(before["d"], task.d.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before["g"], task.g.parameters()))


def test_gan_step_reports_its_metrics(compose_cfg, tmp_path):
    task, steppers, precision, data = _gan(compose_cfg, tmp_path, mode="bf16")
    metrics = task.train_step(next(iter(data.train)), steppers, precision)
    assert set(metrics) == {"gan/loss_d", "gan/loss_g", "gan/d_real", "gan/d_fake"}
    assert 0 < float(metrics["gan/d_real"]) < 1 and all(torch.isfinite(v) for v in metrics.values())


# -- Frechet distance ---------------------------------------------------------------------


def test_frechet_distance_of_a_set_to_itself_is_zero_and_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 16, generator=g) @ torch.randn(16, 16, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-6
    noise = torch.randn(a.shape, generator=g)
    scores = [frechet_distance(a, a + s * noise) for s in (0.1, 0.5, 1.0, 2.0)]
    assert scores == sorted(scores) and scores[0] > 0


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    # N(0, I) vs N(m, s² I) in D dims: |m|² + D (1 + s² - 2 s)
    g = torch.Generator().manual_seed(1)
    d, s = 8, 1.5
    a = torch.randn(200_000, d, generator=g)
    b = 0.5 + s * torch.randn(200_000, d, generator=g)
    assert frechet_distance(a, b) == pytest.approx(d * 0.25 + d * (1 + s * s - 2 * s), rel=0.02)


def test_feature_extractor_is_trained_once_then_cached(tmp_path, monkeypatch):
    data = build_data(OmegaConf.create({"name": "synthetic", "image_size": 8, "channels": 1, "num_classes": 4,
                                        "train_size": 128, "test_size": 64, "batch_size": 32}), CPU, 0)
    net, info = load_or_train_extractor(data, str(tmp_path), steps=30, device=CPU)
    assert info["name"] == "mptrain-smallcnn-v1" and "inception" not in info["name"].lower()
    assert info["test_accuracy"] > 0.5  # 4 classes: a trained extractor, well above chance
    monkeypatch.setattr(frechet, "_train", lambda *a: pytest.fail("retrained despite the cache"))
    again, info2 = load_or_train_extractor(data, str(tmp_path), steps=30, device=CPU)
    assert info2["test_accuracy"] == info["test_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    cached = next(tmp_path.glob("synthetic-*.pt"))
    cached.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="delete it to retrain"):
        load_or_train_extractor(data, str(tmp_path), steps=30, device=CPU)


# -- every task family of mptrain/families.py, from its record alone: a new family is covered without a hand edit --
@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_family_trains_from_its_record_and_reports_its_own_metric(name, tmp_path, monkeypatch):
    from mptrain.report.make import build

    family = TASKS[name]
    monkeypatch.setenv("MPTRAIN_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    for mode in ("fp32", "mixed"):
        summary = train_inprocess(*family.tiny, f"precision={mode}", "trainer.max_steps=2", "trainer.eval_max_batches=1",
                                  "trainer.progress=false", f"hydra.run.dir={runs / mode}")
        assert summary["status"] == "completed", summary.get("error")
        assert summary["primary_metric"] == family.metric and summary["higher_is_better"] == family.primary.higher_is_better
        assert summary["final"][family.metric] is not None
    build([runs], tmp_path / "report", "md")
    text = (tmp_path / "report" / "report.md").read_text()
    arrow = "↑" if family.primary.higher_is_better else "↓"
    assert f"| {family.metric} {arrow} | mixed" in text


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_familys_record_is_whole(name):
    """Its builder imports, its metric has a margin a plan can register, its datasets are options, its bench data
    gives its data kind; a model option of the task exists."""
    import importlib

    from mptrain.families import METRICS
    from mptrain.paths import group_options
    from mptrain.schema.plan import METRICS as PLAN_METRICS

    family = TASKS[name]
    module, _, function = family.builder.partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert family.metric in METRICS and family.metric in PLAN_METRICS
    assert set(family.datasets) | {family.bench_dataset} <= set(group_options("dataset"))
