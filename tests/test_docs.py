"""Every example in README.md and docs/*.md is checked against the real CLI, and run where it can be.

The pages are found by glob, so a new page is covered the day it lands.
* ```toml / ```json blocks are configs a mam command reads (architecture maps, λ files): each is written to a file,
  read by mam's own loader and used in a real command. A block of another kind fails until it gets a checker here or
  a reason in NOT_CHECKED.
* `mam …` lines in shell blocks are parsed by the real click command (subcommand, options, their types, required
  values), then run in order in one folder: tiny models stand in for hub models, the shared audio for datasets, and
  `--limit` keeps data commands short. A line elided with … is only option-checked; NOT_RUN gives the other reasons.
* `mam …` in inline code: the subcommand exists and accepts every option shown.
* ```python blocks run with the same stand-ins.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import soundfile
import torch
import typer
from safetensors.torch import save_file

from conftest import ROOT, SHARED
from mamcli.aliases import ALIASES
from mamcli.cli import app
from mamcli.errors import MamError
from mamcli.families import FAMILIES, SOURCE_MODALITIES, Family, load_family_file
from mamcli.layers import load_lams

PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
SHELL = {"sh", "bash", "shell", "console", "zsh", ""}
FENCE = re.compile(r"^[ \t]*```([\w+-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)  # also inside list items
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# where mam is invoked: the command itself, or the module under a launcher (accelerate launch, torchrun)
MAM = re.compile(r"^(?:\$\s+)?mam\s+(.*)$|\s-m\s+mamcli\.cli\s+(.*)$")
ELIDED = ("…", "...")
NUMBER = re.compile(r"^-\d*\.?\d+(e-?\d+)?$")
LIMIT = {"rank-layers": "2", "search": "2"}  # clips per data command when a docs example runs: one, or what it needs

# docs examples that are parsed and option-checked but not run, and why (page, start of the command, reason)
NOT_RUN: list[tuple[str, str, str]] = [
    ("docs/scaling.md", "mam evaluate hubert-large --data librispeech:",
     "needs LibriSpeech test-clean (5.4 h, not shipped here); tests/test_distributed.py runs launched sweeps"),
    ("docs/scaling.md", "mam rank-layers bert-large hubert-large --data librispeech:",
     "needs LibriSpeech test-clean (5.4 h, not shipped here); tests/test_distributed.py runs launched rank-layers"),
    ("README.md", "mam evaluate ast --data esc50:",
     "needs a classifier whose labels name all 50 ESC-50 classes: the tiny AST has 10 made-up labels (and the real "
     "AST's AudioSet labels do not name e.g. 'crackling_fire' either, so the real run needs --label-map)"),
]
# toml/json blocks that are not configs mam reads (page, start of the block, reason); none so far
NOT_CHECKED: list[tuple[str, str, str]] = []

# hub aliases → tiny models of the same family and depth; every width is 32 and every head count 4, so any pair merges
STANDINS: dict[str, tuple[str, int]] = {
    "bert-base": ("bert", 12), "bert-large": ("bert", 24), "roberta-base": ("roberta", 12),
    "roberta-large": ("roberta", 24), "distilbert-base": ("distilbert", 6), "vit-base": ("vit", 12),
    "vit-large": ("vit", 24), "deit-base": ("deit", 12), "hubert-large": ("hubert-ctc", 24),
    "hubert-base": ("hubert-ctc", 12), "wav2vec2-base": ("wav2vec2-ctc", 12), "wav2vec2-large": ("wav2vec2-ctc", 24),
    "wavlm-base-plus": ("wavlm-ctc", 12), "data2vec-audio-base": ("data2vec-audio-ctc", 12), "ast": ("ast", 12),
    "whisper-base": ("whisper", 6), "whisper-small": ("whisper", 12),
}
BEATS = re.compile(r"^BEATs\w*\.pt$", re.I)  # official BEATs releases, by file name
LJ = SHARED / "ljspeech-385" / "LJSpeech-1.1"
DATA_STANDINS = {"esc50": SHARED / "esc50-fold4" / "ESC-50", "folders": SHARED / "esc10" / "ESC-10",
                 "fsdd": SHARED / "fsdd" / "recordings"}  # and ljspeech: the `short_lj` fixture


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    args: tuple[str, ...]  # after `mam`
    inline: bool

    @property
    def elided(self) -> bool:
        return any(e in a for a in self.args for e in ELIDED)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}:mam {' '.join(self.args)}"[:120]


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page.name


def _blocks(pages: list[Path]) -> list[Block]:
    out = []
    for page in pages:
        text = page.read_text()
        for m in FENCE.finditer(text):
            out.append(Block(_name(page), text.count("\n", 0, m.start()) + 1, m[1].lower(), textwrap.dedent(m[2])))
    return out


def _mam_args(line: str) -> tuple[str, ...] | None:
    m = MAM.search(line)
    if m is None:
        return None
    rest = re.sub(r"(^|\s)#.*$", "", m[1] if m[1] is not None else m[2])  # a shell comment
    return tuple(shlex.split(rest))


def _shell_commands(block: Block) -> list[Command]:
    """`mam` lines of a shell block, with backslash continuations joined."""
    out: list[Command] = []
    lines = block.text.split("\n")
    i = 0
    while i < len(lines):
        start, line = i, lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i].strip()
        args = _mam_args(line.strip())
        if args is not None:
            out.append(Command(block.page, block.line + 1 + start, args, inline=False))
        i += 1
    return out


def _inline_commands(pages: list[Path]) -> list[Command]:
    out = []
    for page in pages:
        prose = FENCE.sub(lambda m: "\n" * m[0].count("\n"), page.read_text())  # blocks out, line numbers kept
        for m in INLINE.finditer(prose):
            args = _mam_args(m[1].strip())
            if args:
                out.append(Command(_name(page), prose.count("\n", 0, m.start()) + 1, args, inline=True))
    return out


BLOCKS = _blocks(PAGES)
CONFIGS = [b for b in BLOCKS if b.lang in ("toml", "json")]
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL and _shell_commands(b)]
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang in ("python", "py")]
COMMANDS = [c for b in SHELL_BLOCKS for c in _shell_commands(b)] + _inline_commands(PAGES)
CLI = typer.main.get_command(app)


def _not_run(cmd: Command) -> str | None:
    text = "mam " + " ".join(cmd.args)
    return next((why for page, start, why in NOT_RUN if cmd.page == page and text.startswith(start)), None)


SAMPLE_PAGE = """# A page
Run `mam merge A B --lam 0.1 -o out/` or `mam families`; `--parts` alone is no command.
```sh
$ mam map bert-base hubert-base   # a comment
mam rank-layers bert-large hubert-large --data ljspeech:LJSpeech-1.1 \\
    --top-k 8 -o ranking.json
accelerate launch -m mamcli.cli finetune …
make demo
```
* a λ file:

  ```json
  {"lams": [0.1, 0.2]}
  ```
"""


def test_the_docs_examples_are_found(tmp_path):
    """The extraction itself: a regression here would silently check nothing."""
    page = tmp_path / "page.md"
    page.write_text(SAMPLE_PAGE)
    blocks = _blocks([page])
    assert [(b.line, b.lang) for b in blocks] == [(3, "sh"), (12, "json")]
    assert json.loads(blocks[1].text) == {"lams": [0.1, 0.2]}
    assert [(c.line, c.args, c.elided) for c in _shell_commands(blocks[0])] == [
        (4, ("map", "bert-base", "hubert-base"), False),
        (5, ("rank-layers", "bert-large", "hubert-large", "--data", "ljspeech:LJSpeech-1.1", "--top-k", "8", "-o",
             "ranking.json"), False),
        (7, ("finetune", "…"), True)]
    assert [(c.line, c.args) for c in _inline_commands([page])] == [
        (2, ("merge", "A", "B", "--lam", "0.1", "-o", "out/")), (2, ("families",))]
    # and the real pages: this page's own examples, and a run for every shell block
    assert {b.page for b in CONFIGS} >= {"docs/architectures.md", "docs/merging.md"}
    assert {"README.md", "docs/beats.md"} <= {b.page for b in SHELL_BLOCKS}
    for page_name, start, _ in NOT_RUN:  # a stale entry would hide nothing and mislead
        assert any(c.page == page_name and ("mam " + " ".join(c.args)).startswith(start) for c in COMMANDS), start


def _unknown_options(cmd: Any, args: list[str]) -> list[str]:
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    return [a.split("=", 1)[0] for a in args
            if a.startswith("-") and not NUMBER.match(a) and a.split("=", 1)[0] not in known]


def _parse(args: tuple[str, ...]) -> dict[str, Any]:
    """The subcommand's parameters, parsed exactly as `mam` parses them (a usage error raises); {} for `mam --…`."""
    if not args or args[0] not in CLI.commands:
        return {}
    name, *rest = args
    return CLI.commands[name].make_context(f"mam {name}", list(rest)).params


def _check_invocation(cmd: Command) -> None:
    """The subcommand and every option shown exist; a complete shell example parses as mam parses it."""
    lead = list(itertools.takewhile(lambda a: a.startswith("-"), cmd.args))  # options of `mam` itself (--version)
    assert not _unknown_options(CLI, lead), f"`mam` has no option {', '.join(_unknown_options(CLI, lead))}"
    if len(lead) == len(cmd.args):
        return
    name = cmd.args[len(lead)]
    assert name in CLI.commands, f"`mam {name}` is no subcommand (there are: {', '.join(CLI.commands)})"
    shown = [a.strip("[]") for a in cmd.args[len(lead) + 1:] if a not in ELIDED]
    unknown = _unknown_options(CLI.commands[name], shown)
    assert not unknown, f"`mam {name}` has no option {', '.join(unknown)}"
    if not cmd.inline and not cmd.elided:  # prose and elided lines show fragments, not whole invocations
        try:
            _parse(cmd.args[len(lead):])
        except typer.TyperException as e:
            raise AssertionError(f"mam {' '.join(cmd.args)}: {e.format_message()}") from None


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.id)
def test_mam_examples_are_valid_invocations(cmd: Command):
    _check_invocation(cmd)


@pytest.mark.parametrize(("line", "inline", "error"), [
    ("mam marge a b --lam 0.1 -o out", False, "`mam marge` is no subcommand"),
    ("mam evaluate m --data ljspeech:x --beam-width 4", True, "has no option --beam-width"),
    ("mam merge a b [--lams-file f] -o out …", False, "has no option --lams-file"),
    ("mam merge a b --lam high -o out", False, "Invalid value for '--lam'"),
    ("mam finetune m --data ljspeech:x", False, "Missing option '-o'"),
    ("mam verify a b", False, "Got unexpected extra argument"),
])
def test_the_invocation_check_catches(line: str, inline: bool, error: str):
    """The check is not a formality: each kind of docs rot fails it."""
    args = _mam_args(line)
    assert args is not None
    with pytest.raises(AssertionError, match=re.escape(error)):
        _check_invocation(Command("x.md", 1, args, inline))


# ---- running the examples ------------------------------------------------------------------------------------


def _here(spec: str) -> Path | None:
    """A path of the docs, from the current folder (what earlier examples wrote) or else the repository root."""
    return next((p for p in (Path(spec), ROOT / spec) if p.exists()), None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def short_lj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LJ Speech's 80 shortest clips (1-2 s), in its own layout: real audio and transcripts, but the examples'
    sweeps and fine-tunes take half the time they take on its first clips (about 10 s each)."""
    rows = [r for r in (LJ / "metadata.csv").read_text().splitlines() if r]
    seconds = {r: soundfile.info(str(LJ / "wavs" / f"{r.split('|')[0]}.flac")).duration for r in rows}
    short = sorted(rows, key=seconds.__getitem__)[:80]
    root = tmp_path_factory.mktemp("lj") / "LJSpeech-1.1"
    (root / "wavs").mkdir(parents=True)
    (root / "metadata.csv").write_text("\n".join(short) + "\n")
    for r in short:
        name = f"{r.split('|')[0]}.flac"
        (root / "wavs" / name).symlink_to(LJ / "wavs" / name)
    return root


@pytest.fixture(scope="module")
def standin(tiny: Callable[..., Path]) -> Callable[[str], Path | None]:
    """What a path or model name in the docs means here, or None.

    The docs are written for a shell in the repository root: a path found there is used as it is (real weights in
    `.cache/models`, `../shared/…`); a hub alias, its hub id or an official BEATs file name gets a tiny model."""
    by_hub = {hub: alias for alias, (hub, _) in ALIASES.items()}

    def get(spec: str) -> Path | None:
        if (path := _here(spec)) is not None:
            return path
        alias = by_hub.get(spec, spec)
        if alias in STANDINS:
            kind, layers = STANDINS[alias]
            return tiny(kind, layers=layers)
        if BEATS.match(Path(spec).name):
            return tiny("beats-ft" if "finetuned" in spec.lower() else "beats", layers=12)
        return None

    return get


def _substitute(args: tuple[str, ...], standin: Callable[[str], Path | None], data: dict[str, Path]) -> list[str]:
    """The example's arguments with stand-ins for models and data that are not here, and --limit on data commands."""
    params = _parse(args)
    swap: dict[str, str] = {}
    given = [params.get("target"), *(s if isinstance(s := params.get("source"), list) else [s])]  # search: several
    for spec in given:
        if spec:
            local = standin(spec)
            if local is None:
                pytest.fail(f"mam {' '.join(args)}: no tiny stand-in for model {spec!r}: add one to STANDINS "
                            "in tests/test_docs.py, or a reason to NOT_RUN")
            swap[spec] = str(local)
    spec = params.get("data")
    if spec and ":" in spec:
        kind, where = spec.split(":", 1)
        local = _here(where) or data.get(kind)
        if local is None:
            pytest.fail(f"mam {' '.join(args)}: no stand-in for {kind!r} data: add one to DATA_STANDINS or NOT_RUN")
        swap[spec] = f"{kind}:{local}"
    out = [swap.get(a, a) for a in args]
    if "limit" in params and params["limit"] is None:
        out += ["--limit", LIMIT.get(args[0], "1")]
    target = params.get("out")
    if target is not None and target.exists() and not params.get("force") and not params.get("resume"):
        shutil.rmtree(target) if target.is_dir() else target.unlink()  # examples reuse `-o out/`: each one as if first
    return out


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.id)
def test_shell_examples_run(block: Block, mam, standin, short_lj, tmp_path, monkeypatch):
    """Each block's `mam` lines, in order, in one folder (later lines read what earlier ones wrote)."""
    monkeypatch.chdir(tmp_path)
    ran = 0
    for cmd in _shell_commands(block):
        if cmd.elided or _not_run(cmd):
            continue
        args = _substitute(cmd.args, standin, {**DATA_STANDINS, "ljspeech": short_lj})
        r = mam(*args)
        assert r.code == 0, f"{cmd.id}\n{r.err[-2000:]}"
        params = _parse(cmd.args)
        if params.get("out") is not None:
            assert params["out"].exists(), f"{cmd.id}: wrote no {params['out']}"
        ran += 1
    assert ran, f"{block.id}: no example ran"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_python_examples_run(block: Block, standin, tmp_path, monkeypatch):
    """Python examples run as written, with stand-ins for the quoted model aliases."""
    monkeypatch.chdir(tmp_path)

    def local(m: re.Match[str]) -> str:
        path = standin(m[2])
        return repr(str(path)) if path is not None and str(path) != m[2] else m[0]

    code = re.sub(r"""(["'])([\w./-]+)\1""", local, block.text)
    exec(compile(code, block.id, "exec"), {"__name__": "docs_example"})


# ---- config blocks ---------------------------------------------------------------------------------------------


def _config(block: Block) -> Any:
    import tomllib

    return tomllib.loads(block.text) if block.lang == "toml" else json.loads(block.text)


def _is_arch_map(data: Any) -> bool:
    items = data.get("families", [data]) if isinstance(data, dict) else data
    return isinstance(items, list) and bool(items) and all(isinstance(d, dict) and "layouts" in d for d in items)


def _is_lams(data: Any) -> bool:
    return (isinstance(data, list) and all(isinstance(x, int | float) for x in data)) or (
        isinstance(data, dict) and "lams" in data)


def _marker_name(pattern: str) -> str:
    """A tensor name that a family's marker regex finds (anchors dropped, escaped dots kept)."""
    name = re.sub(r"^\(\^\|\\\.\)|\$$|^\^", "", pattern).replace("\\.", ".")
    assert re.search(pattern, name), f"cannot make a tensor name for marker {pattern!r}"
    return name


def _checkpoint_of(fam: Family, layout_index: int, path: Path, layers: int, hidden: int = 32) -> set[str]:
    """A checkpoint with the family's tensor names and config keys; returns the Q/K/V names mam must map."""
    lay = fam.layouts[layout_index]
    tensors: dict[str, torch.Tensor] = {_marker_name(m): torch.zeros(hidden) for m in fam.markers}
    expected = set()
    for i in range(layers):
        base = lay.layer.format(i=i)
        for part, module in lay.parts.items():
            tensors[f"{base}.{module}.weight"] = torch.randn(hidden, hidden)
            if part != "o":
                expected.add(f"{base}.{module}.weight")
        if lay.fused:
            tensors[f"{base}.{lay.fused}.weight"] = torch.randn(3 * hidden, hidden)
            expected |= {f"{base}.{lay.fused}.weight[{r * hidden}:{(r + 1) * hidden}]" for r in range(3)}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    config = {fam.layers_keys[0]: layers, fam.hidden_keys[0]: hidden, fam.heads_keys[0]: 4}
    if fam.model_types:
        config["model_type"] = fam.model_types[0]
    (path / "config.json").write_text(json.dumps(config))
    return expected


def _lam_layers(data: Any) -> int:
    lams = data["lams"] if isinstance(data, dict) else data
    return len(next(iter(lams.values())) if isinstance(lams, dict) else lams)


def _check_config(block: Block, mam: Callable[..., Any], tiny: Callable[..., Path], tmp_path: Path) -> None:
    """An architecture map maps a BERT onto a checkpoint built from it; a λ file drives a real merge."""
    data = _config(block)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"example.{block.lang}"
    path.write_text(block.text)
    if _is_arch_map(data):
        families = load_family_file(path)
        r = mam("families", "--arch-map", path, "--format", "json")
        assert r.code == 0, r.err
        listed = {row["family"]: row for row in json.loads(r.out)}
        for fam in families:
            assert listed[fam.name]["model_types"] == ",".join(fam.model_types)
            # the built checkpoint takes its family's side: a text/image family is a source, any other a target
            side = "source" if fam.modality in SOURCE_MODALITIES else "target"
            other = tiny("hubert-ctc" if side == "source" else "bert", layers=3)
            for k in range(len(fam.layouts)):
                model = tmp_path / f"{fam.name}-{k}"
                expected = _checkpoint_of(fam, k, model, layers=3)
                pair = (model, other) if side == "source" else (other, model)
                r = mam("map", *pair, "--arch-map", path, "--format", "json")
                assert r.code == 0, r.err
                assert {row[side] for row in json.loads(r.out)} == expected
    elif _is_lams(data):
        layers = _lam_layers(data)
        src, tgt = tiny("bert", layers=layers), tiny("hubert-ctc", layers=layers)
        lams = load_lams(path, layers, ("q", "k", "v"))
        r = mam("merge", src, tgt, "--lams", path, "-o", tmp_path / "out", "--json", "-q")
        assert r.code == 0, r.err
        merged = {(t["layer"], t["part"]): t["lam"] for t in json.loads(r.out)["tensors"] if t["kind"] == "weight"}
        assert merged == {(i, p): lam for i, per in lams.items() for p, lam in per.items() if lam > 0}
    else:
        pytest.fail(f"{block.id}: a {block.lang} block that is neither an architecture map nor a λ file: teach "
                    "tests/test_docs.py to check it, or give NOT_CHECKED a reason")


@pytest.mark.parametrize("block", CONFIGS, ids=lambda b: b.id)
def test_config_examples_load_and_work(block: Block, mam, tiny, tmp_path):
    skip = next((why for page, start, why in NOT_CHECKED
                 if block.page == page and block.text.lstrip().startswith(start)), None)
    if skip:
        pytest.skip(skip)
    _check_config(block, mam, tiny, tmp_path)


FUSED_IN_PARTS = """name = "old"
[[layouts]]
layer = "enc.blocks.{i}"
attention = "sa"
[layouts.parts]
o = "sa.wo"
fused = "sa.qkv"
"""


def test_the_config_check_catches_broken_and_checks_lam_files(mam, tiny, tmp_path):
    """The check is not a formality: the old page's fused-inside-parts layout fails it, a λ file passes it."""
    with pytest.raises(MamError, match="fused"):
        _check_config(Block("x.md", 1, "toml", FUSED_IN_PARTS), mam, tiny, tmp_path / "a")
    for i, text in enumerate(['{"lams": [0.1, 0, 0.3]}', '{"lams": {"q": [0.2, 0.1], "k": [0, 0], "v": [1, 0.5]}}']):
        _check_config(Block("x.md", 1, "json", text), mam, tiny, tmp_path / f"l{i}")
    with pytest.raises(pytest.fail.Exception, match="neither an architecture map nor a λ file"):
        _check_config(Block("x.md", 1, "json", '{"wer": 0.1}'), mam, tiny, tmp_path)


def test_the_families_table_lists_every_built_in_family():
    """docs/architectures.md's table against the code: every family, each with its modality."""
    text = (ROOT / "docs" / "architectures.md").read_text()
    row = re.compile(r"^\| ([a-z0-9-]+) \| (text|image|speech|audio) \|", re.M)
    assert [m.groups() for m in row.finditer(text)] == [(f.name, f.modality) for f in FAMILIES]
