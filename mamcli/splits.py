"""A corpus and the parts a command reads from it: train, dev, test or all.

`rank-layers` reads one part, `evaluate --pick-on-dev` two (dev, then test), `finetune` two (train and dev).
Each part is a seeded selection of the same loaded corpus, so the corpus is parsed once per command however
many parts it uses (Common Voice, which ships its own train/dev/test tsv files, loads each tsv once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mamcli.data import Dataset


@dataclass
class Corpus:
    """The data options of a command (``--data``, ``--subset``, ``--dev-fraction``, ``--folds``, ``--limit``,
    ``--seed`` …); :meth:`part` gives each part as the corpus defines it."""

    spec: str
    text_field: str = "normalized"
    subset: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    dev_fraction: float = 0.1
    folds: str | None = None
    limit: int | None = None
    seed: int = 0
    _loaded: dict[str | None, Dataset] = field(default_factory=dict, repr=False)

    def part(self, name: str, fraction: float | None = None) -> Dataset:
        """``all``, ``dev``, ``test`` or ``train`` (everything outside dev); ``fraction``: a seeded share of it."""
        from mamcli.data import load_dataset, own_split, parse_folds, select

        subset, split = own_split(self.spec, name, self.subset)
        if subset not in self._loaded:
            self._loaded[subset] = load_dataset(self.spec, self.text_field, subset=subset,
                                                text_column=self.text_column, label_column=self.label_column)
        return select(self._loaded[subset], split, self.dev_fraction, self.seed, parse_folds(self.folds),
                      self.limit, fraction)
