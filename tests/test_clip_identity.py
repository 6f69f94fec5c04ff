"""Clip identity (issue 23): every reader gives each clip an id of its own, so two files with one name never share
a hypothesis, a reference or a paired statistic; a clip listed twice is one error naming both rows."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from conftest import SHARED
from mamcli.cli import main
from mamcli.data import load_dataset, select
from mamcli.errors import MamError

LJ = SHARED / "ljspeech-385/LJSpeech-1.1"
BATCH = ("--batch-size", "1")  # eight batches: four for each of two processes


def _lj(n: int) -> list[tuple[str, str]]:
    """The first ``n`` LJ Speech clips: (id, normalized transcript)."""
    with (LJ / "metadata.csv").open(encoding="utf-8") as f:
        return [(r[0], r[2]) for r in csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE)][:n]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


@pytest.fixture(scope="module")
def collision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's case: 8 LJ clips as an ``audio,text`` manifest whose files are linked into a/ and b/ under the
    same four names (a/c0.flac … a/c3.flac, b/c0.flac … b/c3.flac), and the same clips under their own names."""
    root = tmp_path_factory.mktemp("collision")
    rows = []
    for k, (utt, text) in enumerate(_lj(8)):
        link = root / "ab"[k // 4] / f"c{k % 4}.flac"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(LJ / "wavs" / f"{utt}.flac")
        rows.append((link.relative_to(root).as_posix(), str(LJ / "wavs" / f"{utt}.flac"), text))
    _write_csv(root / "collide.csv", ["audio", "text"], [[a, t] for a, _, t in rows])
    _write_csv(root / "unique.csv", ["audio", "text"], [[u, t] for _, u, t in rows])
    return root


def _evaluate(model: Path, data: Path, out: Path, *extra: str) -> dict:
    """``mam evaluate`` in this process, its JSON report."""
    try:
        main(["evaluate", str(model), "--data", str(data), "-q", "--format", "json", "-o", str(out), *extra])
    except SystemExit as e:
        assert e.code in (0, None), f"mam evaluate exited {e.code}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reports(collision: Path, tiny) -> dict[str, dict]:
    """A tiny CTC model on the 8 clips, one process, one thread: under colliding names and under their own. (The
    merge is the data's, not the model's: with whisper-tiny.en it was WER 60 % for 3.9 %; a tiny model is 15 times
    cheaper and its eight hypotheses differ just as well.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: _evaluate(tiny("hubert-ctc", layers=2), collision / f"{name}.csv", collision / f"{name}.json",
                                *BATCH) for name in ("collide", "unique")}
    finally:
        torch.set_num_threads(threads)


def test_colliding_file_names_in_a_manifest_keep_their_own_results(reports):
    """Before, the id was the stem: a/c0 and b/c0 shared one hypothesis and were both scored against it. Now the
    colliding rows are told apart by their path from the manifest, and every number equals the unique names'."""
    collide, unique = (reports[n]["details"]["target"] for n in ("collide", "unique"))
    assert [u["id"] for u in collide["utterances"]] == [f"{d}/c{k}" for d in "ab" for k in range(4)]
    assert [u["id"] for u in unique["utterances"]] == [utt for utt, _ in _lj(8)]
    assert collide["scored"] == unique["scored"] == 8 and reports["collide"]["inputs"]["data"]["clips"] == 8
    assert collide["ref_words"] == unique["ref_words"] == 129  # the 8 transcripts (basic normaliser), each once
    assert collide["wer"] == unique["wer"] and collide["hits"] == unique["hits"]
    assert ([(u["reference"], u["hypothesis"]) for u in collide["utterances"]]
            == [(u["reference"], u["hypothesis"]) for u in unique["utterances"]])
    assert len({u["hypothesis"] for u in collide["utterances"]}) == 8  # a merge could not go unseen


def test_colliding_names_under_two_processes_equal_one(collision, reports, tiny, tmp_path):
    """The same manifest under torchrun (two gloo CPU processes): hypotheses gathered by the unique id, the report
    is the one process's, clip for clip."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "mamcli.cli", "evaluate", str(tiny("hubert-ctc", layers=2)), "--data",
                          str(collision / "collide.csv"), *BATCH, "-q", "--format", "json", "-o",
                          str(tmp_path / "two.json")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    two, one = json.loads((tmp_path / "two.json").read_text()), reports["collide"]
    assert two["details"] == one["details"] and two["details"]["target"]["wer"] == reports["unique"]["baseline"]["wer"]
    assert [u["id"] for u in two["details"]["target"]["utterances"]] == [f"{d}/c{k}" for d in "ab" for k in range(4)]
    assert (two["evaluation"]["processes"], two["evaluation"]["clips_per_process"]) == (2, [4, 4])


def test_rank_layers_pairs_every_clip_with_its_own_transcript(tiny, mam, collision):
    """rank-layers meets a clip's audio and its transcript by the clip's id: eight pairs under colliding names, the
    very scores of the unique names (before, four pairs survived the merge)."""
    src, tgt = tiny("bert", layers=2), tiny("whisper", layers=2)
    reports = []
    for name in ("collide", "unique"):
        r = mam("rank-layers", src, tgt, "--data", collision / f"{name}.csv", "--metric", "all", "--n-projections",
                "50", "--top-k", "1", "-q", "--format", "json")
        assert r.code == 0, r.err
        reports.append(json.loads(r.out))
    collide, unique = reports
    assert collide["samples"] == [f"{d}/c{k}" for d in "ab" for k in range(4)] and len(unique["samples"]) == 8
    assert collide["metrics"] == unique["metrics"]


def test_folders_with_one_file_name_in_two_class_folders(tiny, mam, tmp_path):
    """``folders:``: c0.flac in both class folders, and c1 twice in one folder as .flac and .wav (those two differ
    only in their suffix, so it stays in their ids). Five clips, five ids, five predictions."""
    clips = [LJ / "wavs" / f"{utt}.flac" for utt, _ in _lj(5)]
    layout = {"LABEL_0/c0.flac": clips[0], "LABEL_0/c1.flac": clips[1], "LABEL_1/c0.flac": clips[3],
              "LABEL_1/c1.flac": clips[4]}
    for name, clip in layout.items():
        (tmp_path / "set" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "set" / name).symlink_to(clip)
    audio, rate = sf.read(clips[2])
    sf.write(tmp_path / "set/LABEL_0/c1.wav", audio, rate)
    ids = ["LABEL_0/c0", "LABEL_0/c1.flac", "LABEL_0/c1.wav", "LABEL_1/c0", "LABEL_1/c1"]
    assert [i.id for i in load_dataset(f"folders:{tmp_path / 'set'}").items] == ids
    r = mam("evaluate", tiny("ast", layers=2), "--data", f"folders:{tmp_path / 'set'}", "-q", "-o",
            tmp_path / "r.json")
    assert r.code == 0, r.err
    detail = json.loads((tmp_path / "r.json").read_text())["details"]["target"]
    assert detail["clips"] == 5 and [d["id"] for d in detail["clips_detail"]] == ids
    assert [d["label"] for d in detail["clips_detail"]] == ["LABEL_0"] * 3 + ["LABEL_1"] * 2


def test_a_clip_listed_twice_is_one_error_naming_both_rows(tiny, mam, collision, tmp_path):
    """The same file on lines 2 and 4 (spelled ./a/c0.flac the second time), or one explicit id on two rows: exit
    1, one line naming both rows, no traceback, nothing scored."""
    model = tiny("hubert-ctc", layers=2)
    rows = [["a/c0.flac", "one"], ["a/c1.flac", "two"], ["./a/c0.flac", "three"]]
    twice = _write_csv(collision / "twice.csv", ["audio", "text"], rows)
    r = mam("evaluate", model, "--data", twice, "-q")
    assert r.code == 1 and r.out == ""
    assert r.err.strip().splitlines() == [
        f"mam: error: dataset '{twice}': {twice}, line 2 and {twice}, line 4 list the same clip "
        f"({collision}/a/c0.flac); list each clip once"]
    ids = _write_csv(collision / "ids.csv", ["id", "audio", "text"],
                     [["x", "a/c0.flac", "one"], ["y", "a/c1.flac", "two"], ["x", "b/c0.flac", "three"]])
    r = mam("evaluate", model, "--data", ids, "-q")
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1
    assert f"{ids}, line 2 and {ids}, line 4 give two clips" in r.err and "the one id 'x'" in r.err


@pytest.mark.parametrize("flavour", ["mam", "nemo", "audiofolder", "commonvoice"])
def test_every_manifest_flavour_tells_colliding_names_apart(tmp_path, flavour):
    """Stems stay the ids where they are unique (so existing splits stay); where two rows' stems collide, those two
    (and only those) take their path from the manifest's folder (from clips/ for a Common Voice tsv)."""
    base = tmp_path / "clips" if flavour == "commonvoice" else tmp_path
    for name in ("x/at.flac", "y/at.flac", "sorry.flac", "z/sorry.flac", "own.flac"):
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).symlink_to(LJ / "wavs/LJ001-0001.flac")
    names = ["x/at.flac", "y/at.flac", "sorry.flac", "z/sorry.flac", "own.flac"]
    if flavour == "nemo":  # absolute paths: the path from the manifest's folder all the same
        path = tmp_path / "m.json"
        path.write_text("".join(json.dumps({"audio_filepath": str(base / n), "text": "t"}) + "\n" for n in names))
    elif flavour == "commonvoice":
        path = tmp_path / "test.tsv"
        path.write_text("client_id\tpath\tsentence\n" + "".join(f"c\t{n}\tt\n" for n in names))
    else:
        path = _write_csv(tmp_path / "m.csv", ["audio" if flavour == "mam" else "file_name", "text"],
                          [[n, "t"] for n in names])
    spec = f"commonvoice:{tmp_path}" if flavour == "commonvoice" else str(path)
    assert [i.id for i in load_dataset(spec).items] == ["x/at", "y/at", "sorry", "z/sorry", "own"]


def test_corpus_readers_keep_their_own_ids_and_refuse_repeats(tmp_path):
    """FSDD: two files that differ only in suffix keep it; LJ Speech: a repeated id in metadata.csv is the same
    clip listed twice, named by its two lines."""
    fsdd = tmp_path / "fsdd"
    fsdd.mkdir()
    for name in ("0_jackson_0.flac", "0_jackson_0.wav", "1_jackson_0.flac"):
        (fsdd / name).symlink_to(LJ / "wavs/LJ001-0001.flac")
    assert [i.id for i in load_dataset(f"fsdd:{fsdd}").items] == ["0_jackson_0.flac", "0_jackson_0.wav",
                                                                   "1_jackson_0"]
    lj = tmp_path / "lj"
    (lj / "wavs").mkdir(parents=True)
    (lj / "metadata.csv").write_text("LJ001-0001|a|a\nLJ001-0002|b|b\nLJ001-0001|c|c\n")
    with pytest.raises(MamError, match=r"metadata\.csv, line 1 and .*metadata\.csv, line 3 list the same clip"):
        load_dataset(f"ljspeech:{lj}")


def test_vctk_librispeech_and_tables_keep_one_id_per_clip(tmp_path):
    """VCTK: one transcript name under two speakers takes the speaker. LibriSpeech: an utterance listed twice is
    refused with both lines. A table: a repeated ``id`` column (a sentence id) gives way to the audio cells' file
    names, paths where they collide, row numbers where cells have no name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vctk = tmp_path / "vctk"
    for spk in ("p1", "p2"):
        (vctk / "txt" / spk).mkdir(parents=True)
        (vctk / "txt" / spk / "u1.txt").write_text("hello")
        (vctk / "wav48" / spk).mkdir(parents=True)
        (vctk / "wav48" / spk / "u1_mic1.flac").symlink_to(LJ / "wavs/LJ001-0001.flac")
    assert [i.id for i in load_dataset(f"vctk:{vctk}").items] == ["p1/u1", "p2/u1"]
    chapter = tmp_path / "test-clean/19/198"
    chapter.mkdir(parents=True)
    (chapter / "19-198.trans.txt").write_text("19-198-0001 A\n19-198-0002 B\n19-198-0001 C\n")
    with pytest.raises(MamError, match=r"trans\.txt, line 1 and .*trans\.txt, line 3 list the same clip "
                                       r"\(.*/19-198-0001\.wav\)"):
        load_dataset(f"librispeech:{tmp_path / 'test-clean'}")
    cell = pa.struct({"bytes": pa.binary(), "path": pa.string()})
    flac = (LJ / "wavs/LJ001-0001.flac").read_bytes()
    for paths, ids in ((["x/at.flac", "y/at.flac", "b.flac"], ["x/at", "y/at", "b"]),
                       ([None, "a.flac", "b.flac"], ["000000", "000001", "000002"])):
        audio = pa.array([{"bytes": flac, "path": n} for n in paths], cell)
        pq.write_table(pa.table({"audio": audio, "text": ["t"] * 3, "id": ["s1", "s1", "s2"]}), tmp_path / "t.parquet")
        assert [i.id for i in load_dataset(f"parquet:{tmp_path / 't.parquet'}").items] == ids


def test_the_published_splits_do_not_move():
    """LJ Speech and ESC-10 ids are the corpora's own (unique already): the seeded splits of docs/results.md
    (--dev-fraction 0.3 --seed 0; ESC-10 folds 1-4 and fold 5) keep their clips, counted and spot-checked."""
    lj = load_dataset(f"ljspeech:{LJ}")
    dev, test = (select(lj, part, 0.3, 0).items for part in ("dev", "test"))
    assert (len(dev), len(test)) == (113, 272) and [i.id for i in dev[:3]] == ["LJ001-0004", "LJ001-0007", "LJ001-0012"]
    esc10 = load_dataset(f"folders:{SHARED}/esc10/ESC-10")
    parts = [select(esc10, part, 0.3, 0, folds=[1, 2, 3, 4]).items for part in ("dev", "test")]
    assert [len(p) for p in parts] == [93, 227] and len(select(esc10, folds=[5]).items) == 80
