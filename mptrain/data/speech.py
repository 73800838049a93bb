"""Speech, offline: real sentences from the machine's translation catalogs, spoken by espeak-ng, as log-mel features.

The sentences are the human translations every Debian machine carries (`/usr/share/locale/<lang>/LC_MESSAGES/*.mo`,
read with Python's gettext): for Mandarin the zh_CN translations, kept as their Han characters (the targets are
characters, as DeepSpeech 2's Mandarin model predicted characters); for English the catalogs' English source
messages, lower-cased letters, spaces and apostrophes. Each sentence is spoken once by espeak-ng with a voice,
variant, rate and pitch drawn from the data's seed, white noise is added at `dataset.snr_db`, and 40 log-mel
bands every 10 ms are computed with torch.stft and a mel filterbank (torchaudio has no release for this torch).
Train and test are split by a hash of the sentence (a sentence never crosses splits). The features are computed
once into a versioned cache file with a SHA-256 checksum beside it.
"""

from __future__ import annotations

import gettext
import hashlib
import io
import json
import math
import re
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mptrain.data.seeds import text_unit
from mptrain.errors import UserError

FEATURES_VERSION = 1  # bump when synthesis or features change: the cache key carries it
SAMPLE_RATE = 22050  # espeak-ng's output rate
N_FFT, HOP, N_MELS, F_MAX = 512, 220, 40, 8000.0  # 23 ms windows every 10 ms, 40 bands up to 8 kHz
LOCALE_ROOT = Path("/usr/share/locale")
LANGUAGES = {  # dataset option -> (catalog language, text side, espeak-ng voices)
    "en": ("fr", "source", ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-us-nyc")),
    "zh": ("zh_CN", "translation", ("cmn",)),
}
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")  # espeak-ng's +variants
HAN = re.compile(r"[\u4e00-\u9fff]")
PLACEHOLDER = re.compile(r"%(\d+\$)?[-#0 +]*\d*(\.\d+)?[hlLqjzt]*[a-zA-Z%]|\{[^}]*\}|<[^>]*>|&\w+;")
INSTALL = "apt-get install espeak-ng (Debian's package; make run and make test install it)"


def clean(text: str, language: str) -> str:
    """What is spoken and what is predicted, the same string: Han characters for zh; for en lower-case letters,
    apostrophes and single spaces (format placeholders and markup dropped, an accelerator's _ or & too)."""
    text = PLACEHOLDER.sub(" ", text)
    if language == "zh":
        return "".join(HAN.findall(text))
    text = re.sub(r"[_&]", "", text.lower())
    text = re.sub(r"[^a-z' ]+", " ", text)
    return " ".join(w.strip("'") for w in text.split() if w.strip("'"))


def catalog_sentences(language: str, root: Path = LOCALE_ROOT) -> tuple[list[str], list[str]]:
    """The cleaned, distinct sentences of `language`'s catalogs (sorted), and the catalogs they came from."""
    locale, side, _ = LANGUAGES[language]
    catalogs = sorted((Path(root) / locale / "LC_MESSAGES").glob("*.mo"))
    found = set()
    for path in catalogs:
        try:
            with open(path, "rb") as f:
                entries = gettext.GNUTranslations(f)._catalog
        except (OSError, ValueError, UnicodeDecodeError):  # a catalog gettext cannot read: skipped
            continue
        for key, value in entries.items():
            source = key[0] if isinstance(key, tuple) else key
            said = source if side == "source" else value
            if isinstance(said, str) and said and "\n" not in said and isinstance(source, str) and source:
                found.add(clean(said, language))
    if not catalogs or not found:
        raise UserError(f"no {language} sentences: no readable translation catalogs in {Path(root) / locale / 'LC_MESSAGES'}"
                        f"; install some (apt-get install language-pack or any package with {locale} translations) "
                        "or pick the other language")
    return sorted(s for s in found if s), [p.name for p in catalogs]


def target_text(sentence: str, targets: str) -> str:
    """What the recogniser is asked to write: the sentence itself (`characters`), or its tonal pinyin, syllables
    separated by spaces with the tone as a digit (`pinyin`: 打开 -> "da3 kai1"; pypinyin's reading, the neutral
    tone as 5, ü as v)."""
    if targets == "characters":
        return sentence
    from pypinyin import Style, lazy_pinyin

    return " ".join(lazy_pinyin(sentence, style=Style.TONE3, neutral_tone_with_five=True))


def keep(sentence: str, language: str, min_units: int, max_units: int) -> bool:
    """Characters (zh) or words (en) within the length bounds."""
    units = len(sentence) if language == "zh" else len(sentence.split())
    return min_units <= units <= max_units


def in_test_split(sentence: str, test_share: float) -> bool:
    """A sentence's split by a hash of its text: the same on every machine, never both."""
    return text_unit(sentence) < test_share


def espeak() -> str:
    found = shutil.which("espeak-ng")
    if found is None:
        raise UserError(f"dataset=speech needs the espeak-ng synthesiser, which is not installed: {INSTALL}")
    return found


def voices(language: str) -> list[str]:
    """The espeak-ng voices of `language` that this machine has, each with every variant."""
    listed = subprocess.run([espeak(), "--voices"], capture_output=True, text=True, check=True).stdout
    names = {line.split()[1] for line in listed.splitlines()[1:] if len(line.split()) > 1}
    have = [v for v in LANGUAGES[language][2] if v in names]
    if not have:
        raise UserError(f"espeak-ng has none of the {language} voices {', '.join(LANGUAGES[language][2])}: "
                        f"espeak-ng --voices lists what it has; reinstall it ({INSTALL})")
    return [f"{v}+{variant}" for v in have for variant in VARIANTS]


def synthesise(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng's speech of `text` as float32 samples in [-1, 1] at SAMPLE_RATE."""
    done = subprocess.run([espeak(), "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                          capture_output=True, check=False)
    if done.returncode != 0 or not done.stdout:
        raise UserError(f"espeak-ng could not speak with voice {voice} ({done.stderr.decode(errors='replace').strip()[:120]}"
                        f"); espeak-ng --voices lists its voices")
    with wave.open(io.BytesIO(done.stdout)) as w:
        if w.getframerate() != SAMPLE_RATE or w.getsampwidth() != 2:
            raise UserError(f"espeak-ng spoke at {w.getframerate()} Hz, {8 * w.getsampwidth()} bit; mptrain reads "
                            f"{SAMPLE_RATE} Hz, 16 bit")
        data = w.readframes(w.getnframes())
    return np.frombuffer(data, dtype=np.int16).astype(np.float32) / 32768.0


def with_noise(samples: torch.Tensor, snr_db: float, generator: torch.Generator) -> torch.Tensor:
    """White noise at `snr_db` below the utterance's mean power."""
    power = samples.pow(2).mean().clamp_min(1e-12)
    noise = torch.randn(samples.shape, generator=generator) * torch.sqrt(power / 10 ** (snr_db / 10))
    return samples + noise


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                   f_max: float = F_MAX) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters on the HTK mel scale, 0 Hz to f_max."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def hz(m):
        return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(0.0), mel(f_max), n_mels + 2))
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0, None).T.astype(np.float32))


def log_mel(samples: torch.Tensor, filters: torch.Tensor | None = None) -> torch.Tensor:
    """(frames, N_MELS) log-mel energies of float samples: a Hann window of N_FFT every HOP samples."""
    spectrum = torch.stft(samples, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True).abs().pow(2)
    return torch.log((filters if filters is not None else mel_filterbank()).T @ spectrum + 1e-6).T


def frames_after_front_end(frames: int, stride: int) -> int:
    """Time steps a front end of total time stride `stride` leaves (ceil): what CTC aligns targets to."""
    return math.ceil(frames / stride)


@dataclass(frozen=True)
class Utterance:
    features: torch.Tensor  # (frames, N_MELS) float16
    text: str
    voice: str


def speak_all(sentences: list[str], language: str, seed: int, snr_db: float, rates=(130, 200),
              pitches=(25, 75)) -> list[Utterance]:
    """Each sentence spoken by a voice, variant, rate and pitch drawn from `seed`, noise added, as features."""
    generator = torch.Generator().manual_seed(seed)
    choices, filters, spoken = voices(language), mel_filterbank(), []
    for text in sentences:
        voice = choices[int(torch.randint(len(choices), (1,), generator=generator))]
        rate = int(torch.randint(rates[0], rates[1] + 1, (1,), generator=generator))
        pitch = int(torch.randint(pitches[0], pitches[1] + 1, (1,), generator=generator))
        samples = with_noise(torch.from_numpy(synthesise(text, voice, rate, pitch)), snr_db, generator)
        spoken.append(Utterance(log_mel(samples, filters).half(), text, f"{voice} s{rate} p{pitch}"))
    return spoken


def checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached(key: dict, cache_dir: Path, make) -> dict:
    """`make()`'s result, stored once under a name from `key` with its SHA-256 beside it; a file whose checksum
    does not match is made again (and said), never read."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path, stamp = Path(cache_dir) / f"speech-{name}.pt", Path(cache_dir) / f"speech-{name}.json"
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == checksum(path):
        return torch.load(path, weights_only=True)
    content = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".pt.tmp")
    torch.save(content, partial)
    partial.replace(path)
    stamp.write_text(json.dumps({"key": key, "sha256": checksum(path)}, indent=1) + "\n")
    return content
