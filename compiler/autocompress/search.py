"""Multi-objective search over policies on the proxies: NSGA-II (non-dominated sorting with
crowding distance), seeded.

Why evolutionary and not greedy: the proxies cost microseconds per policy, so thousands of
policies are cheap, and the decisions interact (int8 pays only when neighbours are int8
too; a pruned layer gains less from int8), which a one-knob-at-a-time greedy path cannot
see once it has passed a choice. The proxy front is then checked by real builds and
measurements (`run.py`), which also correct the proxies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from .space import Policy

Objectives = tuple[float, float]  # both minimized: (resource, error)


def dominates(a: Objectives, b: Objectives) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def pareto_indices(points: list[Objectives]) -> list[int]:
    """Indices of the non-dominated points (duplicates: the first one), by first objective."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _fronts(points: list[Objectives]) -> list[list[int]]:
    """Non-dominated sorting: the indices of front 0, front 1, ..."""
    left = list(range(len(points)))
    fronts = []
    while left:
        front = [i for i in left if not any(dominates(points[j], points[i]) for j in left)]
        fronts.append(front)
        taken = set(front)
        left = [i for i in left if i not in taken]
    return fronts


def _crowding(points: list[Objectives], front: list[int]) -> dict[int, float]:
    distance = dict.fromkeys(front, 0.0)
    for m in range(2):
        ordered = sorted(front, key=lambda i: points[i][m])
        lo, hi = points[ordered[0]][m], points[ordered[-1]][m]
        distance[ordered[0]] = distance[ordered[-1]] = float("inf")
        span = hi - lo if hi > lo else 1.0
        for a, b, c in zip(ordered, ordered[1:], ordered[2:]):
            distance[b] += (points[c][m] - points[a][m]) / span
    return distance


def evolve(choices: list[list[int]], evaluate: Callable[[Policy], Objectives], *, seed: int,
           start: Iterable[Policy] = (), population: int = 48, generations: int = 60
           ) -> list[tuple[Policy, Objectives]]:
    """The proxy Pareto front after `generations` of NSGA-II, sorted by resource.

    `choices[i]`: the choice indices knob i may take (0, "unchanged", among them);
    `start`: policies seeded into the first population (the input model, each
    single-technique extreme, the measured candidates)."""
    rng = np.random.default_rng(seed)
    n = len(choices)
    cache: dict[Policy, Objectives] = {}

    def score(p: Policy) -> Objectives:
        if p not in cache:
            cache[p] = evaluate(p)
        return cache[p]

    pop = list(dict.fromkeys(tuple(p) for p in start))
    while len(pop) < population:
        pop.append(tuple(int(c[rng.integers(0, len(c))]) for c in choices))
    if n == 0:
        return [(pop[0], score(pop[0]))]
    for _ in range(generations):
        children = []
        while len(children) < population:
            a, b = (pop[int(i)] for i in rng.integers(0, len(pop), 2))
            mask = rng.random(n) < 0.5
            child = [x if m else y for x, y, m in zip(a, b, mask)]
            for i in range(n):
                if rng.random() < max(1.0 / n, 0.1):
                    child[i] = int(choices[i][rng.integers(0, len(choices[i]))])
            children.append(tuple(child))
        merged = list(dict.fromkeys(pop + children))
        points = [score(p) for p in merged]
        survivors: list[int] = []
        for front in _fronts(points):
            if len(survivors) + len(front) <= population:
                survivors += front
                continue
            crowd = _crowding(points, front)
            survivors += sorted(front, key=lambda i: -crowd[i])[:population - len(survivors)]
            break
        pop = [merged[i] for i in survivors]
    # the front of everything evaluated, not only of the last population
    every = list(cache)
    points = [cache[p] for p in every]
    return [(every[i], points[i]) for i in pareto_indices(points)]
