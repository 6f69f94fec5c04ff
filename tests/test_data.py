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
