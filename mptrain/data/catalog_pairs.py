"""A real parallel corpus, offline: the human translations of a Debian machine's program messages.

Every message catalog under `/usr/share/locale/<lang>/LC_MESSAGES/<domain>.mo` maps an English message (its msgid)
to its translation. A pair `source -> target` joins the two languages' catalogs of one domain on the msgid (English
is the msgid itself), so any two languages present pair up. Only the domains of the packages listed in
catalog_packages.txt are read, so the corpus is the same on every machine of this kind (`make` installs them).

Kept: single-line, non-plural messages whose translation differs from the source, mnemonic underscores removed
(`_Open` -> `Open`), non-breaking spaces as spaces; one translation per source message (the commonest, then the
first in order); pairs whose format placeholders (`%s`, `%2$d`, `{name}`) do not correspond are dropped. Each
placeholder becomes a numbered token the model copies (`⟨0⟩` is the source's first placeholder, whatever its
position in the target), restored after decoding. Splits by a hash of the source text (a message never crosses
them). Torch-free.
"""

from __future__ import annotations

import collections
import functools
import gettext
import hashlib
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from mptrain.data.seeds import text_unit
from mptrain.errors import UserError

LOCALE_ROOT = Path("/usr/share/locale")
PACKAGES_FILE = Path(__file__).with_name("catalog_packages.txt")
# the corpus's checksum on the image it was made on: a machine whose corpus differs says so in one line
REFERENCE_CHECKSUMS_FILE = Path(__file__).with_name("catalog_checksums.json")
PLACEHOLDER = re.compile(r"%(?:(\d+)\$)?([-#0 +']*(?:\d+|\*)?(?:\.(?:\d+|\*))?(?:hh|h|ll|l|L|q|j|z|t)?[a-zA-Z])"
                         r"|\{[A-Za-z_][A-Za-z_0-9]*\}")
MNEMONIC = re.compile(r"(?<![\w_])_(?=[^\W_])")  # GTK's _File; not __gp, not _bfd_elf
TOKEN = "⟨{}⟩"
TOKEN_RE = re.compile(r"⟨(\d+)⟩")
MAX_PLACEHOLDERS = 10  # tokens ⟨0⟩..⟨9⟩ are the vocabulary's own symbols; more: the pair is dropped


def corpus_domains(path: Path = PACKAGES_FILE) -> dict[str, str]:
    """Catalog domain -> the Debian package that installs it."""
    domains = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            package, _, names = line.partition(":")
            domains.update(dict.fromkeys(names.split(), package.strip()))
    return domains


def languages_present(root: Path = LOCALE_ROOT) -> list[str]:
    """The catalog languages this machine has (English is every catalog's msgid side)."""
    domains = corpus_domains()
    found = {p.parent.parent.name for p in root.glob("*/LC_MESSAGES/*.mo") if p.stem in domains}
    return sorted(found | {"en"}) if found else []


def read_catalog(path: Path) -> dict[str, str]:
    """msgid -> translation of a .mo file (single-line, non-plural, non-empty entries)."""
    with open(path, "rb") as f:
        entries = gettext.GNUTranslations(f)._catalog
    return {k: v for k, v in entries.items()
            if isinstance(k, str) and k and isinstance(v, str) and v and "\n" not in k and "\n" not in v}


def normalise(text: str) -> str:
    """Mnemonic underscores out, non-breaking and thin spaces as spaces, runs of spaces as one."""
    text = MNEMONIC.sub("", text) if text.count("_") == 1 else text
    return " ".join(text.replace("\xa0", " ").replace("\u202f", " ").split())


def protect(source: str, target: str) -> tuple[str, str, list[str], list[str]] | None:
    """Both sides with each placeholder replaced by the token of the source placeholder it stands for; the two
    sides' original placeholder texts (in token order) restore them. None when they do not correspond."""
    found = list(PLACEHOLDER.finditer(source))
    if len(found) > MAX_PLACEHOLDERS:
        return None
    kinds = [m.group(2) or m.group(0) for m in found]  # a positional %2$s is the source's %s in second place
    masked_source = _substitute(source, {id(m): i for i, m in enumerate(found)}, found)
    found_t = list(PLACEHOLDER.finditer(target))
    index, unused = {}, list(range(len(found)))
    for m in found_t:
        if m.group(1) is not None:  # positional: %n$ is the n-th argument
            i = int(m.group(1)) - 1
        else:  # in order: the next source placeholder not yet used
            i = unused[0] if unused else -1
        if not (0 <= i < len(found)) or i not in unused or (m.group(2) or m.group(0)) != kinds[i]:
            return None
        unused.remove(i)
        index[id(m)] = i
    if unused:
        return None  # a placeholder the translation leaves out
    originals_t = [""] * len(found)
    for m in found_t:
        originals_t[index[id(m)]] = m.group(0)
    return masked_source, _substitute(target, index, found_t), [m.group(0) for m in found], originals_t


def _substitute(text: str, index: dict[int, int], found: list) -> str:
    out, last = [], 0
    for m in found:
        out += [text[last:m.start()], TOKEN.format(index[id(m)])]
        last = m.end()
    return "".join(out) + text[last:]


def restore(text: str, placeholders: list[str]) -> str:
    """The tokens back to placeholder texts (a token the sentence has no placeholder for is left out)."""
    return TOKEN_RE.sub(lambda m: placeholders[int(m.group(1))] if int(m.group(1)) < len(placeholders) else "", text)


@dataclass
class Corpus:
    """The pairs (source text, target text, source placeholders, target placeholders) and where they came from."""

    pairs: list[tuple[str, str, list[str], list[str]]]
    catalogs: list[str]
    packages: dict[str, str]  # package -> installed version
    checksum: str  # SHA-256 of the extracted pairs, before any length filter
    dropped: dict[str, int] = field(default_factory=dict)

    def record(self, source: str, target: str) -> dict:
        reference = reference_checksum(source, target)
        return {"pair": f"{source}-{target}", "pairs_extracted": len(self.pairs), "sha256": self.checksum,
                "matches_reference": None if reference is None else reference == self.checksum,
                "catalogs": self.catalogs, "packages": self.packages, "dropped": self.dropped}


@functools.lru_cache(maxsize=4)  # a sweep's runs in one process read the catalogs once
def extract(source: str, target: str, root: Path = LOCALE_ROOT) -> Corpus:
    """Every pair of the listed domains' catalogs, deduplicated by source text, sorted by it."""
    if source == target:
        raise UserError(f"dataset.source and dataset.target are both {source!r}: a translation needs two languages; "
                        f"e.g. dataset.source=en dataset.target=fr")
    present = languages_present(root)
    for language in (source, target):
        if language not in present:
            raise UserError(f"no {language!r} translation catalogs on this machine (under {root}/<lang>/LC_MESSAGES);"
                            f" languages present: {', '.join(present) or 'none'}")
    domains = corpus_domains()
    found: dict[str, collections.Counter] = {}
    catalogs, dropped = [], collections.Counter()
    others = [lang for lang in (source, target) if lang != "en"]  # English is the msgid itself
    for domain in sorted(domains):
        paths = [root / lang / "LC_MESSAGES" / f"{domain}.mo" for lang in others]
        if not all(p.is_file() for p in paths):
            continue
        try:
            sides = [read_catalog(p) for p in paths]
        except (OSError, ValueError, UnicodeDecodeError):  # a catalog gettext cannot read: skipped
            continue
        catalogs += [str(p.relative_to(root)) for p in paths]
        msgids = set(sides[0]).intersection(*sides[1:])
        texts = {lang: dict(zip(msgids, msgids)) if lang == "en" else sides[others.index(lang)]
                 for lang in (source, target)}
        for msgid in sorted(msgids):
            a, b = normalise(texts[source][msgid]), normalise(texts[target][msgid])
            if not a or not b or a == b:
                dropped["untranslated"] += 1
                continue
            found.setdefault(a, collections.Counter())[b] += 1
    pairs, seen = [], set()
    for a in sorted(found):
        b = sorted(found[a].items(), key=lambda kv: (-kv[1], kv[0]))[0][0]  # the commonest, then the first
        protected = protect(a, b)
        if protected is None:
            dropped["placeholders_differ"] += 1
            continue
        masked_a, masked_b, placeholders_a, placeholders_b = protected
        if masked_a in seen:  # "%s offset" and "%d offset" are one message to the model: the first is kept
            dropped["same_with_placeholders_masked"] += 1
            continue
        seen.add(masked_a)
        pairs.append((masked_a, masked_b, placeholders_a, placeholders_b))
    digest = hashlib.sha256(json.dumps([p[:2] for p in pairs], ensure_ascii=False).encode()).hexdigest()
    packages = installed_versions(sorted({domains[Path(c).stem] for c in catalogs}))
    return Corpus(pairs, catalogs, packages, digest, dict(dropped))


def installed_versions(packages: list[str]) -> dict[str, str]:
    """package -> installed version (dpkg-query); empty where dpkg is not there."""
    if not packages:
        return {}
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version}\n", *packages], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def reference_checksum(source: str, target: str) -> str | None:
    try:
        return json.loads(REFERENCE_CHECKSUMS_FILE.read_text()).get(f"{source}-{target}")
    except (OSError, ValueError):
        return None


def split_of(source_text: str, valid_share: float, test_share: float) -> str:
    """train | valid | test, by a hash of the source text: the same on every machine, a message in one split."""
    u = text_unit(source_text)
    return "test" if u < test_share else "valid" if u < test_share + valid_share else "train"


def words(text: str) -> int:
    return len(text.split())
