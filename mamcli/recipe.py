"""Merge recipes: a YAML file that holds everything `mam merge` takes, as mergekit users keep theirs.

Every merge writes ``mam_recipe.yaml`` beside its output: the models as exact references (a hub id
pinned to its commit, or an absolute path) and the per-layer λ table that was applied, so
``mam merge --config OUT/mam_recipe.yaml -o OUT2`` writes the same bytes as OUT; an aligned merge's recipe
names its ``mam_align.json`` (``align``), so the replay reads those permutations instead of solving again.
A hand-written recipe may use the flags' own forms instead (``lam`` + ``layers``, a ``lams`` file,
``layer_map: stride``, ``align: weights``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mamcli.errors import MamError, UsageError

RECIPE_FILE = "mam_recipe.yaml"


@dataclass
class Recipe:
    """The keys a recipe sets, typed by :class:`mamcli.schemas.MergeRecipe`; ``lams`` is a λ file's path or
    the per-layer table ``{layer: {part: λ}}``."""

    values: dict[str, Any]
    path: Path

    def get(self, key: str) -> Any:
        return self.values.get(key)


def load_recipe(path: Path) -> Recipe:
    """Read and check a recipe: YAML mapping, known keys, values of the flags' types; one line when not."""
    import yaml

    from mamcli.schemas import MergeRecipe, check

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
    named = {str(key).replace("-", "_"): value for key, value in data.items()}
    for key, name in zip(data, named, strict=True):
        if name not in MergeRecipe.model_fields:  # a typo is a usage error (exit 2), as an unknown flag is
            raise UsageError(f"recipe {path}: unknown key {key!r} (known: {', '.join(MergeRecipe.model_fields)})")
    values = {k: v for k, v in check(MergeRecipe, named, path, "recipe") if v is not None}  # as validated
    lams = values.get("lams")
    if isinstance(lams, list):  # one list for every part merged
        lams = dict.fromkeys((p.strip() for p in values.get("parts", "q,k,v").split(",")), lams)
    if isinstance(lams, dict):
        values["lams"] = table_to_lams(lams)
    return Recipe(values, path)


def overlay(recipe: Recipe, flags: dict[str, Any], given: Collection[str]) -> dict[str, Any]:
    """The merge's options: a flag given on the command line (``given``) wins, then the recipe, then the flag's
    default. The recipe's per-layer λ table comes back as ``lam_table`` (``lams`` is only ever a file), unless
    a λ is set otherwise (``lam`` or ``lams``): that replaces the table, as one λ source excludes another."""
    values = dict(flags) | {k: v for k, v in recipe.values.items() if k not in given}
    table = values.pop("lams") if isinstance(values.get("lams"), dict) else None
    values.setdefault("lams", flags.get("lams"))
    values["lam_table"] = table if values["lam"] is None and values["lams"] is None else None
    return values


def table_to_lams(table: dict[str, list[float]]) -> dict[int, dict[str, float]]:
    """``{q: [λ0, λ1, …], k: …}`` (the report's per-part table) → ``{layer: {part: λ}}`` of non-zero λ."""
    lams: dict[int, dict[str, float]] = {}
    for part, values in table.items():
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
