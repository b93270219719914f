"""Per-layer ratio overrides in pipeline text, shared by the lossy passes (prune, sparsify).

`overrides="conv1=0.2;layer4.*=0.5"`: `;` (or `,` inside quotes) separates entries, each
`PATTERN=RATIO`; a pattern is an fnmatch pattern matched against a layer's names (node
name, weight name), each also tried without a `.weight` suffix and without surrounding
`/`. The first matching entry wins.
"""

from __future__ import annotations

import fnmatch

from ..errors import PipelineError


def parse_overrides(text: str, pass_name: str) -> list[tuple[str, float]]:
    """`"conv1=0.2;layer4.*=0.5"` -> [("conv1", 0.2), ("layer4.*", 0.5)]; every ratio in
    [0, 1), else a PipelineError naming `pass_name`."""
    out = []
    for part in (text or "").replace(",", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        pattern, sep, value = part.rpartition("=")
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if not sep or not pattern or not 0.0 <= ratio < 1.0:
            raise PipelineError(
                f"{pass_name}: override {part!r} must be PATTERN=RATIO with 0 <= RATIO < 1, "
                "e.g. overrides=\"conv1=0.2;layer4.*=0.5\"")
        out.append((pattern.strip(), ratio))
    return out


def names_match(names: list[str], pattern: str) -> bool:
    """Whether any of a layer's `names` matches the fnmatch `pattern` (see module doc)."""
    for name in names:
        candidates = {name, name.removesuffix(".weight"), name.strip("/")}
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            return True
    return False


def override_for(names: list[str], overrides: list[tuple[str, float]]) -> float | None:
    """The ratio of the first override whose pattern matches one of `names`, else None."""
    for pattern, ratio in overrides:
        if names_match(names, pattern):
            return ratio
    return None
