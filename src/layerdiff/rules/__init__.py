"""Fix-suggestion rules: one per file, each reading a Diagnosis and returning a Suggestion.

A rule is a ``Rule(id, title, check)``; ``check(diagnosis)`` returns a Suggestion or None.
The registry keeps them in a declared order and rejects duplicate ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..records import Diagnosis, Suggestion


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    check: Callable[[Diagnosis], Suggestion | None]


class Registry:
    def __init__(self, rules: Iterable[Rule]) -> None:
        self._rules: tuple[Rule, ...] = ()
        for rule in rules:
            self.add(rule)

    def add(self, rule: Rule) -> None:
        if any(r.id == rule.id for r in self._rules):
            raise ValueError(f"duplicate rule id: {rule.id}")
        self._rules += (rule,)

    def __iter__(self):
        return iter(self._rules)

    def suggest(self, diagnosis: Diagnosis) -> tuple[Suggestion, ...]:
        found = (rule.check(diagnosis) for rule in self._rules)
        return tuple(s for s in found if s is not None)


def _default_rules() -> list[Rule]:
    from . import _all

    return _all.RULES


REGISTRY = Registry(_default_rules())


def suggest(diagnosis: Diagnosis) -> tuple[Suggestion, ...]:
    return REGISTRY.suggest(diagnosis)
