"""Datasets and audio, shared by evaluate, rank-layers and finetune.

A dataset is named on the command line as ``KIND:PATH`` (ljspeech, vctk, esc50, folders, fsdd)
or as a manifest file (.csv, .tsv, .jsonl). Audio of any rate, channel count and common format
is read with soundfile, mixed to mono and resampled with soxr to the model's rate.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mamcli.errors import MamError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Item:
    """One clip: where it is, its transcript or label, and its fold or speaker where the corpus has one."""

    id: str
    path: Path
    text: str | None = None
    label: str | None = None
    fold: int | None = None
    speaker: str | None = None


@dataclass
class Dataset:
    spec: str
    kind: str
    root: Path
    items: list[Item]
    text_field: str | None = None
    notes: list[str] = field(default_factory=list)
    all_labels: list[str] = field(default_factory=list)  # of the whole corpus, kept through selection

    def __post_init__(self) -> None:
        if not self.all_labels:
            self.all_labels = self.labels

    @property
    def labels(self) -> list[str]:
        return sorted({i.label for i in self.items if i.label is not None})

    def describe(self) -> dict[str, object]:
        return {"spec": self.spec, "kind": self.kind, "root": str(self.root.absolute()), "clips": len(self.items),
                "text_field": self.text_field, "notes": self.notes}


class AudioError(MamError):
    """A clip that cannot be read; carries the clip's name."""


def load_audio(path: Path, rate: int) -> np.ndarray:
    """Mono float32 at ``rate``: channels averaged, resampled with soxr (high quality)."""
    import soundfile as sf
    import soxr

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, OSError…
        raise AudioError(f"{path}: cannot read audio ({str(e).strip() or type(e).__name__})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: empty audio")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != rate:
        mono = soxr.resample(mono, sr, rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


# ---- corpus readers ---------------------------------------------------------------------------

def _find_audio(base: Path, stem: str) -> Path:
    for suffix in AUDIO_SUFFIXES:
        if (p := base / f"{stem}{suffix}").is_file():
            return p
    return base / f"{stem}.wav"  # reported as missing when read


def _is_ljspeech(root: Path) -> bool:
    return (root / "metadata.csv").is_file()


def _ljspeech(root: Path, text_field: str = "normalized", mic: str = "") -> list[Item]:
    items = []
    with (root / "metadata.csv").open(encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE):
            if len(row) < 2:
                continue
            text = row[2] if text_field == "normalized" and len(row) > 2 and row[2] else row[1]
            items.append(Item(row[0], _find_audio(root / "wavs", row[0]), text=text, speaker="LJ"))
    return items


def _is_vctk(root: Path) -> bool:
    return (root / "txt").is_dir()


def _vctk(root: Path, text_field: str = "", mic: str = "mic1") -> list[Item]:
    audio_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("wav"))
    items = []
    for t in sorted((root / "txt").glob("*/*.txt")):
        spk, stem = t.parent.name, t.stem
        candidates = [_find_audio(d / spk, name) for d in audio_dirs for name in (f"{stem}_{mic}", stem)]
        path = next((c for c in candidates if c.is_file()), candidates[0] if candidates else t.with_suffix(".wav"))
        items.append(Item(stem, path, text=t.read_text(encoding="utf-8").strip(), speaker=spk))
    return items


def _is_esc50(root: Path) -> bool:
    return (root / "meta" / "esc50.csv").is_file()


def _esc50(root: Path, text_field: str = "", mic: str = "") -> list[Item]:
    with (root / "meta" / "esc50.csv").open(encoding="utf-8") as f:
        return [Item(Path(r["filename"]).stem, root / "audio" / r["filename"], label=r["category"],
                     fold=int(r["fold"])) for r in csv.DictReader(f)]


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and any(p.suffix.lower() in AUDIO_SUFFIXES for p in d.iterdir()))


def _is_folders(root: Path) -> bool:
    return bool(_class_dirs(root))


def _folders(root: Path, text_field: str = "", mic: str = "") -> list[Item]:
    """One folder per class (ESC-10: ``001 - Dog bark/1-100032-A.ogg``; fold = first digit of the name)."""
    items = []
    for d in _class_dirs(root):
        label = re.sub(r"^\d+\s*-\s*", "", d.name)
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
            m = re.match(r"(\d)-", f.name)
            items.append(Item(f"{d.name}/{f.stem}", f, label=label, fold=int(m[1]) if m else None))
    return items


FSDD_NAME = re.compile(r"(\d)_([a-z]+)_(\d+)")


def _is_fsdd(root: Path) -> bool:
    return any(FSDD_NAME.fullmatch(f.stem) and f.suffix.lower() in AUDIO_SUFFIXES for f in root.iterdir())


def _fsdd(root: Path, text_field: str = "", mic: str = "") -> list[Item]:
    """Free Spoken Digit Dataset: ``{digit}_{speaker}_{take}``; text is the digit's word, label the digit."""
    items = []
    for f in sorted(root.iterdir()):
        m = FSDD_NAME.fullmatch(f.stem)
        if m and f.suffix.lower() in AUDIO_SUFFIXES:
            items.append(Item(f.stem, f, text=DIGITS[int(m[1])], label=m[1], speaker=m[2], fold=int(m[3])))
    return items


# kind -> (reader, layout check, what the layout is, for the error)
CORPORA: dict[str, tuple[Callable[..., list[Item]], Callable[[Path], bool], str]] = {
    "ljspeech": (_ljspeech, _is_ljspeech, "LJ Speech layout: metadata.csv and wavs/"),
    "vctk": (_vctk, _is_vctk, "VCTK layout: txt/<spk>/*.txt and wav48*/<spk>/"),
    "esc50": (_esc50, _is_esc50, "ESC-50 layout: meta/esc50.csv and audio/"),
    "folders": (_folders, _is_folders, "one folder of audio files per class"),
    "fsdd": (_fsdd, _is_fsdd, "FSDD layout: recordings named digit_speaker_take"),
}


KINDS = (*CORPORA, "manifest")


def corpus_root(kind: str, path: Path) -> Path:
    """``path`` when it has the corpus's layout, else its one subfolder that has it (archives unpack
    into ``LJSpeech-1.1/``, ``ESC-50-master/``, ``recordings/``)."""
    _, has_layout, layout = CORPORA[kind]
    if not path.is_dir():
        raise MamError(f"{path}: not a folder (a {kind} dataset is a folder in the {layout})")
    if has_layout(path):
        return path
    inside = [d for d in sorted(path.iterdir()) if d.is_dir() and has_layout(d)]
    if len(inside) == 1:
        return inside[0]
    if inside:
        raise MamError(f"{path}: several folders inside have the {layout} ({', '.join(d.name for d in inside)}); "
                       "name one")
    raise MamError(f"{path}: not in the {layout}")


def _manifest(path: Path) -> list[Item]:
    """CSV/TSV/JSONL with an audio column (audio, path, file, filename) and ``text`` or ``label``."""
    if path.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except ValueError as e:
            raise MamError(f"{path}: invalid JSON line ({e})") from None
    else:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    items = []
    for n, r in enumerate(rows):
        audio = next((r[k] for k in ("audio", "path", "file", "filename") if r.get(k)), None)
        if audio is None:
            raise MamError(f"{path}: row {n + 1} has no audio column (audio, path, file or filename)")
        p = Path(audio) if Path(audio).is_absolute() else path.parent / audio
        fold = r.get("fold")
        items.append(Item(str(r.get("id") or Path(audio).stem), p, text=r.get("text"),
                          label=None if r.get("label") is None else str(r["label"]),
                          fold=int(fold) if fold not in (None, "") else None, speaker=r.get("speaker")))
    return items


def load_dataset(spec: str, text_field: str = "normalized", mic: str = "mic1") -> Dataset:
    """Parse ``KIND:PATH`` or a manifest path into a :class:`Dataset` (clips are read later)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        kind, rest = "manifest", spec
    path = Path(rest).expanduser()
    if not path.exists():
        raise MamError(f"dataset {spec!r}: {path} does not exist")
    if kind == "manifest":
        if path.suffix not in (".csv", ".tsv", ".jsonl"):
            raise MamError(f"dataset {spec!r}: use KIND:PATH with KIND one of {', '.join(KINDS[:-1])}, "
                           "or a .csv/.tsv/.jsonl manifest")
        items = _manifest(path)
    else:
        path = corpus_root(kind, path)
        items = CORPORA[kind][0](path, text_field=text_field, mic=mic)
    if not items:
        raise MamError(f"dataset {spec!r} holds no clips")
    return Dataset(spec, kind, path, items, text_field if kind == "ljspeech" else None)


# ---- splits --------------------------------------------------------------------------------------

def _unit(seed: int, key: str) -> float:
    """A stable number in [0, 1) per clip: splits do not move when clips are added or reordered."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") / 2**64


def select(ds: Dataset, split: str = "all", dev_fraction: float = 0.1, seed: int = 0,
           folds: list[int] | None = None, limit: int | None = None, fraction: float | None = None) -> Dataset:
    """Pick clips: folds, then a seeded dev/test split by clip id, then an optional fraction and limit."""
    if split not in ("all", "dev", "test"):
        raise MamError(f"--split must be dev, test or all; got {split!r}")
    if not 0.0 < dev_fraction < 1.0:
        raise MamError(f"--dev-fraction must lie in (0, 1); got {dev_fraction}")
    items = ds.items
    if folds:
        if all(i.fold is None for i in items):
            raise MamError(f"dataset {ds.spec!r} has no folds")
        items = [i for i in items if i.fold in folds]
    if split != "all":
        items = [i for i in items if (_unit(seed, i.id) < dev_fraction) == (split == "dev")]
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise MamError(f"--fraction must lie in (0, 1]; got {fraction}")
        items = [i for i in items if _unit(seed + 1, i.id) < fraction]
    items = sorted(items, key=lambda i: i.id)
    if limit is not None:
        if limit < 1:
            raise MamError(f"--limit must be at least 1; got {limit}")
        items = items[:limit]
    if not items:
        raise MamError(f"no clips left in {ds.spec!r} after the split/fold/limit selection")
    return replace(ds, items=items)


def parse_folds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise MamError(f"--folds takes a comma list of integers; got {text!r}") from None


@dataclass
class Clip:
    item: Item
    audio: np.ndarray


def iter_clips(ds: Dataset, rate: int, strict: bool = False, bad: list[dict[str, str]] | None = None,
               ticker: Callable[[int, int], None] | None = None,
               usable: Callable[[np.ndarray], str | None] | None = None) -> Iterator[Clip]:
    """Read clips one by one; a clip that cannot be read, or that ``usable`` refuses (it returns why:
    too short for the model's front end, longer than the model takes), is reported by name in ``bad``
    and skipped (fatal with ``strict``). ``ticker(done, total)`` is told after every clip."""
    for n, item in enumerate(ds.items, 1):
        try:
            audio = load_audio(item.path, rate)
            why = usable(audio) if usable is not None else None
            if why is not None:
                raise AudioError(f"{item.path}: {why}")
            clip = Clip(item, audio)
        except AudioError as e:
            if strict:
                raise
            if bad is not None:
                bad.append({"id": item.id, "path": str(item.path), "error": str(e)})
        else:
            yield clip
        if ticker:
            ticker(n, len(ds.items))
