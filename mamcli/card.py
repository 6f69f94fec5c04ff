"""Model cards: the README.md a `merge` or `finetune` output carries, in the Hugging Face Hub's format.

A card is YAML front matter (what the Hub indexes: library, base models, task, tags) and Markdown
for people: where the weights came from, what λ went into which layer, how to make them again, and
the hashes to check them by. Everything comes from the command's report, so a card never says more
than the report does; fields an older or partial report lacks are left out, not guessed. When an
evaluation is known its table sits between two HTML comments, so it can be replaced later.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mamcli.errors import MamError
from mamcli.families import FAMILIES, TARGET_MODALITIES

CARD_FILE = "README.md"
EVAL_FILE = "mam_eval.json"  # an evaluate report kept in the output folder, picked up by write_card
BEGIN, END = "<!-- mam:evaluation -->", "<!-- /mam:evaluation -->"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
NOISE = {"source": "Gaussian noise with each source tensor's mean and standard deviation",
         "target": "Gaussian noise with each target tensor's mean and standard deviation",
         "normal": "standard normal noise N(0, 1)"}


def command_line(argv: Sequence[str]) -> str:
    """The command as a user would type it again (shell-quoted)."""
    return shlex.join(["mam", *map(str, argv)])


def pipeline_tag(config: dict[str, Any] | None, task: str | None = None) -> str | None:
    """The Hub task implied by the model's head (``config.architectures``), else by mam's ``asr``/``aec``."""
    archs = " ".join((config or {}).get("architectures") or [])
    if "ForCTC" in archs or "ForSpeechSeq2Seq" in archs or "WhisperForConditionalGeneration" in archs:
        return "automatic-speech-recognition"
    if "ForAudioClassification" in archs:
        return "audio-classification"
    return {"asr": "automatic-speech-recognition", "aec": "audio-classification"}.get(task or "")


def _yaml_scalar(s: str) -> str:
    """Plain when YAML reads it back as the same string, else a JSON string (valid YAML)."""
    plain = re.fullmatch(r"[A-Za-z][A-Za-z0-9._/-]*", s) and s.lower() not in (
        "true", "false", "null", "yes", "no", "on", "off", "y", "n")
    return s if plain else json.dumps(s, ensure_ascii=False)


def front_matter(meta: dict[str, str | list[str]]) -> str:
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines += [f"{key}:", *(f"- {_yaml_scalar(v)}" for v in value)]
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}")
    return "\n".join([*lines, "---"]) + "\n"


def _cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    text = repr(v) if isinstance(v, float) else str(v)  # floats exactly, as the report holds them
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def _name(desc: dict[str, Any] | None) -> str:
    """A model as people call it: its hub id, else its folder's name."""
    if not desc:
        return "?"
    return desc.get("hub_id") or Path(str(desc.get("spec") or desc.get("path") or "?")).name


def _where(desc: dict[str, Any]) -> str:
    return desc.get("hub_id") or desc.get("path") or desc.get("spec") or "-"


def _models(inputs: dict[str, Any]) -> str:
    rows = []
    for role in ("source", "target"):
        d = inputs.get(role)
        if d:
            shape = " × ".join(str(d[k]) for k in ("layers", "hidden", "heads") if d.get(k) is not None)
            rows.append([role, f"`{_name(d)}`", _where(d), d.get("revision"), d.get("model_type") or d.get("format"),
                         shape])
    return _table(["role", "model", "hub id / path", "revision", "type", "layers × hidden × heads"], rows)


def _layers_text(layers: list[int]) -> str:
    from mamcli.layers import layers_spec

    return layers_spec(layers) if layers else "none"


def lam_rows(lams: dict[str, list[float]], layer_map: list[int] | None = None) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of merged layers: runs of consecutive layers with the same λ share a row."""
    parts = list(lams)
    n = max((len(v) for v in lams.values()), default=0)
    per_layer = [(i, tuple(lams[p][i] if i < len(lams[p]) else 0.0 for p in parts)) for i in range(n)]
    runs: list[list[tuple[int, tuple[float, ...]]]] = []
    for i, values in per_layer:
        if not any(values):
            continue
        prev = runs[-1][-1] if runs else None
        follows = prev is not None and prev[0] == i - 1 and prev[1] == values and (
            layer_map is None or layer_map[i] == layer_map[i - 1] + 1)
        if follows:
            runs[-1].append((i, values))
        else:
            runs.append([(i, values)])

    def span(a: int, b: int) -> str:
        return str(a) if a == b else f"{a}-{b}"

    header = ["target layer", *(["source layer"] if layer_map else []), *(f"λ {p}" for p in parts)]
    rows = []
    for run in runs:
        first, last = run[0][0], run[-1][0]
        src = [span(layer_map[first], layer_map[last])] if layer_map else []
        rows.append([span(first, last), *src, *run[0][1]])
    return header, rows


def _hashes(report: dict[str, Any]) -> str:
    rows = []
    for role in ("source", "target"):
        for f, h in ((report.get("inputs") or {}).get(role) or {}).get("sha256", {}).items():
            rows.append([role, f"`{f}`", f"`{h}`"])
    for f, h in _weight_hashes(report).items():
        rows.append(["this model", f"`{f}`", f"`{h}`"])
    if not rows:
        return ""
    return "## Hashes\n\n" + _table(["of", "file", "sha256"], rows) + "\n"


def _weight_hashes(report: dict[str, Any]) -> dict[str, str]:
    """The output's weight files: ``outputs.files`` of a merge, else the weights among ``outputs.hashes``."""
    outputs = report.get("outputs") or {}
    return outputs.get("files") or {f: h for f, h in (outputs.get("hashes") or {}).items()
                                    if f.endswith(WEIGHT_SUFFIXES)}


ALIGNED_BY = {"weights": "weight matching (data-free)",
              "activations": "activation matching (correlations of hidden states on paired clips and transcripts)"}


def _alignment(report: dict[str, Any]) -> str | None:
    """What ``--align`` did, from the report's ``alignment``: the mode, what was permuted, how well it matched."""
    a = report.get("alignment")
    if not isinstance(a, dict):
        return None
    mode, cos = a.get("mode"), a.get("cosine") or {}
    heads = f" within the source's {a['heads']} heads" if a.get("heads") else ""
    donor = "the noise standing in for the source" if (report.get("recipe") or {}).get("noise") else "the source"
    text = (f"Aligned first (`--align {mode}`, {ALIGNED_BY.get(str(mode), mode)}): {donor} was re-indexed by one "
            f"permutation of its hidden units and, per merged layer, of its attention rows{heads}, which leaves "
            f"what it computes unchanged; the permutations are in `{a.get('file', 'mam_align.json')}`.")
    if "identity" in cos and "aligned" in cos:
        text += (f" Mean cosine of source and target over the merged weights: {_cell(cos['identity'])} unaligned, "
                 f"{_cell(cos['aligned'])} aligned.")
    return text + "\n"


def _merge_body(report: dict[str, Any]) -> str:
    inputs, recipe = report.get("inputs") or {}, report.get("recipe") or {}
    src, tgt = inputs.get("source") or {}, inputs.get("target") or {}
    lams = recipe.get("lams") or {}
    layer_map = recipe.get("layer_map")
    header, rows = lam_rows(lams, layer_map)
    merged = sorted({i for p in lams.values() for i, v in enumerate(p) if v})
    parts = "/".join(p.upper() for p in recipe.get("parts") or lams) or "Q/K/V"
    noise = recipe.get("noise")
    dtype = (report.get("outputs") or {}).get("dtype")
    kept = f", cast to {dtype}" if dtype and dtype != "target" else ", byte for byte"
    aligned = _alignment(report)
    donor = (f"{NOISE.get(noise, noise)} (a noise baseline, seed {recipe.get('seed')}) in place of `{_name(src)}`"
             if noise else f"`{_name(src)}`")
    text = [f"# {_name(tgt)} with attention merged from {_name(src)}\n",
            f"`{_name(tgt)}` with the attention {parts} weights of {donor} interpolated into target "
            f"layer{'' if len(merged) == 1 else 's'} {_layers_text(merged)}, by Multimodal Attention Merging "
            "(`mam`):\n",
            "    W = λ_i · P_out · W_source · P_inᵀ + (1 − λ_i) · W_target      (float32, per target layer i)\n"
            if aligned else "    W = λ_i · W_source + (1 − λ_i) · W_target      (float32, per target layer i)\n",
            *([aligned] if aligned else []),
            f"Everything else is the target's{kept}{'; biases are merged too' if recipe.get('bias') else ''}.\n",
            "## Models\n", _models(inputs),
            "## λ per layer\n"]
    if rows:
        text.append(_table(header, rows))
    else:
        text.append("No layer has λ > 0: the weights equal the target's.\n")
    if layer_map is not None:
        identity = list(layer_map) == list(range(len(layer_map)))
        text.append("Layer map (source layer feeding each target layer): "
                    + ("identity (layer i ← layer i)." if identity else f"`{','.join(map(str, layer_map))}`.") + "\n")
    notes = list(report.get("notes") or [])
    if not notes and src.get("heads") and tgt.get("heads") and src.get("hidden"):
        notes = [f"the same layout, {src['heads']} heads × {src['hidden'] // src['heads']} on both sides "
                 f"(hidden {src['hidden']})."]
    text += [f"Heads: {n}\n" for n in notes]
    text += [f"Not merged: layer {s.get('layer')} {s.get('part')} {s.get('kind')} ({s.get('reason')}).\n"
             for s in report.get("skipped") or []]
    return "\n".join(text)


def _finetune_body(report: dict[str, Any], lams: dict[str, Any] | None) -> str:
    inputs, o = report.get("inputs") or {}, report.get("options") or {}
    src, tgt = inputs.get("source"), inputs.get("target") or {}
    mode = report.get("mode") or ("mam+finetune" if src else "finetune")
    where = f"layers {o['layers']}" if o.get("layers") else "all layers"
    parts = "/".join(p.upper() for p in o.get("parts") or ("q", "k", "v"))
    intro = {
        "finetune": f"`{_name(tgt)}` fine-tuned.",
        "mam+finetune": f"`{_name(tgt)}` with the attention {parts} weights of `{_name(src)}` merged in at "
                        f"λ = {_cell(o.get('lam_init'))} ({where}), then fine-tuned (MAM + fine-tuning).",
        "l-mam": f"`{_name(tgt)}` fine-tuned with Learnable MAM: its attention {parts} weights are "
                 f"λ_i · W_source + (1 − λ_i) · W_target with `{_name(src)}` as source ({where}), λ_i learned "
                 f"{'per part ' if o.get('per_part') else ''}with the weights from λ = {_cell(o.get('lam_init'))}.",
    }.get(mode, f"`{_name(tgt)}` trained by `mam finetune` ({mode}).")
    title = f"{_name(tgt)} fine-tuned" + (f" with attention from {_name(src)}" if src else "")
    aligned = _alignment(report)
    text = [f"# {title}\n", intro + " Made with `mam` (Multimodal Attention Merging).\n",
            *([aligned] if aligned else []), "## Models\n", _models(inputs), "## Training\n"]
    data = [["task", o.get("task")], ["train data", (inputs.get("train") or {}).get("spec")],
            ["train clips", (inputs.get("train") or {}).get("clips")],
            ["dev data", (inputs.get("dev") or {}).get("spec")], ["epochs", o.get("epochs")],
            ["optimizer steps", report.get("steps")], ["learning rate", o.get("lr")],
            ["λ learning rate", o.get("lam_lr") if mode == "l-mam" else None],
            ["batch size × accumulation", f"{o['batch_size']} × {o.get('grad_accum', 1)}" if "batch_size" in o
             else None], ["seed", o.get("seed")], ["best dev error", report.get("best_dev_error")]]
    text.append(_table(["", ""], [r for r in data if r[1] is not None]))
    history = report.get("epochs") or []
    if history:
        rows = [[h.get("epoch"), h.get("step"),
                 f"{h['train_loss']:.4g}" if isinstance(h.get("train_loss"), float) else None, h.get("dev_error")]
                for h in history]
        text.append(_table(["epoch", "step", "train loss", "dev error"], rows))
    if lams and lams.get("lams"):
        header, rows = lam_rows(lams["lams"])
        text += ["## Learned λ per layer\n", _table(header, rows) if rows else "Every λ ended at 0.\n"]
    return "\n".join(text)


def _pct(x: Any) -> str:
    return f"{100 * x:.2f}" if isinstance(x, int | float) else "-"


def _pp(x: Any) -> str:
    return f"{100 * x:+.2f}" if isinstance(x, int | float) else "-"


def evaluation_section(evaluation: dict[str, Any] | None) -> str:
    """The measured error table of an evaluate report, between markers that ``add_evaluation`` replaces."""
    if not evaluation:
        body = ("Not evaluated yet. `mam evaluate THIS_FOLDER --data DATA -o THIS_FOLDER/"
                f"{EVAL_FILE}` measures it.\n")
        return f"## Evaluation\n\n{BEGIN}\n{body}{END}\n"
    info, ins = evaluation.get("evaluation") or {}, evaluation.get("inputs") or {}
    data = ins.get("data") or {}
    names = {"target": _name(ins.get("target")), **({ins["source"].get("spec"): _name(ins["source"])}
                                                    if isinstance(ins.get("source"), dict) else {})}
    blocks = [("", evaluation)] if "points" in evaluation else \
        [(s, evaluation[s]) for s in ("dev", "test") if isinstance(evaluation.get(s), dict)]
    points = [(split, p) for split, block in blocks for p in block.get("points") or []]
    asr = info.get("task") == "asr" or any("wer" in p for _, p in points)
    metric = "WER %" if asr else "error %"
    has = {k: any(k in p for _, p in points) for k in ("cer", "delta", "delta_lo", "better")}
    header = [*(["split"] if blocks and blocks[0][0] else []), "layers", "λ", "model", metric,
              *(["CER %"] if has["cer"] else []), *(["Δ (points)"] if has["delta"] else []),
              *(["95 % interval"] if has["delta_lo"] else []), *(["better / worse"] if has["better"] else [])]
    rows = []
    for split, p in points:
        model = names.get(p.get("column"), p.get("column"))
        row = [*([split] if split else []), p.get("layers") or "-", p.get("lam"), model, _pct(p.get("error"))]
        row += [_pct(p.get("cer"))] if has["cer"] else []
        row += [_pp(p.get("delta"))] if has["delta"] else []
        row += [f"[{_pp(p.get('delta_lo'))}, {_pp(p.get('delta_hi'))}]"] if has["delta_lo"] else []
        row += [f"{p.get('better', '-')} / {p.get('worse', '-')}"] if has["better"] else []
        rows.append(row)
    norm = info.get("normalizer") if isinstance(info.get("normalizer"), dict) else {}
    what = [f"Measured by `mam evaluate` on `{data.get('spec', '?')}`"
            + (f", {info['clips']} clips" if info.get("clips") is not None else "")
            + (f", text normalised by {norm['steps']}" if norm.get("steps") else "") + "."]
    if has["delta"]:
        what.append("Δ is the row's error minus λ = 0 in percentage points, with a paired bootstrap interval over "
                    "utterances; better / worse count utterances with fewer / more errors.")
    best = evaluation.get("best_on_dev")
    if isinstance(best, dict):
        what.append(f"Best on dev: layers {best.get('layers')}, λ = {best.get('lam')}, {best.get('column')}.")
    body = " ".join(what) + "\n\n" + (_table(header, rows) if rows else "The report holds no scored point.\n")
    return f"## Evaluation\n\n{BEGIN}\n{body}{END}\n"


def model_card(report: dict[str, Any], command: str | None, evaluation: dict[str, Any] | None = None, *,
               config: dict[str, Any] | None = None, lams: dict[str, Any] | None = None) -> str:
    """README.md text for a ``merge`` or ``finetune`` report (``config``: the output's config.json,
    for the task; ``lams``: a finetune's lams.json)."""
    kind = report.get("command")
    if kind not in ("merge", "finetune"):
        raise MamError(f"a model card needs a merge or finetune report; got command {kind!r}")
    inputs = report.get("inputs") or {}
    src, tgt = inputs.get("source"), inputs.get("target") or {}
    task = pipeline_tag(config, (report.get("options") or {}).get("task"))
    model_type = tgt.get("model_type") or (config or {}).get("model_type")
    modality = {"automatic-speech-recognition": "speech", "audio-classification": "audio"}.get(task or "") or \
        _target_modality(model_type)
    meta: dict[str, str | list[str]] = {}
    if tgt.get("format") != "beats":  # BEATs loads with its own code, not transformers
        meta["library_name"] = "transformers"
    bases = [_where_id(d) for d in (tgt, src) if d]
    if bases:
        meta["base_model"] = bases
    meta["base_model_relation"] = "merge" if kind == "merge" else "finetune"
    if task:
        meta["pipeline_tag"] = task
    meta["tags"] = ["mam", "multimodal-attention-merging", kind,
                    *(["l-mam"] if report.get("mode") == "l-mam" else []), *([modality] if modality else [])]
    body = _merge_body(report) if kind == "merge" else _finetune_body(report, lams)
    versions = report.get("versions") or {}
    made = ["## How it was made\n"]
    if command:
        made.append(f"```sh\n{command}\n```\n")
    made.append(", ".join(f"{k} {versions[k]}" for k in ("mam", "torch", "transformers") if k in versions)
                + (f"; wall time {report['wall_time_s']} s" if "wall_time_s" in report else "") + ".\n")
    made.append("The full record is `mam_report.json`" + (" (`mam verify` checks the files against it)."
                                                          if kind == "merge" else ".") + "\n")
    return "\n".join([front_matter(meta), body, "\n".join(made), _hashes(report) + evaluation_section(evaluation)])


def _target_modality(model_type: str | None) -> str | None:
    """"speech" or "audio": the modality of the built-in family that lists this model type (None otherwise)."""
    return next((f.modality for f in FAMILIES if model_type in f.model_types and f.modality in TARGET_MODALITIES),
                None)


def _where_id(desc: dict[str, Any]) -> str:
    """What the Hub links a base model by: its hub id; a local model by its spec."""
    return desc.get("hub_id") or str(desc.get("spec") or desc.get("path") or "?")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MamError(f"{what} {path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise MamError(f"{what} {path} is not valid JSON ({e})") from None
    except OSError as e:
        raise MamError(f"cannot read {what} {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise MamError(f"{what} {path} is not a JSON object")
    return data


def write_card(directory: Path, report: dict[str, Any], command: str | None,
               evaluation: dict[str, Any] | Path | None = None) -> Path:
    """Write ``directory/README.md``. Reads the folder's config.json and lams.json; an evaluation given as
    a path is read, and without one an evaluate report of this folder saved there as ``mam_eval.json`` is
    used. Weight hashes the report lacks (a finetune output before its report) are computed from the folder."""
    from mamcli.checkpoint import sha256_file

    directory = Path(directory)
    config = _read_json(directory / "config.json", "config") if (directory / "config.json").is_file() else None
    lams = _read_json(directory / "lams.json", "λ file") if (directory / "lams.json").is_file() else None
    if isinstance(evaluation, Path):
        evaluation = _read_json(evaluation, "evaluate report")
    elif evaluation is None and (directory / EVAL_FILE).is_file():
        found = _read_json(directory / EVAL_FILE, "evaluate report")
        target = ((found.get("inputs") or {}).get("target") or {}).get("path")
        if target and Path(target).resolve() == directory.resolve():  # of this model, not one copied along
            evaluation = found
    if not _weight_hashes(report):
        weights = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        report = {**report, "outputs": {**(report.get("outputs") or {}),
                                        "files": {p.name: sha256_file(p, use_cache=False) for p in weights}}}
    path = directory / CARD_FILE
    _write_text(path, model_card(report, command, evaluation, config=config, lams=lams))
    return path


def add_evaluation(directory: Path, evaluation: dict[str, Any]) -> Path:
    """Put an evaluate report's table into an existing card (replacing an earlier one), and keep the card's
    hash in mam_report.json current so `mam verify` still passes (the card is documentation)."""
    from mamcli.checkpoint import sha256_file
    from mamcli.report import write_json

    path = Path(directory) / CARD_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MamError(f"{path} does not exist: is {directory} a mam merge or finetune output?") from None
    section = evaluation_section(evaluation)
    start, end = text.find(BEGIN), text.find(END)
    if 0 <= start < end:
        new = text[:start] + section[section.index(BEGIN):] + text[end + len(END) + 1:]
    else:  # an edited card without markers: append
        new = text.rstrip("\n") + "\n\n" + section
    _write_text(path, new)
    report_path = Path(directory) / "mam_report.json"
    if report_path.is_file():
        report = _read_json(report_path, "report")
        hashes = (report.get("outputs") or {}).get("hashes")
        if isinstance(hashes, dict):
            for name in (CARD_FILE, EVAL_FILE):
                if (Path(directory) / name).is_file():
                    hashes[name] = sha256_file(Path(directory) / name, use_cache=False)
            write_json(report_path, report)
    return path


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MamError(f"cannot write {path}: {e.strerror}") from None
