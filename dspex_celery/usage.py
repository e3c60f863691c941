"""LM usage of module calls: tokens, cost and shared LM cache hits, summed over records (pure).

A module's record carries what its DSPy LM calls used (``prompt_tokens``, ``completion_tokens``,
``lm_cost``, ``lm_cache_hits``, ``lm_cache_misses``; see ``results.ModuleRecord``); an execution's and
a batch's totals are sums of those. A cache hit costs no tokens (DSPy reports no usage for it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol


class HasUsage(Protocol):
    """What a module record tells about its LM calls."""

    prompt_tokens: int
    completion_tokens: int
    lm_cost: float | None
    lm_cache_hits: int
    lm_cache_misses: int


@dataclass(frozen=True)
class Usage:
    """Tokens, cost (USD, None when no call was priced) and LM cache hits/misses of some module calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None
    cache_hits: int = 0
    cache_misses: int = 0

    @classmethod
    def of(cls, record: HasUsage) -> Usage:
        return cls(record.prompt_tokens, record.completion_tokens, record.lm_cost, record.lm_cache_hits,
                   record.lm_cache_misses)

    def __add__(self, other: Usage) -> Usage:
        costs = [cost for cost in (self.cost, other.cost) if cost is not None]
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            sum(costs) if costs else None,
            self.cache_hits + other.cache_hits,
            self.cache_misses + other.cache_misses,
        )

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def empty(self) -> bool:
        """No LM call was made or answered from the cache."""
        return not (self.tokens or self.cache_hits or self.cache_misses or self.cost)

    def record_fields(self) -> dict[str, Any]:
        """The ``ModuleRecord`` fields of this usage."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "lm_cost": self.cost, "lm_cache_hits": self.cache_hits, "lm_cache_misses": self.cache_misses}

    def to_json_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens": self.tokens}

    def describe(self) -> str:
        """One line: ``tokens 120 (90 prompt + 30 completion), cost $0.0012, LM cache 3 hit(s) / 1 miss(es)``."""
        parts = [f"tokens {self.tokens} ({self.prompt_tokens} prompt + {self.completion_tokens} completion)"]
        parts.append("cost " + cost_text(self.cost))
        if self.cache_hits or self.cache_misses:
            parts.append(f"LM cache {self.cache_hits} hit(s) / {self.cache_misses} miss(es)")
        return ", ".join(parts)


def total_usage(records: Iterable[HasUsage]) -> Usage:
    """The sum of the records' usage."""
    total = Usage()
    for record in records:
        total = total + Usage.of(record)
    return total


def usage_cells(record: HasUsage) -> tuple[str, str, str]:
    """A module's tokens (prompt + completion), cost and LM cache ``hits/lookups`` (``-`` when none)."""
    usage = Usage.of(record)
    lookups = usage.cache_hits + usage.cache_misses
    return str(usage.tokens), cost_text(usage.cost), f"{usage.cache_hits}/{lookups}" if lookups else "-"


def cost_text(cost: float | None) -> str:
    """``$0.0012``, or ``-`` when no call was priced (a custom engine, an unknown model)."""
    return "-" if cost is None else f"${cost:.4f}"
