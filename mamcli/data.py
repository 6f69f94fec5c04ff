"""Datasets and audio, shared by evaluate, rank-layers and finetune.

A dataset is named on the command line as ``KIND:PATH`` (ljspeech, vctk, esc50, folders, fsdd, librispeech,
commonvoice, hf, parquet) or as a manifest file (.csv, .tsv, .jsonl, .json). Audio of any rate, channel count and
common format is read with soundfile, mixed to mono and resampled with soxr to the model's rate. Clips are read
lazily, one by one: a clip is a file of its own, or a row of a parquet/arrow table (Hugging Face datasets).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from mamcli.errors import MamError

if TYPE_CHECKING:
    import pyarrow as pa

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class TableRow:
    """Where a clip's encoded audio sits inside a table file: the row's ``{bytes, path}`` cell in ``column``."""

    column: str
    index: int


@dataclass(frozen=True)
class Item:
    """One clip: its id (unique within its dataset: results are kept by it), where it is, its transcript or label,
    and its fold or speaker where the corpus has one. ``row`` is set when ``path`` is a parquet/arrow table holding
    the clip, not the clip's own file; ``listed`` is the line of a listing (a manifest, ``metadata.csv``) that names
    the clip, so that an error about two rows can name both."""

    id: str
    path: Path
    text: str | None = None
    label: str | None = None
    fold: int | None = None
    speaker: str | None = None
    row: TableRow | None = None
    listed: str | None = field(default=None, compare=False)

    @property
    def where(self) -> str:
        """The clip's place for messages and reports: its file, or its table and row."""
        return str(self.path) if self.row is None else f"{self.path} row {self.row.index}"

    @property
    def place(self) -> tuple[str, int | None]:
        """What makes two items one clip: the same file (spelled either way: ``a.wav``, ``./a.wav``, absolute),
        or the same row of one table. Symbolic links are not followed: a link is a clip of its own name."""
        return os.path.abspath(self.path), None if self.row is None else self.row.index


def _one_clip_per_id(spec: str, items: list[Item]) -> None:
    """The invariant every reader's ids keep, checked where a Dataset is built: one id per clip and one item per
    clip. Hypotheses, references and paired statistics are kept by clip id, so two clips with one id would share a
    result, and a clip listed twice would be scored twice."""
    by_id: dict[str, Item] = {}
    by_place: dict[tuple[str, int | None], Item] = {}
    for item in items:
        first = by_place.setdefault(item.place, item)
        if first is not item:
            raise MamError(f"dataset {spec!r}: {first.listed or first.where} and {item.listed or item.where} list "
                           f"the same clip ({item.where}); list each clip once")
        first = by_id.setdefault(item.id, item)
        if first is not item:
            raise MamError(f"dataset {spec!r}: {first.listed or first.where} and {item.listed or item.where} give "
                           f"two clips ({first.where}, {item.where}) the one id {item.id!r}; ids must be unique")


def _distinct_ids(items: list[Item], names: list[tuple[str, ...]]) -> list[Item]:
    """Each item with the first of its ``names`` (shortest first: a file's stem, then its path without suffix, then
    with it) that no other item's name shares. Only the items whose name collides move on to their next, longer
    name, so the other ids, and with them the seeded split, stay as they were. Items left sharing their last name
    are the same clip: :class:`Dataset` refuses them."""
    level = [0] * len(items)
    while True:
        ids = [n[k] for n, k in zip(names, level, strict=True)]
        shared = {i for i, count in Counter(ids).items() if count > 1}
        moving = [k for k, (i, n) in enumerate(zip(ids, names, strict=True)) if i in shared and level[k] + 1 < len(n)]
        if not moving:
            return [replace(item, id=i) for item, i in zip(items, ids, strict=True)]
        for k in moving:
            level[k] += 1


def _path_names(path: Path, base: Path, short: str | None = None) -> tuple[str, ...]:
    """A file's candidate ids for :func:`_distinct_ids`: ``short`` (default: its stem), then its path from ``base``
    (absolute where it lies outside ``base``) in POSIX form without its suffix, then with it."""
    full = os.path.abspath(path)
    rel = os.path.relpath(full, os.path.abspath(base))
    posix = Path(full if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel).as_posix()
    return short or path.stem, str(PurePosixPath(posix).with_suffix("")), posix


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
        _one_clip_per_id(self.spec, self.items)
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


def _decode(source: Path | io.BytesIO, name: str, rate: int) -> np.ndarray:
    """Mono float32 at ``rate`` from a file or encoded bytes: channels averaged, resampled with soxr (HQ)."""
    import soundfile as sf
    import soxr

    try:
        data, sr = sf.read(source if isinstance(source, io.BytesIO) else str(source), dtype="float32",
                           always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, OSError…
        raise AudioError(f"{name}: cannot read audio ({str(e).strip() or type(e).__name__})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{name}: empty audio")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != rate:
        mono = soxr.resample(mono, sr, rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_audio(path: Path, rate: int) -> np.ndarray:
    """Mono float32 at ``rate``: channels averaged, resampled with soxr (high quality)."""
    return _decode(path, str(path), rate)


def load_clip(item: Item, rate: int) -> np.ndarray:
    """An item's audio, from its own file or from its row of a table file."""
    if item.row is None:
        return load_audio(item.path, rate)
    cell = _table_cell(item.path, item.row)
    data, inner = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
    if isinstance(data, bytes):
        return _decode(io.BytesIO(data), f"{item.where} ({inner})" if inner else item.where, rate)
    if isinstance(inner, str) and inner:  # a dataset saved without embedding its files: the path is all there is
        p = Path(inner) if Path(inner).is_absolute() else item.path.parent / inner
        return load_audio(p, rate)
    raise AudioError(f"{item.where}: no audio in column {item.row.column!r}")


def _need_mp3(names: Iterable[str], where: str) -> None:
    """MP3 needs libsndfile 1.1 or later: say so once, at load, rather than failing every clip."""
    import soundfile as sf

    if "MP3" not in sf.available_formats() and any(n.lower().endswith(".mp3") for n in names):
        raise MamError(f"{where} holds MP3 clips and the installed libsndfile ({sf.__libsndfile_version__}) cannot "
                       "read MP3: it needs libsndfile 1.1.0 or later (pip install -U soundfile), or convert the clips "
                       "to FLAC")


# ---- corpus readers ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    """The keyword options of :func:`load_dataset`, handed to every reader."""

    text_field: str = "normalized"
    mic: str = "mic1"
    subset: str | None = None
    text_column: str | None = None
    label_column: str | None = None


@dataclass
class Loaded:
    """What a reader found: the clips, and what the report should say about how they were read."""

    items: list[Item]
    notes: list[str] = field(default_factory=list)
    all_labels: list[str] = field(default_factory=list)  # where the corpus declares its label set (ClassLabel)
    text_field: str | None = None


def _pick(names: list[str], wanted: str | None, where: Path, what: str) -> str:
    """One of a corpus's own splits: the one named (in full or by its last part), or the only one there is."""
    if wanted is None:
        if len(names) == 1:
            return names[0]
        raise MamError(f"{where} holds several {what}s ({', '.join(names)}); pick one with --subset")
    if wanted in names:
        return wanted
    tails = [n for n in names if n.rsplit("/", 1)[-1] == wanted]
    if len(tails) == 1:
        return tails[0]
    raise MamError(f"{where}: no {what} {wanted!r}; there are: {', '.join(names) or 'none'}")


def _find_audio(base: Path, stem: str) -> Path:
    for suffix in AUDIO_SUFFIXES:
        if (p := base / f"{stem}{suffix}").is_file():
            return p
    return base / f"{stem}.wav"  # reported as missing when read


def _is_ljspeech(root: Path) -> bool:
    return (root / "metadata.csv").is_file()


def _ljspeech(root: Path, o: Options) -> Loaded:
    items = []
    with (root / "metadata.csv").open(encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE)
        for row in reader:
            if len(row) < 2:
                continue
            text = row[2] if o.text_field == "normalized" and len(row) > 2 and row[2] else row[1]
            items.append(Item(row[0], _find_audio(root / "wavs", row[0]), text=text, speaker="LJ",
                              listed=f"{root / 'metadata.csv'}, line {reader.line_num}"))
    return Loaded(items, text_field=o.text_field)


def _is_vctk(root: Path) -> bool:
    return (root / "txt").is_dir()


def _vctk(root: Path, o: Options) -> Loaded:
    """VCTK: id ``p225_001`` (the transcript's name; ``p225/p225_001`` where two speakers' names collide)."""
    audio_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("wav"))
    items, names = [], []
    for t in sorted((root / "txt").glob("*/*.txt")):
        spk, stem = t.parent.name, t.stem
        candidates = [_find_audio(d / spk, name) for d in audio_dirs for name in (f"{stem}_{o.mic}", stem)]
        path = next((c for c in candidates if c.is_file()), candidates[0] if candidates else t.with_suffix(".wav"))
        items.append(Item(stem, path, text=t.read_text(encoding="utf-8").strip(), speaker=spk))
        names.append((stem, f"{spk}/{stem}"))
    return Loaded(_distinct_ids(items, names))


def _is_esc50(root: Path) -> bool:
    return (root / "meta" / "esc50.csv").is_file()


def _esc50(root: Path, o: Options) -> Loaded:
    with (root / "meta" / "esc50.csv").open(encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return Loaded([Item(Path(r["filename"]).stem, root / "audio" / r["filename"], label=r["category"],
                            fold=int(r["fold"]), listed=f"{root / 'meta' / 'esc50.csv'}, line {reader.line_num}")
                       for r in reader])


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and any(p.suffix.lower() in AUDIO_SUFFIXES for p in d.iterdir()))


def _is_folders(root: Path) -> bool:
    return bool(_class_dirs(root))


def _folders(root: Path, o: Options) -> Loaded:
    """One folder per class (ESC-10: ``001 - Dog bark/1-100032-A.ogg``; fold = first digit of the name). Id:
    ``001 - Dog bark/1-100032-A``, with the suffix where two files of a folder differ only in it."""
    items, names = [], []
    for d in _class_dirs(root):
        label = re.sub(r"^\d+\s*-\s*", "", d.name)
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
            m = re.match(r"(\d)-", f.name)
            items.append(Item(f"{d.name}/{f.stem}", f, label=label, fold=int(m[1]) if m else None))
            names.append(_path_names(f, root, f"{d.name}/{f.stem}"))
    return Loaded(_distinct_ids(items, names))


FSDD_NAME = re.compile(r"(\d)_([a-z]+)_(\d+)")


def _is_fsdd(root: Path) -> bool:
    return any(FSDD_NAME.fullmatch(f.stem) and f.suffix.lower() in AUDIO_SUFFIXES for f in root.iterdir())


def _fsdd(root: Path, o: Options) -> Loaded:
    """Free Spoken Digit Dataset: ``{digit}_{speaker}_{take}``; text is the digit's word, label the digit. Id: the
    name, with its suffix where two files differ only in it."""
    items = []
    for f in sorted(root.iterdir()):
        m = FSDD_NAME.fullmatch(f.stem)
        if m and f.suffix.lower() in AUDIO_SUFFIXES:
            items.append(Item(f.stem, f, text=DIGITS[int(m[1])], label=m[1], speaker=m[2], fold=int(m[3])))
    return Loaded(_distinct_ids(items, [_path_names(i.path, root) for i in items]))


def _is_librispeech_split(root: Path) -> bool:
    return next(root.glob("*/*/*.trans.txt"), None) is not None


def _is_librispeech(root: Path) -> bool:
    """A split folder (``test-clean``: SPEAKER/CHAPTER/*.trans.txt), or ``LibriSpeech/`` holding split folders."""
    return _is_librispeech_split(root) or next(root.glob("*/*/*/*.trans.txt"), None) is not None


def _librispeech(root: Path, o: Options) -> Loaded:
    """LibriSpeech: ``SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac``, transcripts in ``SPEAKER-CHAPTER.trans.txt``."""
    if _is_librispeech_split(root):
        if o.subset is not None and o.subset != root.name:
            raise MamError(f"{root} is the LibriSpeech split {root.name}; --subset {o.subset} names another")
        split = root
    else:
        splits = sorted(d.name for d in root.iterdir() if d.is_dir() and _is_librispeech_split(d))
        split = root / _pick(splits, o.subset, root, "LibriSpeech split")
    items = []
    for trans in sorted(split.glob("*/*/*.trans.txt")):
        for n, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            utt, _, text = line.strip().partition(" ")
            if utt:
                items.append(Item(utt, _find_audio(trans.parent, utt), text=text.strip(),
                                  speaker=trans.parent.parent.name, listed=f"{trans}, line {n}"))
    return Loaded(items, notes=[f"LibriSpeech split {split.name}"])


# Common Voice: the tsv files of a release that list clips (a path and a sentence), beside clips/
def _cv_tsvs(root: Path) -> list[str]:
    names = []
    for t in sorted(root.glob("*.tsv")):
        with t.open(encoding="utf-8-sig", errors="replace") as f:
            if {"path", "sentence"} <= set(f.readline().rstrip("\r\n").split("\t")):
                names.append(t.stem)
    return names


def _is_commonvoice(root: Path) -> bool:
    return (root / "clips").is_dir() and bool(_cv_tsvs(root))


def _commonvoice(root: Path, o: Options) -> Loaded:
    """A Common Voice release folder: ``clips/*.mp3`` and ``train|dev|test|validated….tsv``; the subset names the
    tsv (test when none is named)."""
    tsv = _pick(_cv_tsvs(root), o.subset or "test", root, "Common Voice tsv")
    return Loaded(_manifest(root / f"{tsv}.tsv", o), notes=[f"Common Voice {tsv}.tsv"], text_field="sentence")


# Hugging Face datasets: save_to_disk folders (arrow IPC streams + state.json) or parquet shards as the Hub serves
# them. Only the small columns are read at load; a clip's bytes are read from its row when the clip is.
TABLE_SUFFIXES = (".parquet", ".arrow")
TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript", "normalized_text")
SPEAKER_COLUMNS = ("speaker_id", "speaker", "client_id")
SHARD_NAME = re.compile(r"(.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?")  # train-00000-of-00002[-hash].parquet


def _parquet_shards(root: Path) -> list[Path]:
    return sorted(p for pattern in ("*.parquet", "*/*.parquet", "*/*/*.parquet") for p in root.glob(pattern))


def _is_hf(root: Path) -> bool:
    return ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file()
            or bool(_parquet_shards(root)))


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MamError(f"{path}: not a readable JSON file ({e})") from None


def _saved_files(folder: Path) -> tuple[str | None, list[Path]]:
    """The arrow files of one ``save_to_disk`` Dataset folder, as its state.json lists them, and its split."""
    state = _json_file(folder / "state.json")
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not (isinstance(files, list) and files
            and all(isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files)):
        raise MamError(f"{folder / 'state.json'}: '_data_files' must be a list of {{\"filename\": ...}}")
    split = state.get("_split")
    return split if isinstance(split, str) else None, [folder / f["filename"] for f in files]


def _shard_split(rel: PurePosixPath) -> str:
    """The split a shard belongs to, from its path: ``data/test-00000-of-00002.parquet`` → data/test,
    ``default/test/0000.parquet`` → default/test, ``test.parquet`` → test."""
    m = SHARD_NAME.fullmatch(rel.stem)
    return str(rel.parent / m[1] if m else rel.parent if rel.stem.isdigit() else rel.with_suffix(""))


def _hf_splits(root: Path) -> dict[str, list[Path]]:
    """Split name → its table files: a single file, a save_to_disk DatasetDict or Dataset, or parquet shards named
    ``[config/]split-00000-of-00001.parquet`` or ``config/split/0000.parquet``."""
    if root.is_file():
        return {_shard_split(PurePosixPath(root.name)): [root]}
    if (root / "dataset_dict.json").is_file():
        listing = _json_file(root / "dataset_dict.json")
        names = listing.get("splits") if isinstance(listing, dict) else None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise MamError(f"{root / 'dataset_dict.json'}: 'splits' must be a list of split names")
        return {n: _saved_files(root / n)[1] for n in names}
    if (root / "state.json").is_file():
        split, files = _saved_files(root)
        return {split or root.name: files}
    groups: dict[str, list[Path]] = {}
    for shard in _parquet_shards(root):
        groups.setdefault(_shard_split(PurePosixPath(shard.relative_to(root).as_posix())), []).append(shard)
    while len(groups) > 1 and len({n.split("/", 1)[0] for n in groups}) == 1 and all("/" in n for n in groups):
        groups = {n.split("/", 1)[1]: files for n, files in groups.items()}  # data/test → test
    return groups


def _schema(path: Path) -> pa.Schema:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            return pq.read_schema(path)
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_stream(src).schema
    except (OSError, pa.ArrowException) as e:
        raise MamError(f"{path}: not a readable {path.suffix[1:]} table ({e})") from None


def _stamp(path: Path) -> tuple[int, int]:
    """Part of every cache key below: a table file rewritten in place is read again, not served stale."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=8)
def _arrow_table(path: Path, stamp: tuple[int, int]) -> pa.Table:
    """A save_to_disk shard, memory-mapped: reading a column copies nothing until a cell is taken."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()  # the buffers keep the mapping alive


def _read_columns(path: Path, columns: list[str]) -> pa.Table:
    """Some columns of a shard (for parquet, ``audio.path`` reads the audio cells' paths without their bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            table = pq.ParquetFile(path).read(columns=columns)
        else:
            table = _arrow_table(path, _stamp(path)).select(columns)
    except (OSError, KeyError, pa.ArrowException) as e:
        raise MamError(f"{path}: cannot read columns {', '.join(columns)} ({e})") from None
    return table


def _features(schema: pa.Schema) -> dict[str, Any]:
    """The ``datasets`` features written into the schema's metadata (column types such as Audio, ClassLabel)."""
    try:
        feats = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]
    except (KeyError, TypeError, ValueError):
        return {}
    return feats if isinstance(feats, dict) else {}


def _audio_column(schema: pa.Schema, feats: dict[str, Any], where: Path) -> str:
    import pyarrow as pa

    def is_cell(t: pa.DataType) -> bool:
        return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"bytes", "path"}

    found = [n for n in schema.names if isinstance(feats.get(n), dict) and feats[n].get("_type") == "Audio"]
    found = found or [n for n in schema.names if is_cell(schema.field(n).type)]
    if not found:
        raise MamError(f"{where}: no audio column (of {{bytes, path}} cells); columns: {', '.join(schema.names)}")
    if len(found) > 1 and "audio" not in found:
        raise MamError(f"{where}: several audio columns ({', '.join(found)}); mam reads one named 'audio'")
    return "audio" if len(found) > 1 else found[0]


def _hf(root: Path, o: Options) -> Loaded:
    """A Hugging Face dataset on disk: an audio column of ``{bytes, path}`` cells and a text or label column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    splits = _hf_splits(root)
    split = _pick(sorted(splits), o.subset, root, "split")
    files = splits[split]
    for f in files:
        if not f.is_file():
            raise MamError(f"{f}: missing (listed by the dataset's state.json)")
    schema = _schema(files[0])
    feats, names = _features(schema), schema.names
    audio = _audio_column(schema, feats, files[0])
    for opt, col in (("--text-column", o.text_column), ("--label-column", o.label_column)):
        if col is not None and col not in names:
            raise MamError(f"{files[0]}: no column {col!r} for {opt}; columns: {', '.join(names)}")
    text = o.text_column or next((c for c in TEXT_COLUMNS if c in names), None)
    label = o.label_column or ("label" if "label" in names else None)
    if text is None and label is None:
        raise MamError(f"{files[0]}: no text column ({', '.join(TEXT_COLUMNS)}) or label column; columns: "
                       f"{', '.join(names)}; name one with --text-column or --label-column")
    speaker = next((c for c in SPEAKER_COLUMNS if c in names), None)
    declared = feats.get(label) if label else None  # a ClassLabel: ints in the table, names in the features
    class_names = declared.get("names") if isinstance(declared, dict) else None
    if not (isinstance(class_names, list) and all(isinstance(n, str) for n in class_names)):
        class_names = None
    wanted = [c for c in dict.fromkeys(("id", text, label, speaker)) if c in names]
    has_path = pa.types.is_struct(schema.field(audio).type)

    rows: list[tuple[Path, int, dict[str, Any], str | None]] = []
    for f in files:
        inner_col = [(f"{audio}.path" if f.suffix == ".parquet" else audio)] if has_path else []
        table = _read_columns(f, [*wanted, *inner_col])
        cols = {c: table.column(c).to_pylist() for c in wanted}
        inner = pc.struct_field(table.column(audio), "path").to_pylist() if has_path else [None] * table.num_rows
        rows += [(f, i, {c: v[i] for c, v in cols.items()}, inner[i]) for i in range(table.num_rows)]
    _need_mp3((p for *_, p in rows if isinstance(p, str)), str(root))

    def value(v: Any, col: str) -> str | None:
        if v is None or (col == label and class_names and isinstance(v, int) and v < 0):  # -1: no label
            return None
        if col == label and class_names and isinstance(v, int):
            if v >= len(class_names):
                raise MamError(f"{root}: label {v} in column {col!r} is outside its {len(class_names)} class names")
            return class_names[v]
        return str(v)

    items = [Item("", f, text=value(cells.get(text), text) if text else None,
                  label=value(cells.get(label), label) if label else None,
                  speaker=value(cells.get(speaker), speaker) if speaker else None, row=TableRow(audio, i))
             for f, i, cells, _ in rows]
    items = _table_ids(items, [value(cells.get("id"), "id") for _, _, cells, _ in rows], [p for *_, p in rows])
    notes = [f"split {split}", f"audio column {audio}", *([f"text column {text}"] if text else []),
             *([f"label column {label}"] if label else [])]
    return Loaded(items, notes=notes, all_labels=sorted(class_names or []), text_field=text)


def _table_ids(items: list[Item], ids: list[str | None], paths: list[Any]) -> list[Item]:
    """A table's clip ids: its ``id`` column where that names every row once; else the audio cells' file names
    (paths where names collide), where every cell has one and no two are one; else the row number. An ``id`` that
    repeats is not an error here: some datasets' ``id`` names the sentence, read by several speakers (FLEURS)."""
    if None not in ids and len(set(ids)) == len(ids):
        return [replace(item, id=str(i)) for item, i in zip(items, ids, strict=True)]
    if all(isinstance(p, str) and p for p in paths):
        names = [(PurePosixPath(p).stem, str(PurePosixPath(p).with_suffix("")), p) for p in paths]
        named = _distinct_ids(items, names)
        if len({i.id for i in named}) == len(named):
            return named
    return [replace(item, id=f"{n:0{max(6, len(str(len(items))))}d}") for n, item in enumerate(items)]


@functools.lru_cache(maxsize=4)
def _row_group(path: Path, stamp: tuple[int, int], column: str, group: int) -> pa.ChunkedArray:
    """One parquet row group of the audio column (a few hundred clips at most), kept while neighbours are read."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(column)


@functools.lru_cache(maxsize=64)
def _group_starts(path: Path, stamp: tuple[int, int]) -> list[int]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    starts = [0]
    for g in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(g).num_rows)
    return starts


def _table_cell(path: Path, row: TableRow) -> Any:
    """The row's audio cell (``{bytes, path}`` or bytes): a parquet row group or a memory-mapped arrow shard."""
    import bisect

    import pyarrow as pa

    try:
        stamp = _stamp(path)
        if path.suffix == ".parquet":
            starts = _group_starts(path, stamp)
            group = bisect.bisect_right(starts, row.index) - 1
            return _row_group(path, stamp, row.column, group)[row.index - starts[group]].as_py()
        return _arrow_table(path, stamp).column(row.column)[row.index].as_py()
    except (OSError, KeyError, IndexError, pa.ArrowException) as e:
        raise AudioError(f"{path} row {row.index}: cannot read the table ({e})") from None


class Corpus(NamedTuple):
    """A corpus kind: its reader, its layout check and what the layout is (for the error)."""

    read: Callable[[Path, Options], Loaded]
    has_layout: Callable[[Path], bool]
    layout: str
    options: tuple[str, ...] = ()  # the keyword options of load_dataset it takes beyond text_field and mic
    files: tuple[str, ...] = ()  # suffixes of a single file that is a whole dataset of this kind


HF = Corpus(_hf, _is_hf, "Hugging Face layout: a save_to_disk folder (state.json and arrow files), "
                         "or parquet shards with an audio column", ("subset", "text_column", "label_column"),
            TABLE_SUFFIXES)
CORPORA: dict[str, Corpus] = {
    "ljspeech": Corpus(_ljspeech, _is_ljspeech, "LJ Speech layout: metadata.csv and wavs/"),
    "vctk": Corpus(_vctk, _is_vctk, "VCTK layout: txt/<spk>/*.txt and wav48*/<spk>/"),
    "esc50": Corpus(_esc50, _is_esc50, "ESC-50 layout: meta/esc50.csv and audio/"),
    "folders": Corpus(_folders, _is_folders, "one folder of audio files per class"),
    "fsdd": Corpus(_fsdd, _is_fsdd, "FSDD layout: recordings named digit_speaker_take"),
    "librispeech": Corpus(_librispeech, _is_librispeech,
                          "LibriSpeech layout: SPEAKER/CHAPTER/*.flac with SPEAKER-CHAPTER.trans.txt", ("subset",)),
    "commonvoice": Corpus(_commonvoice, _is_commonvoice,
                          "Common Voice layout: clips/ and train|dev|test.tsv with path and sentence columns",
                          ("subset",)),
    "hf": HF,
    "parquet": HF,
}
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
MANIFEST_OPTIONS = ("text_column", "label_column")
KINDS = (*CORPORA, "manifest")


def corpus_root(kind: str, path: Path) -> Path:
    """``path`` when it has the corpus's layout, else its one subfolder that has it (archives unpack
    into ``LJSpeech-1.1/``, ``ESC-50-master/``, ``recordings/``, ``LibriSpeech/``)."""
    corpus = CORPORA[kind]
    if path.is_file() and path.suffix.lower() in corpus.files:
        return path
    if not path.is_dir():
        raise MamError(f"{path}: not a folder (a {kind} dataset is a folder in the {corpus.layout})")
    if corpus.has_layout(path):
        return path
    inside = [d for d in sorted(path.iterdir()) if d.is_dir() and corpus.has_layout(d)]
    if len(inside) == 1:
        return inside[0]
    if inside:
        raise MamError(f"{path}: several folders inside have the {corpus.layout} "
                       f"({', '.join(d.name for d in inside)}); name one")
    raise MamError(f"{path}: not in the {corpus.layout}")


# ---- manifests ---------------------------------------------------------------------------------

# accepted column names, first found wins: mam's own, HF audiofolder (file_name), NeMo (audio_filepath, text),
# SpeechBrain (ID, wav, wrd, spk_id), Common Voice (path, sentence, client_id)
AUDIO_COLUMNS = ("audio", "path", "file", "filename", "file_name", "audio_filepath", "wav")
MANIFEST_TEXT = ("text", "sentence", "wrd", "transcription", "transcript")
ID_COLUMNS = ("id", "ID", "utt_id")
MANIFEST_SPEAKER = ("speaker", "speaker_id", "spk_id", "client_id")


def _manifest_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV, TSV or JSON-lines file; UTF-8 with or without a byte-order mark."""
    if path.is_dir():
        raise MamError(f"{path}: a folder, not a manifest file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise MamError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the manifest as UTF-8") \
            from None
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise MamError(f"{path}, line {n}: invalid JSON ({e}); a manifest holds one JSON object a line") \
                    from None
            if not isinstance(row, dict):
                raise MamError(f"{path}, line {n}: a JSON {type(row).__name__}, not an object; a manifest holds one "
                               "JSON object a line")
            yield n, row
        return
    # TSV as Common Voice and Kaldi-style tools write it: no quoting, so a sentence may hold a quote
    tsv = path.suffix.lower() == ".tsv"
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    try:
        if not reader.fieldnames:
            raise MamError(f"{path}: empty manifest (no header row)")
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k is not None}
    except csv.Error as e:
        raise MamError(f"{path}, line {reader.line_num}: {e}") from None


def _field(row: dict[str, Any], keys: Iterable[str], at: str, what: str,
           types: tuple[type, ...] = (str,)) -> tuple[str | None, Any]:
    """The first of ``keys`` that the row fills, and its value, checked to be one of ``types``."""
    key = next((k for k in keys if row.get(k) not in (None, "")), None)
    if key is None:
        return None, None
    v = row[key]
    if not isinstance(v, types) or isinstance(v, bool):
        raise MamError(f"{at}: field {key!r} must be {what}, not {json.dumps(v)[:40]}")
    return key, v


def _number(row: dict[str, Any], key: str, at: str, cast: type[int] | type[float]) -> Any:
    """An integer (fold) or a number (offset), written as such in JSON or as text in CSV."""
    what = "an integer" if cast is int else "a number"
    _, v = _field(row, (key,), at, what, (int, str) if cast is int else (int, float, str))
    try:
        return None if v is None else cast(v)
    except ValueError:
        raise MamError(f"{at}: field {key!r} must be {what}, not {v!r}") from None


def _manifest(path: Path, o: Options) -> list[Item]:
    """Rows with an audio path (see AUDIO_COLUMNS) and a transcript or a label; relative paths are from the
    manifest's folder (a Common Voice tsv's from ``clips/`` beside it). Id: the row's id column; else the file's
    stem, or, where two rows' stems collide, their paths from that folder (see :func:`_distinct_ids`)."""
    text_cols = (o.text_column,) if o.text_column else MANIFEST_TEXT
    items, names = [], []
    for n, r in _manifest_rows(path):
        at = f"{path}, line {n}"
        audio_key, audio = _field(r, AUDIO_COLUMNS, at, "a path (a string)")
        if audio is None:
            raise MamError(f"{at}: no audio field; found: {', '.join(map(str, r)) or 'nothing'}; "
                           f"accepted: {', '.join(AUDIO_COLUMNS)}")
        _, text = _field(r, text_cols, at, "a string")
        _, label = _field(r, (o.label_column or "label",), at, "a string or an integer", (str, int))
        _, id_ = _field(r, ID_COLUMNS, at, "a string or an integer", (str, int))
        _, speaker = _field(r, MANIFEST_SPEAKER, at, "a string or an integer", (str, int))
        if _number(r, "offset", at, float):
            raise MamError(f"{at}: offset {r['offset']} names a segment of a longer file; mam reads whole files, so "
                           "cut the segments into files first")
        base = path.parent
        if audio_key == "path" and "sentence" in r and (path.parent / "clips").is_dir():
            base = path.parent / "clips"  # Common Voice: the tsv lies beside clips/
        p = Path(audio) if Path(audio).is_absolute() else base / audio
        names.append((str(id_),) if id_ is not None else _path_names(p, base))
        items.append(Item(names[-1][0], p, text=text, label=None if label is None else str(label),
                          fold=_number(r, "fold", at, int), speaker=None if speaker is None else str(speaker),
                          listed=at))
    return _distinct_ids(items, names)


def load_dataset(spec: str, text_field: str = "normalized", mic: str = "mic1", *, subset: str | None = None,
                 text_column: str | None = None, label_column: str | None = None) -> Dataset:
    """Parse ``KIND:PATH`` or a manifest path into a :class:`Dataset` (clips are read later). ``subset`` picks a
    corpus's own split (LibriSpeech ``test-clean``, a Common Voice tsv, a Hugging Face split); ``text_column`` and
    ``label_column`` name the columns of a Hugging Face dataset or a manifest."""
    o = Options(text_field, mic, subset, text_column, label_column)
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        if sep and re.fullmatch(r"[A-Za-z][\w-]*", kind) and Path(spec).suffix.lower() not in MANIFEST_SUFFIXES:
            raise MamError(f"dataset {spec!r}: unknown kind {kind!r}; known kinds: {', '.join(KINDS[:-1])}, "
                           f"or a {'/'.join(MANIFEST_SUFFIXES)} manifest")
        kind, rest = "manifest", spec
    path = Path(rest).expanduser()
    takes = MANIFEST_OPTIONS if kind == "manifest" else CORPORA[kind].options
    for name in ("subset", "text_column", "label_column"):
        if getattr(o, name) is not None and name not in takes:
            users = [k for k, c in CORPORA.items() if name in c.options] + ["manifest"] * (name in MANIFEST_OPTIONS)
            raise MamError(f"--{name.replace('_', '-')} does not apply to a {kind} dataset (it does to "
                           f"{', '.join(users)})")
    if not path.exists():
        raise MamError(f"dataset {spec!r}: {path} does not exist")
    if kind == "manifest":
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise MamError(f"dataset {spec!r}: use KIND:PATH with KIND one of {', '.join(KINDS[:-1])}, "
                           f"or a {'/'.join(MANIFEST_SUFFIXES)} manifest")
        loaded = Loaded(_manifest(path, o))
    else:
        path = corpus_root(kind, path)
        loaded = CORPORA[kind].read(path, o)
    if not loaded.items:
        raise MamError(f"dataset {spec!r} holds no clips")
    _need_mp3((i.path.name for i in loaded.items if i.row is None), f"dataset {spec!r}")
    return Dataset(spec, kind, path, loaded.items, loaded.text_field, loaded.notes, loaded.all_labels)


def own_split(spec: str, part: str, subset: str | None) -> tuple[str | None, str]:
    """(subset, split for :func:`select`) of a part of the data: dev, test or all, or train (what finetune trains
    on: outside the seeded dev split). Common Voice ships its own train.tsv, dev.tsv and test.tsv: there a part
    reads its tsv whole, unless --subset names a tsv; elsewhere the part is a seeded split of one set."""
    if spec.partition(":")[0] == "commonvoice" and subset is None and part in ("train", "dev", "test"):
        return part, "all"
    return subset, "test" if part == "train" else part


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
        have = sorted({i.fold for i in items if i.fold is not None})
        missing = [f for f in folds if f not in have]
        if missing:
            raise MamError(f"fold {missing[0]} does not exist in {ds.spec!r} (it has folds "
                           f"{', '.join(map(str, have))})")
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
            audio = load_clip(item, rate)
            why = usable(audio) if usable is not None else None
            if why is not None:
                raise AudioError(f"{item.where}: {why}")
            clip = Clip(item, audio)
        except AudioError as e:
            if strict:
                raise
            if bad is not None:
                bad.append({"id": item.id, "path": item.where, "error": str(e)})
        else:
            yield clip
        if ticker:
            ticker(n, len(ds.items))
