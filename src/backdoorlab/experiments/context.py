"""What a report's tables and figures render from (:class:`Context`), and the checks of their
``where`` filters and field names that both share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .spec import INSPECTED, Experiment
from .table import CELL_KINDS, FIELDS, field_order


@dataclass
class Context:
    """What a table or plot renders from."""

    exp: Experiment
    out: Path
    rows: list[dict]  # the results table
    identities: list[dict]  # every cell of the grid, in order (for ordering and for cell folders)
    order: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.order = field_order(self.identities)


def names(exp: Experiment) -> dict[str, list[str]]:
    """The values each field may take in this experiment (for checking ``where`` filters)."""
    groups = exp.group_labels()
    return {"dataset": [d.name for d in exp.datasets], "model": [m.label for m in exp.models], "attack": exp.attack_labels() + groups,
            "group": groups, "defense": [d.label for d in exp.defenses], "seed": [str(s) for s in exp.seeds], "kind": list(CELL_KINDS),
            "inspected": list(INSPECTED), "repeat": [str(r) for r in range(max([d.repeats for d in exp.defenses], default=1))]}


def check_where(where: dict, allowed: dict[str, list[str]]) -> None:
    for k, v in where.items():
        if k not in FIELDS:
            raise ConfigError(f"where.{k}", f"unknown field; known: {', '.join(FIELDS)}")
        if k == "metric":
            continue
        for x in v if isinstance(v, list) else [v]:
            if str(x) not in allowed[k]:
                raise ConfigError(f"where.{k}", f"{x!r} is not in this experiment; choose among: {', '.join(allowed[k]) or '(none)'}")


def check_fields(name: str, fields_: list[str]) -> None:
    for f in fields_:
        if f not in FIELDS:
            raise ConfigError(name, f"unknown field {f!r}; known: {', '.join(FIELDS)}")
