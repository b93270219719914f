"""Multi-objective search over policies on the proxies: NSGA-II (non-dominated sorting with
crowding distance), seeded.

Why evolutionary and not greedy: the proxies cost microseconds per policy, so thousands of
policies are cheap, and the decisions interact (int8 pays only when neighbours are int8
too; a pruned layer gains less from int8), which a one-knob-at-a-time greedy path cannot
see once it has passed a choice. The proxy front is then checked by real builds and
measurements (`run.py`), which also correct the proxies.

Why the joint search is seeded with each technique's own front (`evolve_joint`): on a real
space NSGA-II over every knob at once does not converge to what a search of one technique
finds. On PP-OCRv4 rec's proxy tables (99 knobs), most points of the int8-only, prune-only
and lowrank-only proxy fronts were not dominated by the joint front of the same effort,
and still not after 300 generations; seeded with those fronts, the joint front dominates
all of them and adds its own combinations.
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


def evolve_joint(choices: list[list[int]], groups: dict[str, list[int]],
                 evaluate: Callable[[Policy], Objectives], *, seed: int,
                 start: Iterable[Policy] = (),
                 own_fronts: dict[str, list[tuple[Policy, Objectives]]] | None = None
                 ) -> list[tuple[Policy, Objectives]]:
    """`evolve` over every knob, its first population seeded with each group's own front
    (the knobs of `groups[name]` searched alone, every other knob unchanged, from the
    `start` policies that change only that group's knobs). Every seed is evaluated, so the
    front returned weakly dominates each group's front on `evaluate`. `own_fronts`, when
    given, receives each group's own front by name."""
    start = list(start)
    seeds = list(start)
    if sum(1 for knobs in groups.values() if knobs) > 1:
        for name, knobs in groups.items():
            inside = set(knobs)
            alone = [c if i in inside else [0] for i, c in enumerate(choices)]
            own = [p for p in start if all(not c or i in inside for i, c in enumerate(p))]
            front = evolve(alone, evaluate, seed=seed, start=own)
            if own_fronts is not None:
                own_fronts[name] = front
            seeds += [p for p, _ in front]
    return evolve(choices, evaluate, seed=seed, start=seeds)


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


def choose_picks(fresh: list[tuple[Policy, Objectives]], limit: float, error_limit: float,
                 error_bound: float = float("inf")) -> list[Policy]:
    """Up to 3 policies to build and measure next, from the proxy front's points not
    measured yet (`fresh`; objectives (resource, error), `limit` the budget's resource
    limit, `error_limit` the quality limit in the proxies' unit):
    1. predicted within the budget, least error first (only those below `error_bound`:
       `run.py` passes 1.5x the error of the best candidate measured so far);
    2. predicted within the quality limit, least resource first: the best achievable when
       the budget is out of reach;
    3. when something is predicted within the budget: the point within the quality limit
       just past the budget (to learn where the boundary really is); when nothing is:
       the least resource within half the error of pick 2, a safer point, because the
       error proxies can be far off and the front below the limit is then measured too.
    The first two lists fill in for each other."""
    within = sorted((x for x in fresh if x[1][0] <= limit and x[1][1] <= error_bound),
                    key=lambda x: x[1][1])
    quality = sorted((x for x in fresh if x[1][1] <= error_limit), key=lambda x: x[1][0])
    if within:
        third = sorted((x for x in quality if x[1][0] > limit), key=lambda x: x[1][0])[:1]
    else:
        safer = quality[0][1][1] / 2 if quality else float("inf")
        third = [x for x in quality if x[1][1] <= safer][:1]
    picks: list[Policy] = []
    for ranked in (within, quality, third, within, quality):
        for policy, _ in ranked:
            if policy not in picks:
                picks.append(policy)
                break
        if len(picks) == 3:
            break
    return picks
