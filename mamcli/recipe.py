"""Merge recipes: a YAML file that holds everything `mam merge` takes, as mergekit users keep theirs.

Every merge writes ``mam_recipe.yaml`` beside its output: the models as exact references (a hub id
pinned to its commit, or an absolute path) and the per-layer λ table that was applied, so
``mam merge --config OUT/mam_recipe.yaml -o OUT2`` writes the same bytes as OUT. A hand-written
recipe may use the flags' own forms instead (``lam`` + ``layers``, a ``lams`` file, ``layer_map: stride``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mamcli.errors import MamError, UsageError

RECIPE_FILE = "mam_recipe.yaml"
# key → the types its value may have (the CLI flag of the same name, with _ for -)
KEYS: dict[str, tuple[type, ...]] = {
    "source": (str,), "target": (str,), "out": (str,), "lam": (int, float), "lams": (str, dict, list),
    "layers": (str, int, list), "parts": (str, list), "bias": (bool,), "noise": (str,), "seed": (int,),
    "layer_map": (str, list), "shard_size": (str, int), "out_dtype": (str,), "revision": (str,),
    "arch_map": (str, list),
}


@dataclass
class Recipe:
    values: dict[str, Any]
    path: Path

    def get(self, key: str) -> Any:
        return self.values.get(key)


def _as_list_spec(value: Any) -> str:
    """``[0, 4, 7]`` → ``"0,4,7"``: lists are written as the comma lists the flags take."""
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def load_recipe(path: Path) -> Recipe:
    """Read and check a recipe: YAML mapping, known keys, values of the flags' types; one line when not."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MamError(f"recipe {path} does not exist") from None
    except IsADirectoryError:
        raise MamError(f"recipe {path} is a folder; give its {RECIPE_FILE}") from None
    except UnicodeDecodeError:
        raise MamError(f"recipe {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise MamError(f"recipe {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise MamError(f"recipe {path}: expected a mapping of merge options, got {type(data).__name__}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in KEYS:
            raise UsageError(f"recipe {path}: unknown key {key!r} (known: {', '.join(KEYS)})")
        if value is not None and (not isinstance(value, KEYS[name]) or (isinstance(value, bool) and bool not in
                                                                        KEYS[name])):
            want = " or ".join(t.__name__ for t in KEYS[name])
            raise MamError(f"recipe {path}: {key} must be {want}, got {type(value).__name__}")
        values[name] = value
    for name in ("layers", "parts", "layer_map"):
        if values.get(name) is not None:
            values[name] = _as_list_spec(values[name])
    lams = values.get("lams")
    if isinstance(lams, list):  # one list for every part merged
        lams = dict.fromkeys((p.strip() for p in (values.get("parts") or "q,k,v").split(",")), lams)
    if isinstance(lams, dict):
        values["lams"] = table_to_lams(lams, path)
    elif isinstance(lams, str):
        values["lams"] = Path(lams)
    if isinstance(values.get("arch_map"), str):
        values["arch_map"] = [values["arch_map"]]
    return Recipe(values, path)


def table_to_lams(table: dict[str, Any], path: Path) -> dict[int, dict[str, float]]:
    """``{q: [λ0, λ1, …], k: …}`` (the report's per-part table) → ``{layer: {part: λ}}`` of non-zero λ."""
    from mamcli.schemas import LAM_TABLE, check

    lams: dict[int, dict[str, float]] = {}
    for part, values in check(LAM_TABLE, table, path, "recipe").items():
        for i, lam in enumerate(values):
            if lam:
                lams.setdefault(i, {})[part] = float(lam)
    return lams


def dump_recipe(values: dict[str, Any]) -> str:
    """The recipe as YAML with a header that says how to replay it."""
    import yaml

    from mamcli import __version__

    head = f"# mam {__version__} merge recipe; replay: mam merge --config {RECIPE_FILE} -o OUT\n"
    return head + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, default_flow_style=None, width=120)
