"""Model cards from real merge / finetune / evaluate reports: models, exact λ, hashes, command, YAML front matter."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import SHARED
from mamcli.card import (
    CARD_FILE,
    EVAL_FILE,
    add_evaluation,
    command_line,
    evaluation_section,
    lam_rows,
    model_card,
    write_card,
)
from mamcli.errors import MamError

LJ = f"ljspeech:{SHARED}/ljspeech-385/LJSpeech-1.1"
FSDD = f"fsdd:{SHARED}/fsdd/recordings"


def parse_front_matter(card: str) -> dict:
    """The card's own subset of YAML (``key: value``, ``key:`` then ``- item``) read by hand."""
    lines = card.split("\n")
    assert lines[0] == "---"
    end = lines.index("---", 1)
    meta: dict = {}
    key = None

    def scalar(s: str) -> str:
        return json.loads(s) if s.startswith('"') else s

    for line in lines[1:end]:
        if line.startswith("- "):
            meta[key].append(scalar(line[2:]))
        else:
            key, _, value = line.partition(": ") if ": " in line else (line.rstrip(":"), "", "")
            meta[key] = scalar(value) if value else []
    return meta


def front_matter(card: str) -> dict:
    """Read by hand, and by PyYAML too where it is installed: both must agree."""
    meta = parse_front_matter(card)
    try:
        import yaml
    except ImportError:
        return meta
    assert yaml.safe_load(card.split("---\n")[1]) == meta
    return meta


def row(*cells: object) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


@pytest.fixture
def merged(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    argv = ["merge", src, tgt, "--lam", "0.1", "--layers", "1", "-o", tmp_path / "out", "-q"]
    r = mam(*argv)
    assert r.code == 0, r.err
    out = tmp_path / "out"
    return src, tgt, out, json.loads((out / "mam_report.json").read_text()), command_line(argv)


def test_merge_card_names_models_lambda_hashes_and_command(merged):
    src, tgt, out, report, command = merged
    card = (write_card(out, report, command)).read_text()
    meta = front_matter(card)
    assert meta == {"library_name": "transformers", "base_model": [str(tgt), str(src)], "base_model_relation": "merge",
                    "pipeline_tag": "automatic-speech-recognition",
                    "tags": ["mam", "multimodal-attention-merging", "merge", "speech"]}
    assert f"# {tgt.name} with attention merged from {src.name}" in card
    assert row("source", f"`{src.name}`", src, "-", "bert", "2 × 32 × 4") in card
    assert row("target", f"`{tgt.name}`", tgt, "-", "hubert", "2 × 32 × 4") in card
    assert row("target layer", "source layer", "λ q", "λ k", "λ v") in card
    assert row(1, 1, 0.1, 0.1, 0.1) in card and "| 0 |" not in card  # layer 0 untouched
    for role in ("source", "target"):
        for f, h in report["inputs"][role]["sha256"].items():
            assert row(role, f"`{f}`", f"`{h}`") in card
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert report["outputs"]["files"]["model.safetensors"] == digest
    assert row("this model", "`model.safetensors`", f"`{digest}`") in card
    assert f"```sh\n{command}\n```" in card and command.startswith("mam merge ") and "--lam 0.1 --layers 1" in command
    assert "identity (layer i ← layer i)" in card and "4 heads × 8 on both sides" in card
    assert "Not evaluated yet" in card


def test_evaluation_next_to_the_card_and_added_later(merged, mam, tmp_path):
    from mamcli.stats import add_paired_columns

    src, _, out, report, command = merged
    r = mam("evaluate", out, "--data", LJ, "--limit", "3", "--source", src, "--lam", "0,0.25", "-q",
            "-o", tmp_path / "e.json")
    assert r.code == 0, r.err
    ev = json.loads((tmp_path / "e.json").read_text())
    (out / EVAL_FILE).write_text(json.dumps(ev))
    card = write_card(out, report, command).read_text()  # found next to it
    base, point = ev["points"]
    assert row("all", 0.25, src.name, f"{100 * point['error']:.2f}", f"{100 * point['cer']:.2f}") in card
    assert row("-", 0.0, out.name, f"{100 * base['error']:.2f}", f"{100 * base['cer']:.2f}") in card
    assert "WER %" in card and "Not evaluated yet" not in card
    assert card == model_card(report, command, ev, config=json.loads((out / "config.json").read_text()))
    other = {**ev, "inputs": {**ev["inputs"], "target": {**ev["inputs"]["target"], "path": str(tmp_path)}}}
    (out / EVAL_FILE).write_text(json.dumps(other))  # another model's results, carried along: not this card's
    assert "Not evaluated yet" in write_card(out, report, command).read_text()

    (out / EVAL_FILE).unlink()
    write_card(out, report, command)
    point["delta"], point["delta_lo"], point["delta_hi"] = -0.125, -0.25, 0.0625
    point["better"], point["worse"] = 2, 1
    add_evaluation(out, ev)
    card = (out / CARD_FILE).read_text()
    assert row("all", 0.25, src.name, f"{100 * point['error']:.2f}", f"{100 * point['cer']:.2f}", "-12.50",
               "[-25.00, +6.25]", "2 / 1") in card
    assert card.count("<!-- mam:evaluation -->") == 1 and "Not evaluated yet" not in card
    assert card.split("## Evaluation")[0] == write_card(out, report, command).read_text().split("## Evaluation")[0]
    add_evaluation(out, ev)  # the card's hash in the report follows it: verify stays green
    assert mam("verify", out).code == 0

    add_paired_columns(ev["points"], ev["details"], resamples=50)  # the real columns render too
    add_evaluation(out, ev)
    assert "95 % interval" in (out / CARD_FILE).read_text()


def test_finetune_card_from_a_real_run(tiny, mam, tmp_path):
    src, tgt = tiny("bert", layers=2), tiny("hubert-ctc", layers=2)
    argv = ["finetune", tgt, "--data", FSDD, "--limit", "4", "--source", src, "--learnable-lam", "--lam-init", "0.2",
            "--epochs", "1", "--batch-size", "2", "--lam-lr", "0.5", "-o", tmp_path / "ft", "-q"]
    r = mam(*argv)
    assert r.code == 0, r.err
    ft = tmp_path / "ft"
    report = json.loads((ft / "mam_report.json").read_text())
    card = write_card(ft, report, command_line(argv)).read_text()
    meta = front_matter(card)
    assert meta["base_model"] == [str(tgt), str(src)] and meta["base_model_relation"] == "finetune"
    assert meta["pipeline_tag"] == "automatic-speech-recognition" and "l-mam" in meta["tags"]
    assert "Learnable MAM" in card and f"`{src.name}`" in card and f"`{tgt.name}`" in card
    lams = json.loads((ft / "lams.json").read_text())["lams"]
    assert lams["q"][0] != 0.2  # learned: moved from its start
    header = row("target layer", *(f"λ {p}" for p in lams))
    assert header in card
    assert lams["q"][0] != lams["q"][1]  # so each layer has its own row, with λ exactly as learned
    for i in range(2):
        assert row(i, *(repr(lams[p][i]) for p in lams)) in card
    digest = hashlib.sha256((ft / "model.safetensors").read_bytes()).hexdigest()
    assert row("this model", "`model.safetensors`", f"`{digest}`") in card
    before = {k: v for k, v in report.items() if k != "outputs"}  # as finetune holds it before its report
    assert write_card(ft, before, command_line(argv)).read_text() == card  # the folder's weights hashed
    assert row("optimizer steps", report["steps"]) in card and command_line(argv) in card


def test_minimal_reports_and_plain_finetune():
    card = model_card({"command": "merge"}, None)
    assert front_matter(card) == {"library_name": "transformers", "base_model_relation": "merge",
                                  "tags": ["mam", "multimodal-attention-merging", "merge"]}
    assert "No layer has λ > 0" in card and "```sh" not in card
    plain = {"command": "finetune", "mode": "finetune", "options": {"task": "aec", "epochs": 2},
             "inputs": {"target": {"spec": "models/ast", "hub_id": "MIT/ast-finetuned-audioset-10-10-0.4593",
                                   "revision": "f826b80", "model_type": "ast"}, "source": None}}
    card = model_card(plain, "mam finetune ast --data x -o 'a b'")
    meta = front_matter(card)
    assert meta["base_model"] == ["MIT/ast-finetuned-audioset-10-10-0.4593"]
    assert meta["pipeline_tag"] == "audio-classification" and meta["tags"][-1] == "audio"
    assert "f826b80" in card and row("epochs", 2) in card and "Learned λ" not in card
    with pytest.raises(MamError, match="merge or finetune"):
        model_card({"command": "evaluate"}, None)


@pytest.mark.parametrize("model_type,tag", [("whisper", "speech"), ("unispeech-sat", "speech"),
                                            ("audio-spectrogram-transformer", "audio"), ("beats", "audio"),
                                            ("bert", None), ("sew-d", None)])
def test_modality_tag_without_a_head_comes_from_the_family(model_type, tag):
    """No config, no task: the target's modality is its family's (families.py), not a list kept here."""
    report = {"command": "merge", "inputs": {"target": {"model_type": model_type}}}
    tags = front_matter(model_card(report, None))["tags"]
    assert tags[3:] == ([tag] if tag else []), tags


def test_yaml_scalars_that_need_quotes():
    card = model_card({"command": "merge", "inputs": {"target": {"spec": "./my model: v2"},
                                                      "source": {"spec": "true"}}}, None)
    assert front_matter(card)["base_model"] == ["./my model: v2", "true"]


def test_lam_rows_group_runs_and_follow_the_layer_map():
    lams = {"q": [0.0, 0.1, 0.1, 0.1, 0.2], "k": [0.0, 0.1, 0.1, 0.1, 0.2]}
    assert lam_rows(lams) == (["target layer", "λ q", "λ k"], [["1-3", 0.1, 0.1], ["4", 0.2, 0.2]])
    assert lam_rows(lams, [0, 0, 1, 1, 2])[1] == [["1-2", "0-1", 0.1, 0.1], ["3", "1", 0.1, 0.1], ["4", "2", 0.2, 0.2]]
    assert lam_rows({"q": [0.3, 0.0, 0.3], "v": [0.3, 0.0, 0.25]})[1] == [["0", 0.3, 0.3], ["2", 0.3, 0.25]]


def test_pick_on_dev_and_audio_event_tables():
    base = {"layers": None, "lam": 0.0, "column": "target", "error": 0.25}
    best = {"layers": "0-1", "lam": 0.1, "column": "noise:normal", "noise": "normal", "error": 0.2}
    ev = {"evaluation": {"task": "aec", "clips": 8}, "inputs": {"target": {"spec": "x/ast"}, "data": {"spec": "esc"}},
          "dev": {"points": [base, best]}, "best_on_dev": best, "test": {"points": [{**base, "error": 0.375}, best]}}
    text = evaluation_section(ev)
    assert row("split", "layers", "λ", "model", "error %") in text
    assert row("dev", "-", 0.0, "ast", "25.00") in text and row("test", "-", 0.0, "ast", "37.50") in text
    assert row("test", "0-1", 0.1, "noise:normal", "20.00") in text
    assert "Best on dev: layers 0-1, λ = 0.1, noise:normal." in text and "esc`, 8 clips." in text
    with pytest.raises(MamError, match="does not exist"):
        add_evaluation(Path("/nonexistent-mam-folder"), ev)
