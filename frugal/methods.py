"""The registry of bench methods: what a method is, and where ideas register theirs.

Kept apart from `frugal.bench` (which runs them) so that the report can read the registry without
importing the bench: `frugal.bench` re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .plugins import load_ideas

if TYPE_CHECKING:
    from .bench import BenchContext


@dataclass(frozen=True)
class Summary:
    """What a method's line of the report's summary table compares, on the rows of one task.

    - `idea`: globs (separated by "|") on variant labels. The row shown is, with pick="best", the
      one with the highest `metric`; with pick="cheapest", the one with the lowest `cost` whose
      metric is within TOLERANCE of the reference's (else the highest metric).
    - `reference`: the variant of the same net trained plainly.
    - `control`: globs for the fair control (the one whose cost is nearest the idea row's); None:
      the reference is the control.
    - `cost`: the field the idea saves (macs, file_bytes, conv_free_params, train_seconds).
    - `published`: the `results/` folder of the idea's full-budget bench; the report reads its line
      from that folder's results.json, so the figure is never copied by hand."""

    claim: str
    idea: str
    reference: str
    control: str | None = None
    metric: str = "test_acc"
    cost: str = "macs"
    pick: str = "best"
    published: str | None = None


@dataclass(frozen=True)
class Part:
    """A job of a method's (task, seed) unit that the bench may run apart from the others, on
    another worker: the variants it trains (glob patterns on their labels) and the parts it
    waits for (say, the dense twin that a fine-tuned variant starts from). The method is called
    with `ctx.part` set to the patterns and trains the variants `ctx.wants` (a part's run may
    also train what it waits for when that is missing, e.g. when --variants leaves it out)."""

    name: str
    variants: tuple[str, ...]
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[["BenchContext", str, int], list[dict[str, Any]]]
    tasks: tuple[str, ...]  # tasks the method knows how to run
    default_tasks: tuple[str, ...]  # tasks run when --tasks is not given
    description: str = ""
    fields: tuple[tuple[str, str, str], ...] = ()  # the method's own row fields: (key, header, format)
    references: dict[str, list[tuple[str, float, float]]] | None = None  # task -> published (label, acc, bytes)
    plots: tuple[tuple[str, str], ...] = ()  # own fields to plot accuracy against: (key, axis label)
    selectable: bool = False  # honours --variants: trains only the variants `ctx.wants`
    headline_tasks: tuple[str, ...] = ()  # where `frugal bench --quick` runs its headline comparison
    summary: Summary | None = None  # its line in the report's summary table
    parts: Callable[["BenchContext", str], tuple[Part, ...]] | None = None  # (ctx, task) -> its jobs; None: one
    after: tuple[str, ...] = ()  # methods whose unit of the same task and seed runs first (whose runs it reuses)
    counts: tuple[tuple[str, str], ...] = ()  # own distribution fields (JSON {value: count}): (key, what is counted)

    def knows(self, task: str) -> bool:
        """Whether the method has a plan for the task ("*" in its tasks: a plan for any task)."""
        return task in self.tasks or "*" in self.tasks


_METHODS: dict[str, Method] = {}


def register_method(name: str, *, tasks: tuple[str, ...], default_tasks: tuple[str, ...] | None = None,
                    description: str = "", fields: tuple[tuple[str, str, str], ...] = (),
                    references: dict[str, list[tuple[str, float, float]]] | None = None,
                    plots: tuple[tuple[str, str], ...] = (), selectable: bool = False,
                    headline_tasks: tuple[str, ...] = (), summary: Summary | None = None,
                    parts: Callable[["BenchContext", str], tuple[Part, ...]] | None = None,
                    after: tuple[str, ...] = (), counts: tuple[tuple[str, str], ...] = ()) -> Callable:
    """`fields` names the numeric fields a method adds to its rows, as (key, table header, format),
    e.g. ("attended_fraction", "blocks attended", "{:.1%}"); the report tabulates their means.
    `references` are published points per task, (label, accuracy, bytes), drawn on the
    accuracy-vs-bytes plot. A row with `file_bytes` (a real compressed file) is plotted at that size.
    `plots` names own fields, as (key, axis label), to plot test accuracy against, per task (log x),
    e.g. ("conv_free_params", "conv free parameters"). `selectable` says the method asks
    `ctx.wants(variant)` before it trains a variant, so that `--variants` can pick a part of its plan.
    `headline_tasks`: where the front-door bench (`frugal bench --quick`) runs the method with
    `ctx.headline` set, which asks for its headline comparison only; `summary` gives its line in the
    report's summary table. `parts(ctx, task)` splits a selectable method's (task, seed) unit
    into jobs with dependencies (see `Part`); `after` names methods whose unit of the same task and
    seed must finish first when the plan has it (the baseline, whose finished run a method reuses).
    `counts` names own fields that hold a distribution, a JSON object {value: count} such as
    {"1": 1891, "2": 60}, as (key, what is counted); the report tabulates each variant's shares,
    summed over seeds. The bench runs the parts of a unit on separate workers where its executor has them."""
    def deco(fn: Callable[["BenchContext", str, int], list[dict[str, Any]]]):
        if name in _METHODS:
            raise ValueError(f"bench method {name!r} is registered twice")
        if parts is not None and not selectable:
            raise ValueError(f"bench method {name!r}: parts pick variants, so the method must be selectable")
        _METHODS[name] = Method(name, fn, tuple(tasks), tuple(default_tasks or tasks), description, tuple(fields),
                                references, tuple(plots), selectable, tuple(headline_tasks), summary, parts,
                                tuple(after), tuple(counts))
        return fn
    return deco


def list_methods() -> dict[str, Method]:
    load_ideas()
    return dict(sorted(_METHODS.items()))


def get_method(name: str) -> Method:
    methods = list_methods()
    if name not in methods:
        raise ValueError(f"unknown bench method {name!r}; known: {', '.join(methods)}")
    return methods[name]
