"""Dataset specs and audio on the shared real clips: readers, resampling, splits, bad clips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from conftest import SHARED
from mamcli.data import iter_clips, load_audio, load_dataset, select
from mamcli.errors import MamError

LJ = f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1"
ESC50 = f"esc50:{SHARED}/esc50-fold4/ESC-50"
ESC10 = f"folders:{SHARED}/esc10/ESC-10"
FSDD = f"fsdd:{SHARED}/fsdd/recordings"


def test_ljspeech_reader_and_normalised_text():
    ds = load_dataset(LJ)
    assert len(ds.items) == 385
    first = next(i for i in ds.items if i.id == "LJ001-0001")
    assert first.text.startswith("Printing, in the only sense") and first.path.suffix == ".flac"
    raw = load_dataset(LJ, text_field="raw")
    assert {i.id for i in raw.items} == {i.id for i in ds.items}


def test_esc50_folds_and_esc10_folders_and_fsdd():
    esc = load_dataset(ESC50)
    fold4 = select(esc, folds=[4])
    assert len(fold4.items) == 400 and len(fold4.labels) == 50
    esc10 = load_dataset(ESC10)
    assert len(esc10.items) == 400 and len(esc10.labels) == 10 and "Dog bark" in esc10.labels
    assert {i.fold for i in esc10.items} == {1, 2, 3, 4, 5}
    fsdd = load_dataset(FSDD)
    assert len(fsdd.items) == 3000 and fsdd.items[0].text in ("zero", "one", "two", "three", "four", "five", "six",
                                                              "seven", "eight", "nine")


@pytest.mark.parametrize("kind,top,inner", [("ljspeech", "ljspeech-385", "LJSpeech-1.1"),
                                            ("esc50", "esc50-fold4", "ESC-50"), ("folders", "esc10", "ESC-10"),
                                            ("fsdd", "fsdd", "recordings")])
def test_archive_top_folder_finds_the_corpus_inside(kind, top, inner):
    """Archives unpack into one folder (LJSpeech-1.1/, ESC-50-master/): naming the folder above works."""
    ds = load_dataset(f"{kind}:{SHARED}/{top}")
    assert ds.root == SHARED / top / inner
    assert [i.path for i in ds.items] == [i.path for i in load_dataset(f"{kind}:{SHARED}/{top}/{inner}").items]


def test_several_corpora_inside_is_an_error_naming_them(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metadata.csv").write_text("x|y|y\n")
    with pytest.raises(MamError, match=r"several folders inside .*\(a, b\)"):
        load_dataset(f"ljspeech:{tmp_path}")


def test_audio_is_mono_and_resampled_with_soxr():
    import soxr

    path = SHARED / "fsdd/recordings/0_george_0.flac"
    raw, sr = sf.read(str(path), dtype="float32")
    assert sr == 8000
    y = load_audio(path, 16000)
    assert y.dtype == np.float32 and y.ndim == 1 and len(y) == 2 * len(raw)
    np.testing.assert_array_equal(y, soxr.resample(raw, 8000, 16000, quality="HQ"))
    ogg = next((SHARED / "esc10/ESC-10").glob("*/*.ogg"))
    assert load_audio(ogg, 16000).shape[0] == pytest.approx(sf.info(str(ogg)).duration * 16000, abs=2)


def test_stereo_is_mixed(tmp_path):
    left, right = np.ones(1600, np.float32) * 0.5, np.zeros(1600, np.float32)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1), 16000)
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav", 16000), 0.25, atol=1e-4)


def test_splits_are_seeded_disjoint_and_stable():
    ds = load_dataset(LJ)
    dev, test = select(ds, "dev", 0.2, seed=3), select(ds, "test", 0.2, seed=3)
    assert {i.id for i in dev.items} & {i.id for i in test.items} == set()
    assert len(dev.items) + len(test.items) == 385 and 40 < len(dev.items) < 120
    assert [i.id for i in select(ds, "dev", 0.2, seed=3).items] == [i.id for i in dev.items]
    assert [i.id for i in select(ds, "dev", 0.2, seed=4).items] != [i.id for i in dev.items]
    # stable under removal of other clips
    smaller = type(ds)(ds.spec, ds.kind, ds.root, ds.items[::2])
    assert {i.id for i in select(smaller, "dev", 0.2, seed=3).items} <= {i.id for i in dev.items}
    assert len(select(ds, limit=5).items) == 5


def test_manifests_and_bad_clips(tmp_path):
    good = SHARED / "fsdd/recordings/1_jackson_0.flac"
    (tmp_path / "broken.wav").write_bytes(b"RIFF nonsense")
    rows = [{"audio": str(good), "text": "one"}, {"audio": "broken.wav", "text": "x"},
            {"audio": "missing.flac", "text": "y"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(f"{r['audio']},{r['text']}" for r in rows))
    for name in ("m.jsonl", "m.csv"):
        ds = load_dataset(str(tmp_path / name))
        bad: list[dict[str, str]] = []
        clips = list(iter_clips(ds, 16000, bad=bad))
        assert [c.item.id for c in clips] == ["1_jackson_0"]
        assert [b["id"] for b in bad] == ["broken", "missing"] and "broken.wav" in bad[0]["error"]
        with pytest.raises(MamError, match=r"broken\.wav"):
            list(iter_clips(ds, 16000, strict=True))


@pytest.mark.parametrize("spec,needle", [("ljspeech:/nope", "does not exist"), (str(SHARED / "README.md"), "KIND:PATH"),
                                         (f"esc50:{SHARED}/fsdd", "not in the ESC-50 layout"),
                                         (f"fsdd:{SHARED}/README.md", "not a folder")])
def test_bad_specs(spec, needle):
    with pytest.raises(MamError, match=needle):
        load_dataset(spec)


def test_vctk_layout_with_mic_suffixes(tmp_path):
    """VCTK: txt/<spk>/<utt>.txt with audio under wav48*/<spk>/, with or without _mic1/_mic2."""
    rng = np.random.default_rng(0)
    for spk, utt, name, folder in (("p225", "p225_001", "p225_001_mic1.flac", "wav48_silence_trimmed"),
                                   ("p225", "p225_002", "p225_002_mic2.flac", "wav48_silence_trimmed"),
                                   ("p226", "p226_001", "p226_001.wav", "wav48")):
        (tmp_path / "txt" / spk).mkdir(parents=True, exist_ok=True)
        (tmp_path / "txt" / spk / f"{utt}.txt").write_text(f"Please call {utt}.\n")
        (tmp_path / folder / spk).mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / folder / spk / name, rng.standard_normal(4800).astype(np.float32) * 0.1, 48000)
    ds = load_dataset(f"vctk:{tmp_path}", mic="mic1")
    by_id = {i.id: i for i in ds.items}
    assert set(by_id) == {"p225_001", "p225_002", "p226_001"}
    assert by_id["p225_001"].path.name == "p225_001_mic1.flac" and by_id["p225_001"].speaker == "p225"
    assert by_id["p225_001"].text == "Please call p225_001."
    bad: list[dict[str, str]] = []
    clips = list(iter_clips(ds, 16000, bad=bad))
    assert {c.item.id for c in clips} == {"p225_001", "p226_001"} and len(clips[0].audio) == 1600
    assert [b["id"] for b in bad] == ["p225_002"]  # only a mic2 take exists: named, not fatal
    assert {i.path.name for i in load_dataset(f"vctk:{tmp_path}", mic="mic2").items} >= {"p225_002_mic2.flac"}


# ---- manifests as the ecosystems write them ------------------------------------------------------

CLIPS = [SHARED / "fsdd/recordings/1_jackson_0.flac", SHARED / "fsdd/recordings/2_theo_1.flac"]
WORDS = ["one", '"two," he said']  # a quote inside a field: TSV is read without quoting, CSV with
# flavour -> (columns, where the audio lies, expected id / speaker of clip k)
FLAVOURS = {
    "audiofolder": (("file_name", "transcription"), "beside"),  # HF audiofolder metadata.csv / .jsonl
    "nemo": (("audio_filepath", "duration", "text"), "absolute"),  # NeMo JSON lines
    "speechbrain": (("ID", "duration", "wav", "spk_id", "wrd"), "absolute"),  # SpeechBrain csv
    "commonvoice": (("client_id", "path", "sentence", "up_votes"), "clips"),  # Common Voice tsv, beside clips/
}


def _write_manifest(path, columns: tuple[str, ...], rows: list[dict[str, object]]) -> None:
    import csv

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    if path.suffix == ".tsv":  # as Common Voice writes it: tab-separated, nothing quoted
        path.write_text("".join("\t".join(map(str, line)) + "\n" for line in [columns, *[r.values() for r in rows]]))
        return
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows([[r[c] for c in columns] for r in rows])


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_manifest_flavours_in_every_format(tmp_path, flavour, suffix):
    import shutil

    columns, where = FLAVOURS[flavour]
    rows = []
    for k, (clip, words) in enumerate(zip(CLIPS, WORDS, strict=True)):
        if where == "absolute":
            audio = str(clip)
        else:
            folder = tmp_path / "clips" if where == "clips" else tmp_path / "sub"
            folder.mkdir(exist_ok=True)
            shutil.copy(clip, folder / clip.name)
            audio = clip.name if where == "clips" else f"sub/{clip.name}"
        values = [audio if c in ("file_name", "audio_filepath", "wav", "path") else
                  words if c in ("transcription", "text", "wrd", "sentence") else
                  f"utt{k}" if c == "ID" else f"spk{k}" if c in ("spk_id", "client_id") else 1.5 for c in columns]
        rows.append(dict(zip(columns, values, strict=True)))
    _write_manifest(tmp_path / f"m{suffix}", columns, rows)
    ds = load_dataset(str(tmp_path / f"m{suffix}"))
    assert [i.text for i in ds.items] == WORDS
    assert [i.id for i in ds.items] == (["utt0", "utt1"] if flavour == "speechbrain" else [c.stem for c in CLIPS])
    assert [i.speaker for i in ds.items] == (["spk0", "spk1"] if flavour in ("speechbrain", "commonvoice")
                                             else [None, None])
    clips = list(iter_clips(ds, 16000))
    assert len(clips) == 2
    for clip, original in zip(clips, CLIPS, strict=True):
        np.testing.assert_array_equal(clip.audio, load_audio(original, 16000))
    if suffix == ".jsonl":  # NeMo names its JSON-lines manifests .json
        (tmp_path / "m.json").write_bytes((tmp_path / "m.jsonl").read_bytes())
        assert [i.path for i in load_dataset(str(tmp_path / "m.json")).items] == [i.path for i in ds.items]


def test_spreadsheet_csv_with_bom_and_crlf(tmp_path):
    (tmp_path / "m.csv").write_bytes(("\ufefffile_name,label\r\n" + "".join(f"{c},{c.stem[0]}\r\n" for c in CLIPS))
                                     .encode("utf-8"))
    ds = load_dataset(str(tmp_path / "m.csv"))
    assert [i.path for i in ds.items] == CLIPS and [i.label for i in ds.items] == ["1", "2"]
    assert ds.labels == ["1", "2"]


def test_manifest_columns_are_named_by_options(tmp_path):
    (tmp_path / "m.csv").write_text(f"wav,wrd,raw,category\n{CLIPS[0]},one,One!,digit\n")
    item = load_dataset(str(tmp_path / "m.csv"), text_column="raw", label_column="category").items[0]
    assert (item.text, item.label) == ("One!", "digit")
    with pytest.raises(MamError, match=r"--subset does not apply to a manifest dataset \(it does to librispeech, "
                                       r"commonvoice, hf, parquet\)"):
        load_dataset(str(tmp_path / "m.csv"), subset="test")


@pytest.mark.parametrize("name,content,needle", [
    ("m.csv", "clip,words\na.wav,hi\n",
     r"m\.csv, line 2: no audio field; found: clip, words; accepted: audio, path, file, filename, file_name, "
     r"audio_filepath, wav"),
    ("m.jsonl", '{"audio_filepath": 5, "text": "x"}\n',
     r"m\.jsonl, line 1: field 'audio_filepath' must be a path \(a string\), not 5"),
    ("m.jsonl", '{"text": "x", "audio": "a.wav"}\n{"audio_filepath": ["a.wav"], "text": "x"}\n',
     r"m\.jsonl, line 2: field 'audio_filepath' must be a path \(a string\), not \[\"a\.wav\"\]"),
    ("m.jsonl", '{"audio": "a.wav", "text": {"words": 1}}\n', r"line 1: field 'text' must be a string, not \{"),
    ("m.jsonl", '{"audio": "a.wav", "label": 1.5}\n', r"field 'label' must be a string or an integer, not 1\.5"),
    ("m.jsonl", '\n\n{"audio": "a.wav"\n', r"m\.jsonl, line 3: invalid JSON"),
    ("m.jsonl", '["a.wav", "x"]\n', r"line 1: a JSON list, not an object"),
    ("m.csv", "path,text,fold\na.wav,x,1\nb.wav,y,first\n", r"m\.csv, line 3: field 'fold' must be an integer, not "
                                                            r"'first'"),
    ("m.jsonl", '{"audio_filepath": "a.wav", "offset": 2.5, "duration": 1}\n',
     r"line 1: offset 2\.5 names a segment of a longer file"),
    ("m.csv", b"path,text\na.wav,caf\xe9\n", r"m\.csv, line 2: not UTF-8 text \(byte 0xe9\)"),
    ("m.csv", "", r"m\.csv: empty manifest \(no header row\)"),
])
def test_bad_manifests_are_one_line_naming_file_line_and_field(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(MamError, match=needle) as e:
        load_dataset(str(tmp_path / name))
    assert "\n" not in str(e.value)


def test_a_folder_named_like_a_manifest(tmp_path):
    (tmp_path / "m.csv").mkdir()
    with pytest.raises(MamError, match=r"m\.csv: a folder, not a manifest file"):
        load_dataset(str(tmp_path / "m.csv"))


def test_random_manifests_give_a_dataset_or_one_line(tmp_path):
    """Random bytes and random JSON values (seeded): every outcome is a Dataset or a MamError, never another
    exception (which the CLI would report as an internal error)."""
    rng = np.random.default_rng(0)
    keys = ["audio", "path", "file_name", "audio_filepath", "wav", "text", "wrd", "label", "id", "fold", "offset",
            "speaker", "x"]

    def value(depth: int = 0) -> object:
        makers = [lambda: None, lambda: True, lambda: int(rng.integers(-5, 5)), lambda: float(rng.normal()),
                  lambda: "a.wav", lambda: "", lambda: [value(depth + 1)], lambda: {"k": value(depth + 1)}]
        return makers[int(rng.integers(8 if depth < 2 else 6))]()

    outcomes = set()
    for n in range(300):
        suffix = (".csv", ".tsv", ".jsonl")[n % 3]
        path = tmp_path / f"r{n}{suffix}"
        if n % 2:
            head = b"path,text\n" if suffix != ".jsonl" else b""
            path.write_bytes(head + rng.integers(0, 256, int(rng.integers(0, 60)), dtype=np.uint8).tobytes())
        elif suffix == ".jsonl":
            rows = [{str(rng.choice(keys)): value() for _ in range(3)} for _ in range(2)]
            path.write_text("\n".join(json.dumps(r) for r in rows))
        else:
            cols = [str(rng.choice(keys)) for _ in range(3)]
            path.write_text(",".join(cols) + "\n" + ",".join(str(value()) for _ in cols) + "\n")
        try:
            load_dataset(str(path))
            outcomes.add("dataset")
        except MamError as e:
            assert "\n" not in str(e)
            outcomes.add("error")
    assert outcomes == {"dataset", "error"}


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(MamError, match=r"dataset 'foo:/data/x': unknown kind 'foo'; known kinds: ljspeech, vctk, "
                                       r"esc50, folders, fsdd, librispeech, commonvoice, hf, parquet, or a "
                                       r"\.csv/\.tsv/\.jsonl/\.json manifest"):
        load_dataset("foo:/data/x")
    with pytest.raises(MamError, match="does not exist"):  # a manifest whose path holds a colon is still a manifest
        load_dataset("foo:/data/x.csv")
