"""The files mam reads, checked at the boundary: one small schema per kind of file.

A file that parses but holds the wrong shape (a ranking whose metrics are a list, a λ that is a
string, a folder where a file is expected, bytes that are not UTF-8) is one line naming the file,
the field and what was expected (exit 1), never a crash further in. The schemas are pydantic models:
pydantic is already installed (typer depends on it), it reports the exact path of a bad field, and
a model per file kind keeps each contract in one place instead of checks scattered through the code.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
)
from pydantic import ValidationError as _ValidationError

from mamcli.errors import MamError

T = TypeVar("T")

Lam = Annotated[StrictFloat | StrictInt, Field(ge=0, le=1, allow_inf_nan=False)]
Part = Literal["q", "k", "v", "o"]


class _Open(BaseModel):
    """A file mam reads some fields of: other fields are the writer's business."""

    model_config = ConfigDict(extra="allow")


class RankedMetric(_Open):
    order: list[Annotated[StrictInt, Field(ge=0)]]


class Ranking(_Open):
    """A `mam rank-layers` report: per metric, the target layers best first."""

    metrics: Annotated[dict[StrictStr, RankedMetric], Field(min_length=1)]
    primary_metric: StrictStr | None = None


LamList = list[Lam]
LamTable = dict[Part, LamList]


class LamsFile(_Open):
    """``lams.json`` of `mam finetune`: ``{"lams": [...]}`` or ``{"lams": {"q": [...], ...}}``."""

    lams: LamList | LamTable


class _Recipe(_Open):
    lams: LamList | LamTable


class ReportLams(_Open):
    """A `mam merge` report: λ in its ``recipe``."""

    recipe: _Recipe


LAMS = TypeAdapter(LamList | LamsFile | ReportLams)
LAM_TABLE = TypeAdapter(LamTable)


def _comma_list(value: str | int | list[str | int]) -> str:
    """``[0, 4, 7]`` → ``"0,4,7"``: a list in a recipe is the comma list its flag takes."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _path(value: str) -> Path:
    return Path(value)


def _paths(value: str | list[str]) -> list[Path]:
    """One ``--arch-map`` file or a list of them."""
    return [Path(p) for p in ([value] if isinstance(value, str) else value)]


ALIGN_MODES = ("none", "weights", "activations")  # align.ALIGN_MODES (align imports torch; the schema must not)


def check_align(value: str) -> str:
    """``--align``: a mode, or the ``mam_align.json`` of an aligned merge to replay (what its recipe names)."""
    if value not in ALIGN_MODES and not value.endswith(".json"):
        raise ValueError(f"must be one of {', '.join(ALIGN_MODES)} or a path to a mam_align.json")
    return value


CommaList = Annotated[StrictStr | StrictInt | list[StrictStr | StrictInt], AfterValidator(_comma_list)]
AsPath = Annotated[StrictStr, AfterValidator(_path)]


class MergeRecipe(BaseModel):
    """``mam_recipe.yaml``: the options of `mam merge`, each under its flag's name (``_`` for ``-``), already in
    the types the merge takes, so a recipe overlays the flags key by key with no conversion of its own."""

    model_config = ConfigDict(extra="forbid")
    source: StrictStr | None = None
    target: StrictStr | None = None
    out: AsPath | None = None
    lam: StrictFloat | StrictInt | None = None
    lams: AsPath | LamTable | LamList | None = None  # a λ file, or the per-part table an output's recipe holds
    layers: CommaList | None = None
    parts: CommaList | None = None
    bias: StrictBool | None = None
    noise: Literal["source", "target", "normal"] | None = None  # merge.NOISE_KINDS
    seed: Annotated[StrictInt, Field(ge=0)] | None = None
    layer_map: CommaList | None = None
    shard_size: Annotated[StrictStr | StrictInt, AfterValidator(_comma_list)] | None = None  # 2GB, or bytes
    out_dtype: Literal["fp32", "fp16", "bf16"] | None = None  # merge.OUT_DTYPES
    revision: StrictStr | None = None
    arch_map: Annotated[StrictStr | list[StrictStr], AfterValidator(_paths)] | None = None
    align: Annotated[StrictStr, AfterValidator(check_align)] | None = None  # an aligned merge's: its mam_align.json


class ShardIndex(_Open):
    """``model.safetensors.index.json``: tensor name → shard file."""

    weight_map: Annotated[dict[StrictStr, StrictStr], Field(min_length=1)]


class LayoutSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: StrictStr
    attention: StrictStr
    parts: dict[Part, StrictStr] = Field(default_factory=dict)
    fused: StrictStr | None = None


class FamilySpec(BaseModel):
    """One architecture family of an ``--arch-map`` file (docs/architectures.md)."""

    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    description: StrictStr | None = None
    modality: StrictStr = "unknown"
    model_types: list[StrictStr] = Field(default_factory=list)
    layouts: Annotated[list[LayoutSpec], Field(min_length=1)]
    layers_keys: list[StrictStr] = Field(default_factory=lambda: ["num_hidden_layers"])
    hidden_keys: list[StrictStr] = Field(default_factory=lambda: ["hidden_size"])
    heads_keys: list[StrictStr] = Field(default_factory=lambda: ["num_attention_heads"])
    markers: list[StrictStr] = Field(default_factory=list)
    frontend: list[StrictStr] = Field(default_factory=list)


class _Families(BaseModel):
    model_config = ConfigDict(extra="forbid")
    families: Annotated[list[FamilySpec], Field(min_length=1)]


FAMILY_FILE = TypeAdapter(_Families | Annotated[list[FamilySpec], Field(min_length=1)] | FamilySpec)
LABEL_MAP = TypeAdapter(Annotated[dict[StrictStr, StrictStr], Field(min_length=1)])
HASH_CACHE = TypeAdapter(dict[StrictStr, StrictStr])
JSON_OBJECT = TypeAdapter(dict[StrictStr, Any])
FLAG = TypeAdapter(StrictBool)


def read_text(path: Path, what: str) -> str:
    """A text file's content, or one line saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM from a spreadsheet or Windows editor is fine
    except FileNotFoundError:
        raise MamError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise MamError(f"{what} {path} is a folder, not a file") from None
    except UnicodeDecodeError as e:
        raise MamError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise MamError(f"cannot read {what} {path}: {e.strerror}") from None


def read_json(path: Path, what: str) -> Any:
    text = read_text(path, what)
    try:
        return json.loads(text)
    except ValueError as e:
        raise MamError(f"{what} {path} is not valid JSON ({e})") from None


def read_json_or_toml(path: Path, what: str) -> Any:
    if path.suffix != ".toml":
        return read_json(path, what)
    try:
        return tomllib.loads(read_text(path, what))
    except tomllib.TOMLDecodeError as e:
        raise MamError(f"{what} {path} is not valid TOML ({e})") from None


_BRANCHES = ("list", "dict", "int", "float", "str", "bool", "function-after", "constrained-int", "constrained-float")


def _where(loc: tuple[Any, ...]) -> str:
    """pydantic's location without its union-branch names: ``metrics.swd.order[0]``."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif not ("[" in x or x[:1].isupper() or x in _BRANCHES):
            out += f".{x}" if out else x
    return out


def check(adapter: TypeAdapter[T] | type[T], data: Any, path: Path | str, what: str) -> T:
    """``data`` as the schema says, or one line naming the file, the field and what it should be."""
    ta = adapter if isinstance(adapter, TypeAdapter) else TypeAdapter(adapter)
    try:
        return ta.validate_python(data)
    except _ValidationError as e:
        errors = sorted(e.errors(include_url=False), key=lambda x: -len(x["loc"]))  # the deepest says most
        first = errors[0]
        field = _where(tuple(first["loc"]))
        got = type(first["input"]).__name__ if first.get("input") is not None else "nothing"
        at = f" field {field}:" if field else ""
        raise MamError(f"{what} {path}:{at} {first['msg'].lower()} (got {got})") from None
