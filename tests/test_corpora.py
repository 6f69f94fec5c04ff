"""LibriSpeech, Common Voice and Hugging Face (save_to_disk arrow, Hub parquet) read end to end.

Each test builds a tiny copy of the corpus's real layout in its temp folder from real clips of ../shared/data and
reads it back through load_dataset and iter_clips: the audio must equal load_audio of the file it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from conftest import SHARED
from mamcli.data import iter_clips, load_audio, load_dataset, own_split, select
from mamcli.errors import MamError

LJ = SHARED / "ljspeech-385/LJSpeech-1.1"
ESC = SHARED / "esc50-fold4/ESC-50"
RATE = 16000


def _lj(n: int) -> list[tuple[Path, str]]:
    """n real LJ Speech clips (22,050 Hz FLAC) with their normalised transcripts."""
    rows = [line.split("|") for line in (LJ / "metadata.csv").read_text(encoding="utf-8").splitlines()[:n]]
    return [(LJ / "wavs" / f"{r[0]}.flac", r[2]) for r in rows]


def _copy_flac(src: Path, dst: Path) -> None:
    """Rewrite the clip's 16-bit samples losslessly: the copy decodes to exactly the original's samples."""
    data, sr = sf.read(str(src), dtype="int16")
    dst.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(dst), data, sr, subtype="PCM_16", format="FLAC")


def _assert_audio(ds, originals: dict[str, Path]) -> None:
    bad: list[dict[str, str]] = []
    clips = list(iter_clips(ds, RATE, bad=bad))
    assert bad == [] and {c.item.id for c in clips} == set(originals)
    for c in clips:
        np.testing.assert_array_equal(c.audio, load_audio(originals[c.item.id], RATE))


# ---- LibriSpeech ---------------------------------------------------------------------------------

@pytest.fixture
def librispeech(tmp_path: Path) -> tuple[Path, dict[str, tuple[Path, str]]]:
    """LibriSpeech/{test-clean,dev-clean}/SPEAKER/CHAPTER/ with SPEAKER-CHAPTER.trans.txt, as the archives unpack."""
    clips = _lj(5)
    layout = {"test-clean": [("1089", "134686"), ("1089", "134686"), ("121", "121726")],
              "dev-clean": [("84", "121123"), ("84", "121123")]}
    utts: dict[str, tuple[Path, str]] = {}
    k = 0
    for split, chapters in layout.items():
        lines: dict[Path, list[str]] = {}
        for n, (spk, ch) in enumerate(chapters):
            src, text = clips[k]
            k += 1
            utt = f"{spk}-{ch}-{n:04d}"
            folder = tmp_path / "LibriSpeech" / split / spk / ch
            _copy_flac(src, folder / f"{utt}.flac")
            lines.setdefault(folder / f"{spk}-{ch}.trans.txt", []).append(f"{utt} {text.upper()}")
            utts[utt] = (src, text.upper())
        for trans, rows in lines.items():
            trans.write_text("\n".join(rows) + "\n")
    (tmp_path / "LibriSpeech" / "SPEAKERS.TXT").write_text(";ID |SEX| SUBSET\n")
    return tmp_path, utts


def test_librispeech_split_folder_reads_every_utterance(librispeech):
    root, utts = librispeech
    ds = load_dataset(f"librispeech:{root}/LibriSpeech/test-clean")
    assert [i.id for i in ds.items] == ["1089-134686-0000", "1089-134686-0001", "121-121726-0002"]
    assert [i.text for i in ds.items] == [t.upper() for _, t in _lj(3)]
    assert [i.speaker for i in ds.items] == ["1089", "1089", "121"] and ds.notes == ["LibriSpeech split test-clean"]
    _assert_audio(ds, {i.id: utts[i.id][0] for i in ds.items})


def test_librispeech_top_folder_needs_a_subset(librispeech):
    root, utts = librispeech
    with pytest.raises(MamError, match=r"several LibriSpeech splits \(dev-clean, test-clean\); pick one with "
                                       r"--subset"):
        load_dataset(f"librispeech:{root}/LibriSpeech")
    for spec in (f"librispeech:{root}/LibriSpeech", f"librispeech:{root}"):  # or the folder it was unpacked in
        ds = load_dataset(spec, subset="dev-clean")
        assert [i.id for i in ds.items] == ["84-121123-0000", "84-121123-0001"]
    _assert_audio(ds, {i.id: utts[i.id][0] for i in ds.items})
    with pytest.raises(MamError, match=r"no LibriSpeech split 'test-other'; there are: dev-clean, test-clean"):
        load_dataset(f"librispeech:{root}/LibriSpeech", subset="test-other")
    with pytest.raises(MamError, match=r"is the LibriSpeech split test-clean; --subset dev-clean names another"):
        load_dataset(f"librispeech:{root}/LibriSpeech/test-clean", subset="dev-clean")
    with pytest.raises(MamError, match=r"not in the LibriSpeech layout"):
        load_dataset(f"librispeech:{SHARED}/fsdd")


# ---- Common Voice -------------------------------------------------------------------------------

CV_HEADER = ("client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
             "gender", "accents", "variant", "locale", "segment")


@pytest.fixture
def commonvoice(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A Common Voice release folder: clips/*.mp3 (real speech, encoded by libsndfile), test.tsv, dev.tsv and a
    tsv that lists no clips (clip_durations.tsv). A sentence holds quotes, as Common Voice's do."""
    root = tmp_path / "cv-corpus-17.0-2024-03-15" / "en"
    (root / "clips").mkdir(parents=True)
    sentences = {}
    for split, clips in (("test", _lj(3)), ("dev", _lj(5)[3:])):
        rows = ["\t".join(CV_HEADER)]
        for n, (src, text) in enumerate(clips):
            name = f"common_voice_en_{split}{n}.mp3"
            data, sr = sf.read(str(src), dtype="float32")
            sf.write(str(root / "clips" / name), data, sr, format="MP3")
            sentence = f'"{text}," she said.' if n == 0 else text
            sentences[Path(name).stem] = sentence
            rows.append("\t".join([f"client{n % 2}", name, str(n), sentence, "", "2", "0", "", "", "", "", "en",
                                   ""]))
        (root / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "clip_durations.tsv").write_text("clip\tduration[ms]\ncommon_voice_en_test0.mp3\t1000\n")
    return tmp_path, sentences


def test_commonvoice_reads_the_test_tsv_and_its_mp3_clips(commonvoice):
    top, sentences = commonvoice
    ds = load_dataset(f"commonvoice:{top}/cv-corpus-17.0-2024-03-15")  # the folder above the locale works too
    assert [i.id for i in ds.items] == ["common_voice_en_test0", "common_voice_en_test1", "common_voice_en_test2"]
    assert ds.items[0].text == sentences["common_voice_en_test0"] and ds.items[0].text.startswith('"')
    assert [i.speaker for i in ds.items] == ["client0", "client1", "client0"]
    assert ds.notes == ["Common Voice test.tsv"] and ds.text_field == "sentence"
    _assert_audio(ds, {i.id: i.path for i in ds.items})
    assert all(i.path.parent.name == "clips" and i.path.suffix == ".mp3" for i in ds.items)
    # the MP3 holds the LJ clip: libsndfile trims the codec's delay, so the waveforms line up sample for sample
    mp3 = load_audio(ds.items[1].path, RATE)
    wav = load_audio(_lj(2)[1][0], RATE)
    assert len(mp3) == len(wav) and np.corrcoef(mp3, wav)[0, 1] > 0.99


def test_commonvoice_subset_picks_the_tsv_and_split_names_it(commonvoice):
    top, _ = commonvoice
    spec = f"commonvoice:{top}/cv-corpus-17.0-2024-03-15/en"
    assert [i.id for i in load_dataset(spec, subset="dev").items] == ["common_voice_en_dev0", "common_voice_en_dev1"]
    with pytest.raises(MamError, match=r"no Common Voice tsv 'train'; there are: dev, test"):
        load_dataset(spec, subset="train")
    # --split dev|test (and finetune's train part) name Common Voice's own tsv, read whole; elsewhere a seeded split
    assert [own_split(spec, p, None) for p in ("train", "dev", "test")] == [("train", "all"), ("dev", "all"),
                                                                           ("test", "all")]
    assert own_split(spec, "dev", "validated") == ("validated", "dev") and own_split(spec, "all", None) == (None, "all")
    assert own_split(f"ljspeech:{LJ}", "dev", None) == (None, "dev")
    assert own_split(f"ljspeech:{LJ}", "train", None) == (None, "test")  # finetune trains outside the dev split
    subset, split = own_split(spec, "dev", None)
    assert len(select(load_dataset(spec, subset=subset), split).items) == 2


def test_mp3_without_libsndfile_support_is_one_clear_line(commonvoice, monkeypatch):
    top, _ = commonvoice
    formats = {k: v for k, v in sf.available_formats().items() if k != "MP3"}
    monkeypatch.setattr(sf, "available_formats", lambda: formats)
    with pytest.raises(MamError, match=r"holds MP3 clips and the installed libsndfile \(.+\) cannot read MP3: it "
                                       r"needs libsndfile 1\.1\.0 or later"):
        load_dataset(f"commonvoice:{top}/cv-corpus-17.0-2024-03-15/en")


# ---- Hugging Face: parquet shards as the Hub serves them ------------------------------------------

def _features(**cols: dict) -> dict[bytes, bytes]:
    """Schema metadata as datasets writes it (ArrowWriter._build_metadata): the features under info."""
    return {b"huggingface": json.dumps({"info": {"features": cols}}).encode()}


AUDIO_T = pa.struct({"bytes": pa.binary(), "path": pa.string()})


def _audio_cells(files: list[Path]) -> pa.Array:
    return pa.array([{"bytes": f.read_bytes(), "path": f.name} for f in files], AUDIO_T)


@pytest.fixture
def hub_parquet(tmp_path: Path) -> tuple[Path, dict[str, tuple[Path, str]]]:
    """data/{test,train}-0000N-of-0000M.parquet with audio {bytes, path}, text, speaker_id and id, row groups of 2."""
    clips = _lj(6)
    meta = _features(audio={"sampling_rate": RATE, "_type": "Audio"}, text={"dtype": "string", "_type": "Value"},
                     speaker_id={"dtype": "int64", "_type": "Value"}, id={"dtype": "string", "_type": "Value"})
    shards = {"test-00000-of-00001": clips[:3], "train-00000-of-00002": clips[3:5], "train-00001-of-00002": clips[5:]}
    expected = {}
    (tmp_path / "data").mkdir()
    for name, part in shards.items():
        files = [f for f, _ in part]
        table = pa.table({"audio": _audio_cells(files), "text": [t for _, t in part],
                          "speaker_id": [19] * len(part), "id": [f"utt-{f.stem}" for f in files]})
        pq.write_table(table.replace_schema_metadata(meta), tmp_path / "data" / f"{name}.parquet", row_group_size=2)
        expected.update({f"utt-{f.stem}": (f, t) for f, t in part})
    (tmp_path / "README.md").write_text("---\nconfigs: []\n---\n")
    return tmp_path, expected


def test_hub_parquet_shards_read_lazily_by_split(hub_parquet):
    root, expected = hub_parquet
    with pytest.raises(MamError, match=r"several splits \(test, train\); pick one with --subset"):
        load_dataset(f"parquet:{root}")
    ds = load_dataset(f"hf:{root}", subset="test")
    assert [i.id for i in ds.items] == [f"utt-{f.stem}" for f, _ in _lj(3)]
    assert all(i.text == expected[i.id][1] and i.speaker == "19" for i in ds.items)
    assert ds.items[2].row.index == 2 and ds.items[2].where.endswith("test-00000-of-00001.parquet row 2")
    assert ds.notes == ["split test", "audio column audio", "text column text"] and ds.text_field == "text"
    _assert_audio(ds, {k: v[0] for k, v in expected.items() if k in {i.id for i in ds.items}})
    train = load_dataset(f"parquet:{root}", subset="train")  # two shards, row groups of two: rows across both
    assert len(train.items) == 3 and {i.path.name for i in train.items} == {"train-00000-of-00002.parquet",
                                                                             "train-00001-of-00002.parquet"}
    _assert_audio(train, {k: v[0] for k, v in expected.items() if k in {i.id for i in train.items}})
    single = load_dataset(f"parquet:{root}/data/train-00001-of-00002.parquet")
    assert [i.id for i in single.items] == [f"utt-{_lj(6)[5][0].stem}"]


def test_text_and_label_columns_are_chosen_or_named(hub_parquet, tmp_path):
    root, _ = hub_parquet
    ds = load_dataset(f"hf:{root}", subset="test", text_column="id", label_column="speaker_id")
    assert all(i.text == i.id and i.label == "19" for i in ds.items) and ds.text_field == "id"
    with pytest.raises(MamError, match=r"no column 'words' for --text-column; columns: audio, text, speaker_id, id"):
        load_dataset(f"hf:{root}", subset="test", text_column="words")
    bare = tmp_path / "bare"
    bare.mkdir()
    pq.write_table(pa.table({"audio": _audio_cells([_lj(1)[0][0]]), "words": ["x"]}), bare / "test.parquet")
    with pytest.raises(MamError, match=r"no text column \(text, sentence, .*\) or label column; columns: audio, "
                                       r"words; name one with --text-column or --label-column"):
        load_dataset(f"parquet:{bare}")
    assert load_dataset(f"parquet:{bare}", text_column="words").items[0].text == "x"
    pq.write_table(pa.table({"sound": pa.array([b"x"]), "text": ["x"]}), bare / "test.parquet")
    with pytest.raises(MamError, match=r"no audio column \(of \{bytes, path\} cells\); columns: sound, text"):
        load_dataset(f"parquet:{bare}")
    with pytest.raises(MamError, match=r"--text-column does not apply to a ljspeech dataset \(it does to hf, "
                                       r"parquet, manifest\)"):
        load_dataset(f"ljspeech:{LJ}", text_column="text")


# ---- Hugging Face: save_to_disk ------------------------------------------------------------------

def _save_to_disk(folder: Path, table: pa.Table, features: dict, split: str) -> None:
    """What Dataset.save_to_disk writes (datasets 4.x, arrow_dataset.py): data-00000-of-00001.arrow as an Arrow IPC
    *stream* (ArrowWriter uses RecordBatchStreamWriter) with the features in the schema metadata, state.json
    listing the arrow files, and dataset_info.json."""
    folder.mkdir(parents=True)
    table = table.replace_schema_metadata(_features(**features))
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0123456789abcdef",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": split}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = {"builder_name": None, "citation": "", "config_name": None, "dataset_name": None, "dataset_size": None,
            "description": "", "download_checksums": None, "download_size": None, "features": features,
            "homepage": "", "license": "", "post_processed": None, "size_in_bytes": None, "splits": None,
            "supervised_keys": None, "version": None}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, list[Path], list[str]]:
    """A DatasetDict of ESC-50 clips with a ClassLabel: dataset_dict.json and one save_to_disk folder per split."""
    rows = [r.split(",") for r in (ESC / "meta" / "esc50.csv").read_text().splitlines()[1:]]
    classes = sorted({r[3] for r in rows})
    picked = [r for r in rows if r[3] in ("dog", "rooster", "rain")][:5]
    files = [ESC / "audio" / r[0] for r in picked]
    features = {"audio": {"sampling_rate": RATE, "_type": "Audio"},
                "label": {"names": classes, "_type": "ClassLabel"}}
    root = tmp_path / "esc50_saved"
    for split, part in (("train", slice(0, 2)), ("test", slice(2, 5))):
        cells = _audio_cells(files[part]).to_pylist()
        if split == "test":  # an un-embedded cell (bytes null, path only) and a broken one, as a real set may have
            cells[1] = {"bytes": None, "path": str(files[3])}
        table = pa.table({"audio": pa.array(cells, AUDIO_T),
                          "label": pa.array([classes.index(r[3]) for r in picked[part]], pa.int64())})
        _save_to_disk(root / split, table, features, split)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    return root, files, [r[3] for r in picked]


def test_save_to_disk_datasetdict_with_classlabel(saved):
    root, files, labels = saved
    with pytest.raises(MamError, match=r"several splits \(test, train\)"):
        load_dataset(f"hf:{root}")
    ds = load_dataset(f"hf:{root}", subset="test")
    assert [i.label for i in ds.items] == labels[2:] and [i.id for i in ds.items] == [f.stem for f in files[2:]]
    rows = [r.split(",") for r in (ESC / "meta" / "esc50.csv").read_text().splitlines()[1:]]
    assert ds.all_labels == sorted({r[3] for r in rows}) and len(ds.all_labels) == 50  # the ClassLabel's names
    assert ds.labels == sorted(set(labels[2:])) and ds.text_field is None
    _assert_audio(ds, {f.stem: f for f in files[2:]})
    one = load_dataset(f"hf:{root}/train")  # a single Dataset folder: its split comes from state.json
    assert one.notes[0] == "split train" and [i.label for i in one.items] == labels[:2]
    _assert_audio(one, {f.stem: f for f in files[:2]})


def test_save_to_disk_bad_cells_and_state(saved):
    root = saved[0]
    table = pa.ipc.open_stream(pa.memory_map(str(root / "test/data-00000-of-00001.arrow"))).read_all()
    cells = table.column("audio").to_pylist()
    cells[0] = {"bytes": b"RIFF not audio", "path": "x.wav"}
    (root / "test/data-00000-of-00001.arrow").unlink()
    with pa.OSFile(str(root / "test/data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.set_column(0, "audio", pa.array(cells, AUDIO_T)))
    ds = load_dataset(f"hf:{root}", subset="test")
    bad: list[dict[str, str]] = []
    assert len(list(iter_clips(ds, RATE, bad=bad))) == 2
    assert [b["path"] for b in bad] == [f"{root}/test/data-00000-of-00001.arrow row 0"]
    assert "row 0 (x.wav): cannot read audio" in bad[0]["error"]
    (root / "test/state.json").write_text(json.dumps({"_data_files": "data.arrow"}))
    with pytest.raises(MamError, match=r"state\.json: '_data_files' must be a list"):
        load_dataset(f"hf:{root}", subset="test")
    (root / "dataset_dict.json").write_text("[1, 2]")
    with pytest.raises(MamError, match=r"dataset_dict\.json: 'splits' must be a list of split names"):
        load_dataset(f"hf:{root}")


def test_evaluate_on_parquet_rows_equals_evaluate_on_the_files(hub_parquet, tiny, mam, tmp_path):
    """Through the CLI: clips read from parquet rows give the same hypotheses and WER as the original files."""
    root, expected = hub_parquet
    tgt = tiny("hubert-ctc", layers=2)
    rows = [{"audio": str(f), "text": t, "id": k} for k, (f, t) in expected.items() if f in [c for c, _ in _lj(3)]]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reports = []
    for data in (f"parquet:{root}/data/test-00000-of-00001.parquet", tmp_path / "m.jsonl"):
        r = mam("evaluate", tgt, "--data", data, "-q", "-o", tmp_path / "r.json")
        assert r.code == 0, r.err
        reports.append(json.loads((tmp_path / "r.json").read_text()))
    pq_rep, files_rep = reports
    assert pq_rep["inputs"]["data"]["clips"] == 3 and pq_rep["inputs"]["data"]["notes"][0] == "split test"
    assert pq_rep["baseline"] == files_rep["baseline"] and pq_rep["details"] == files_rep["details"]
    assert [u["id"] for u in pq_rep["details"]["target"]["utterances"]] == sorted(r["id"] for r in rows)
