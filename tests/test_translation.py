"""The translation family: the catalogs' parallel corpus, placeholders, BLEU against sacrebleu, decoding."""

from __future__ import annotations

import math

import pytest
import torch

from mptrain.data import catalog_pairs as cp
from mptrain.errors import UserError

needs_catalogs = pytest.mark.skipif("fr" not in cp.languages_present(), reason="needs the French catalogs (make data)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One vocabulary cache for the module: each tiny vocabulary is trained once."""
    return tmp_path_factory.mktemp("translation-cache")


def _train(cache, *overrides):
    import mptrain

    return mptrain.train(["debug=tiny_gnmt", f"dataset.cache_dir={cache}", *overrides])


@pytest.mark.parametrize("source, target, masked_source, masked_target", [
    ("cannot open %s: %d files", "impossible d'ouvrir %s : %d fichiers", "cannot open ⟨0⟩: ⟨1⟩ files",
     "impossible d'ouvrir ⟨0⟩ : ⟨1⟩ fichiers"),
    ("%s offset %d out of range", "offset %2$d de %1$s hors limite", "⟨0⟩ offset ⟨1⟩ out of range",
     "offset ⟨1⟩ de ⟨0⟩ hors limite"),
    ("Hello {name}, %ld left", "Bonjour {name}, il reste %ld", "Hello ⟨0⟩, ⟨1⟩ left", "Bonjour ⟨0⟩, il reste ⟨1⟩"),
    ("no placeholder here", "pas de substitut ici", "no placeholder here", "pas de substitut ici"),
])  # fmt: skip
def test_placeholders_become_the_sources_numbered_tokens_and_survive_the_round_trip(source, target, masked_source,
                                                                                    masked_target):
    a, b, ph_a, ph_b = cp.protect(source, target)
    assert (a, b) == (masked_source, masked_target)
    assert cp.restore(a, ph_a) == source and cp.restore(b, ph_b) == target


@pytest.mark.parametrize("source, target", [
    ("%s and %d", "%s et %s"),        # another kind of placeholder
    ("%s and %d", "%s et"),           # one left out
    ("%s", "%2$s"),                   # a position the source has not
])  # fmt: skip
def test_pairs_whose_placeholders_do_not_correspond_are_refused(source, target):
    assert cp.protect(source, target) is None


def test_mnemonics_and_non_breaking_spaces_are_normalised():
    assert cp.normalise("_Open  the\xa0file") == "Open the file"
    assert cp.normalise("__gp does _not move") == "__gp does _not move"  # identifiers keep their underscores


@needs_catalogs
def test_extraction_is_deterministic_and_no_message_crosses_splits():
    cp.extract.cache_clear()
    first = cp.extract("en", "fr")
    cp.extract.cache_clear()
    again = cp.extract("en", "fr")
    assert first.checksum == again.checksum and first.pairs == again.pairs and len(first.pairs) > 20000
    sources = [p[0] for p in first.pairs]
    assert len(set(sources)) == len(sources)  # one translation per source message
    splits = {s: cp.split_of(s, 0.05, 0.05) for s in sources}
    assert {s: cp.split_of(s, 0.05, 0.05) for s in reversed(sources)} == splits  # a hash, not a position
    shares = {name: list(splits.values()).count(name) / len(splits) for name in ("train", "valid", "test")}
    assert 0.04 < shares["test"] < 0.06 and 0.04 < shares["valid"] < 0.06
    record = first.record("en", "fr")
    assert record["sha256"] == first.checksum and record["catalogs"] and record["packages"]


@needs_catalogs
@pytest.mark.parametrize("overrides, says", [
    (["dataset.target=xx"], "no 'xx' translation catalogs on this machine"),
    (["dataset.target=bogus"], "dataset.target must be a catalog language code"),
    (["dataset.target=en"], "both 'en'"),
    (["model.beam_width=0"], "model.beam_width"),
    (["dataset.min_words=19", "dataset.max_words=19", "dataset.max_tokens=8"], "pairs after filtering"),
])  # fmt: skip
def test_bad_input_is_refused_with_what_to_do(overrides, says, cache, tmp_path):
    with pytest.raises(UserError, match=says):
        _train(cache, *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert not (tmp_path / "run").exists()


@needs_catalogs
def test_a_language_without_catalogs_is_one_line_listing_those_present(cache, tmp_path):
    from cli_helpers import mptrain

    out = mptrain("debug=tiny_gnmt", "dataset.source=qq", f"dataset.cache_dir={cache}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "no 'qq' translation catalogs" in out.stderr and "fr" in out.stderr.split("languages present:")[1]


def test_bleu_and_chrf_from_summed_statistics_equal_sacrebleus_corpus_scores():
    import sacrebleu

    from mptrain.tasks.translation import corpus_statistics, metrics_for, score_from

    hypotheses = ["le chat est sur le tapis", "il fait beau aujourd'hui", "ouvrir le fichier", "erreur fatale"]
    references = ["le chat est assis sur le tapis", "il fait beau aujourd'hui", "ouvre le fichier", "erreur grave"]
    bleu, chrf = metrics_for("fr")
    halves = [corpus_statistics(bleu, hypotheses[a:b], references[a:b]) for a, b in ((0, 2), (2, 4))]
    assert score_from(bleu, halves[0] + halves[1]) == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    stats = corpus_statistics(chrf, hypotheses, references)
    assert score_from(chrf, stats) == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
    assert score_from(bleu, corpus_statistics(bleu, references, references)) == pytest.approx(100.0)


def test_beam_search_of_width_one_is_greedy_and_a_wider_beam_scores_no_worse():
    import torch.nn.functional as F

    from mptrain.models.gnmt import GNMT, beam_search, greedy

    torch.manual_seed(0)
    model = GNMT(vocab_size=40, width=16, dropout=0.0).eval()
    source = torch.randint(4, 40, (5, 7))
    assert beam_search(model, source, width=1, max_length=12, alpha=0.0) == greedy(model, source, 12)

    def log_p(sentence_ids, row):
        target = torch.tensor([[1, *sentence_ids]])
        with torch.no_grad():
            logits = model(source[row:row + 1], target)
        logp = F.log_softmax(logits.float(), dim=-1)[0]
        ended = [*sentence_ids, 2][: logp.shape[0]]
        return float(sum(logp[i, t] for i, t in enumerate(ended)))

    wide = beam_search(model, source, width=4, max_length=12, alpha=0.0)
    narrow = greedy(model, source, 12)
    for row in range(5):  # unnormalised (alpha 0) beams: the best of 4 is at least the greedy path's probability
        if len(wide[row]) < 12 and len(narrow[row]) < 12:
            assert log_p(wide[row], row) >= log_p(narrow[row], row) - 1e-4


@needs_catalogs
def test_one_fp16_step_is_finite_the_scaler_works_and_the_corpus_is_recorded(cache, tmp_path):
    summary = _train(cache, "precision=mixed", "trainer.max_steps=6", "trainer.log_every=1",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert summary["status"] == "completed" and summary["primary_metric"] == "bleu" and summary["higher_is_better"]
    assert math.isfinite(summary["final"]["loss"]) and summary["final"]["perplexity"] > 1
    assert 0 <= summary["final"]["bleu"] <= 100 and "chrf" in summary["final"]
    assert summary["parameters"]["total"] == summary["parameters"]["trainable"] > 0
    assert summary["skipped_steps"] < 6 and 0 < summary["final_loss_scale"] <= 65536
    corpus = summary["corpus"]
    assert corpus["pair"] == "en-fr" and len(corpus["sha256"]) == 64 and 350 < corpus["pairs_kept"]["train"] <= 400
    assert (tmp_path / "run" / "corpus.json").is_file()


@needs_catalogs
def test_every_mode_completes_a_few_steps(cache, tmp_path):
    """All of them, in one process (the corpus is read once): a step of each, and an evaluation."""
    from mptrain.schema import MODES

    for mode in MODES:  # heavy-ball momentum: bf16_kahan's torch-optimi SGD has no Nesterov
        summary = _train(cache, f"precision={mode}", "trainer.max_steps=1", "optim=sgd", "optim.nesterov=false",
                         "trainer.progress=false", f"hydra.run.dir={tmp_path / mode}")
        assert summary["status"] == "completed", (mode, summary.get("error"))
        assert summary["final"]["bleu"] is not None and math.isfinite(summary["final"]["loss"]), mode


@needs_catalogs
def test_a_corpus_that_differs_from_the_reference_images_says_so_in_one_line(cache, monkeypatch, tmp_path, caplog):
    from omegaconf import OmegaConf

    from mptrain.data.translation_set import build_translation_data
    from mptrain.schema import typed

    reference = tmp_path / "checksums.json"
    reference.write_text('{"en-fr": "0000"}')
    monkeypatch.setattr(cp, "REFERENCE_CHECKSUMS_FILE", reference)
    cfg = typed("dataset", OmegaConf.create({"name": "catalog_pairs", "train_size": 400, "test_size": 16,
                                             "max_words": 6, "vocab_size": 200, "cache_dir": str(cache)}))
    with caplog.at_level("WARNING"):
        data = build_translation_data(cfg, torch.device("cpu"), seed=0)
    assert data.spec.corpus["matches_reference"] is False
    assert [r for r in caplog.records if "differs from the reference image's" in r.getMessage()]


def test_the_parameter_count_counts_a_tied_matrix_once_and_frozen_ones_apart():
    from mptrain.models.gnmt import GNMT
    from mptrain.telemetry.run_results import parameter_count

    tied, untied = GNMT(vocab_size=40, width=16), GNMT(vocab_size=40, width=16, tie_embeddings=False)
    assert parameter_count([untied])["total"] - parameter_count([tied])["total"] == 40 * 16
    tied.embedding.weight.requires_grad_(False)
    counted = parameter_count([tied])
    assert counted["total"] - counted["trainable"] == 40 * 16
