"""Speech offline (mptrain/data/speech.py): catalog sentences, espeak-ng's voices, log-mel features, the cache."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from mptrain.data import speech
from mptrain.errors import UserError

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (make test installs it)")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """One feature cache for the module's tiny runs: their 56 utterances are spoken once."""
    return tmp_path_factory.mktemp("speech-cache")


@pytest.mark.parametrize("language, text, spoken", [
    ("zh", "打开 %s 失败：{name}", "打开失败"),
    ("zh", "_File 文件(&F)", "文件"),
    ("en", "Could not open '%s': %d files", "could not open files"),
    ("en", "_Open the <b>file</b> don't", "open the file don't"),
])  # fmt: skip
def test_a_message_is_cleaned_to_what_is_spoken_and_predicted(language, text, spoken):
    assert speech.clean(text, language) == spoken


def test_mandarin_targets_are_its_characters_or_their_tonal_pinyin():
    assert speech.target_text("打开文件", "characters") == "打开文件"
    assert speech.target_text("打开绿色文件", "pinyin") == "da3 kai1 lv4 se4 wen2 jian4"


def test_pinyin_targets_for_english_are_one_line():
    import mptrain

    with pytest.raises(mptrain.UserError, match=r"^dataset.targets=pinyin is Mandarin's"):
        mptrain.train(["model=deepspeech2", "dataset=speech_en", "dataset.targets=pinyin", "trainer.max_steps=1"])


def test_the_split_is_a_hash_of_the_sentence():
    sentences = [f"sentence {i}" for i in range(2000)]
    test = [s for s in sentences if speech.in_test_split(s, 0.1)]
    assert abs(len(test) / len(sentences) - 0.1) < 0.03
    assert test == [s for s in sentences if speech.in_test_split(s, 0.1)]


def test_the_mel_filterbank_is_triangles_of_peak_one_covering_the_band():
    filters = speech.mel_filterbank()
    assert filters.shape == (speech.N_FFT // 2 + 1, speech.N_MELS)
    assert torch.all(filters >= 0) and torch.all(filters.max(dim=0).values > 0.5)
    peaks = filters.argmax(dim=0)
    assert torch.all(peaks[1:] >= peaks[:-1])  # centres rise with the band
    top = speech.F_MAX / (speech.SAMPLE_RATE / 2) * (speech.N_FFT // 2)
    assert filters[int(top) + 2:].sum() == 0  # nothing above f_max


def test_a_tone_lands_in_the_band_of_its_frequency():
    t = torch.arange(speech.SAMPLE_RATE) / speech.SAMPLE_RATE
    for hz in (300.0, 1000.0, 4000.0):
        features = speech.log_mel(torch.sin(2 * math.pi * hz * t))
        assert features.shape == (speech.SAMPLE_RATE // speech.HOP + 1, speech.N_MELS)
        band = int(features.mean(dim=0).argmax())
        centres = speech.mel_filterbank().argmax(dim=0).float() * speech.SAMPLE_RATE / speech.N_FFT
        assert abs(float(centres[band]) - hz) / hz < 0.15


def test_noise_is_at_the_stated_snr():
    g = torch.Generator().manual_seed(0)
    clean = torch.sin(torch.arange(50_000) / 7.0)
    noisy = speech.with_noise(clean, 20.0, g)
    snr = 10 * math.log10(float(clean.pow(2).mean() / (noisy - clean).pow(2).mean()))
    assert abs(snr - 20.0) < 0.2


def test_the_cache_reads_back_what_it_made_and_remakes_a_file_whose_checksum_fails(tmp_path):
    made = []

    def make():
        made.append(1)
        return {"x": torch.arange(4)}

    key = {"v": 1}
    assert torch.equal(speech.cached(key, tmp_path, make)["x"], torch.arange(4))
    assert torch.equal(speech.cached(key, tmp_path, make)["x"], torch.arange(4)) and len(made) == 1
    stored = next(tmp_path.glob("speech-*.pt"))
    stored.write_bytes(stored.read_bytes()[:-8] + b"corrupt!")
    speech.cached(key, tmp_path, make)
    assert len(made) == 2 and json.loads(next(tmp_path.glob("speech-*.json")).read_text())["key"] == key


@needs_espeak
@pytest.mark.parametrize("language", ["en", "zh"])
def test_spoken_sentences_are_deterministic_from_the_seed(language):
    sentences = ["could not open the file", "the file is empty"] if language == "en" else ["打开文件失败", "文件为空"]
    first = speech.speak_all(sentences, language, seed=3, snr_db=20.0)
    again = speech.speak_all(sentences, language, seed=3, snr_db=20.0)
    other = speech.speak_all(sentences, language, seed=4, snr_db=20.0)
    assert [u.voice for u in first] == [u.voice for u in again]
    assert all(torch.equal(a.features, b.features) for a, b in zip(first, again))
    assert any(a.voice != b.voice or not torch.equal(a.features, b.features) for a, b in zip(first, other))
    for u in first:  # about 10 ms a frame; a character or word takes several
        units = len(u.text) if language == "zh" else len(u.text.split())
        assert u.features.shape[1] == speech.N_MELS and u.features.shape[0] > 5 * units
        assert torch.isfinite(u.features.float()).all()


@needs_espeak
def test_a_voice_that_does_not_exist_is_one_line():
    with pytest.raises(UserError, match=r"^espeak-ng could not speak with voice xx-nope"):
        speech.synthesise("hello", "xx-nope", 150, 50)


def test_no_synthesiser_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="apt-get install espeak-ng"):
        speech.espeak()


@pytest.mark.skipif(not (speech.LOCALE_ROOT / "zh_CN" / "LC_MESSAGES").is_dir(), reason="needs zh_CN catalogs")
def test_the_mandarin_catalogs_give_thousands_of_han_sentences():
    sentences, catalogs = speech.catalog_sentences("zh")
    kept = [s for s in sentences if speech.keep(s, "zh", 4, 16)]
    assert len(catalogs) > 10 and len(kept) > 5000
    assert all(speech.HAN.fullmatch(c) for s in kept[:200] for c in s)
    assert np.mean([len(s) for s in kept]) > 5


def test_an_empty_catalog_folder_is_one_line(tmp_path):
    (tmp_path / "zh_CN" / "LC_MESSAGES").mkdir(parents=True)
    with pytest.raises(UserError, match=r"^no zh sentences: no readable translation catalogs"):
        speech.catalog_sentences("zh", tmp_path)


# -- the recogniser and its task -----------------------------------------------------------------------------------
def test_greedy_decoding_merges_repeats_and_drops_blanks():
    from mptrain.tasks.speech import greedy_decode

    characters = ("<blank>", "a", "b", "c")
    paths = torch.tensor([[1, 1, 0, 1, 2, 2, 0, 0], [3, 0, 3, 3, 0, 0, 0, 1]])
    logits = torch.nn.functional.one_hot(paths, 4).float()
    assert greedy_decode(logits, torch.tensor([8, 4]), characters) == ["aab", "cc"]  # the second cut at 4 steps


@pytest.mark.parametrize("refs, hyps, words, expected", [
    (["abcd"], ["abed"], False, (1, 4)),
    (["abcd", "xy"], ["abcd", ""], False, (2, 6)),
    (["the cat sat"], ["the cat sat down"], True, (1, 3)),
    (["打开文件"], ["打开文"], False, (1, 4)),
])  # fmt: skip
def test_error_counts_are_edits_over_reference_units(refs, hyps, words, expected):
    from mptrain.tasks.speech import edit_counts

    assert edit_counts(refs, hyps, words) == expected


def _loader(lengths_and_targets, batch_size=2):
    from mptrain.data.speech_set import SpeechLoader

    features = [torch.zeros(n, speech.N_MELS, dtype=torch.float16) for n, _ in lengths_and_targets]
    targets = [torch.tensor(t) for _, t in lengths_and_targets]
    return SpeechLoader(features, targets, batch_size, "cpu", shuffle=False, mean=torch.zeros(speech.N_MELS),
                        std=torch.ones(speech.N_MELS))


def test_utterances_ctc_cannot_align_are_left_out_with_a_count():
    from mptrain.models.speech import DeepSpeech2

    model = DeepSpeech2(speech.N_MELS, 5, channels=2, width=4, layers=1)
    # 10 frames -> 5 output steps: 5 characters fit, 6 do not, and "aa" needs a blank between: 3 steps
    loader = _loader([(10, [1, 2, 3, 4, 1]), (10, [1, 2, 3, 4, 1, 2]), (4, [1, 1]), (6, [1, 1])])
    assert loader.keep_alignable(model.output_lengths) == 2 and loader.num_samples == 2
    (features, (frames, targets, target_lengths)), = list(loader)
    assert frames.tolist() == [6, 10] and target_lengths.tolist() == [2, 5]


def test_a_batch_is_padded_and_its_lengths_say_where():
    loader = _loader([(7, [1, 2]), (12, [3, 3, 1]), (9, [2])], batch_size=3)
    (features, (frames, targets, target_lengths)), = list(loader)
    assert features.shape == (3, 1, speech.N_MELS, 12) and frames.tolist() == [7, 9, 12]
    assert targets.tolist() == [[1, 2, 0], [2, 0, 0], [3, 3, 1]] and target_lengths.tolist() == [2, 1, 3]


def test_two_ranks_split_every_batch_and_a_short_held_out_batch_leaves_no_rank_an_empty_one():
    loader = _loader([(7, [1]), (8, [2]), (9, [3])], batch_size=2)
    loader.shard(1, 2)
    assert [frames.tolist() for _, (frames, _, _) in loader] == [[8]]  # rank 1: the second of (7, 8); none of (9)


def test_the_recogniser_masks_padding_so_an_utterance_reads_the_same_alone_or_padded():
    from mptrain.models.speech import DeepSpeech2

    torch.manual_seed(0)
    model = DeepSpeech2(speech.N_MELS, 7, channels=2, width=8, layers=2).eval()
    short = torch.randn(1, 1, speech.N_MELS, 20)
    padded = torch.cat([short, torch.zeros(1, 1, speech.N_MELS, 14)], dim=3)
    alone, n = model(short, torch.tensor([20]))
    batched, m = model(padded, torch.tensor([20]))
    assert n.tolist() == m.tolist() == [10]
    assert torch.allclose(alone[0], batched[0, :10], atol=1e-5)  # the backward GRU starts at the last real step


@needs_espeak
def test_one_fp16_step_is_finite_and_the_scaler_works(tmp_path, tiny_cache):
    import mptrain

    summary = mptrain.train(["debug=tiny_speech", "precision=mixed", "trainer.max_steps=8", "trainer.log_every=1",
                             f"dataset.cache_dir={tiny_cache}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert summary["status"] == "completed" and summary["primary_metric"] == "cer"
    assert summary["final_loss_scale"] > 0 and math.isfinite(summary["final"]["loss"])
    # dynamic scaling: any overflow at the first scales is skipped and the scale backs off; updates apply
    assert summary["skipped_steps"] < 8 and summary["final_loss_scale"] <= 65536
    assert summary["loss_scale_verdict"]["model"]["verdict"] != "trouble"
    assert json.loads((tmp_path / "run" / "characters.json").read_text())["characters"][0] == "<blank>"


@needs_espeak
@pytest.mark.parametrize("mode", ["fp16_naive_norm16", "fp16_master", "amp", "bf16_sr", "fp8", "mx"])
def test_every_kind_of_mode_completes_a_few_steps(mode, tmp_path, tiny_cache):
    import mptrain

    summary = mptrain.train(["debug=tiny_speech", f"precision={mode}", "trainer.max_steps=2", "optim=sgd",
                             f"dataset.cache_dir={tiny_cache}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert summary["status"] == "completed", summary.get("error")


def test_fig_2b_counts_the_weight_gradients_below_two_to_the_minus_24(tmp_path, capsys):
    from mptrain.scripts import weight_grad_exponents as fig2b

    run = tmp_path / "runs" / "fp32-0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"precision": "fp32", "precision_preset": "fp32", "seed": 0}))
    hist = [0.0] * 82
    hist[-30 + 64], hist[-25 + 64], hist[-24 + 64], hist[-10 + 64] = 1, 2, 3, 4  # exponents -30, -25 below 2^-24
    records = [{"step": s, "kind": "weight", "layer": "all", "count": 11, "zero_frac": 1 / 11, "log2_hist": hist}
               for s in (100, 200)]
    records.append({"step": 100, "kind": "lost_update", "layer": "w", "count": 10, "lost_update_frac": 0.5})
    (run / "numerics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert fig2b.main([str(tmp_path / "runs"), "--png", str(tmp_path / "fig.png")]) == 0
    out = capsys.readouterr().out
    assert "| fp32 | 1 | 30.000 % | 60.00 % | 9.091 % | 50.0 % |" in out and (tmp_path / "fig.png").is_file()
    assert fig2b.main([str(tmp_path / "runs"), "--arm", "mixed"]) == 2  # one line: the arms there are
