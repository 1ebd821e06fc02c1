"""Compression: the global cut of every subset variant and each shard's re-packed subset."""

from __future__ import annotations

from collections.abc import Iterable

# The share of the scored pool every subset keeps unless told otherwise (the paper goes down to about 0.12):
# the resource default, the CA_KEEP_FRACTION default and `ca-platform run`'s default all read this one.
DEFAULT_KEEP_FRACTION = 0.3
# The demo's compression curve: two points, so its report draws a curve, at the cost of five more training sets.
DEMO_KEEP_FRACTIONS = (0.1, 0.3)


def keep_fractions(values: Iterable[float]) -> tuple[float, ...]:
    """The compression curve's keep fractions: each in (0, 1], ascending, each once (a cut keeping nothing would
    leave nothing to train on)."""
    fractions = []
    for value in values:
        fraction = float(value)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"keep fraction {value} is outside (0, 1]")
        fractions.append(fraction)
    if not fractions:
        raise ValueError("give at least one keep fraction")
    return tuple(sorted(set(fractions)))


def parse_keep_fractions(text: str) -> tuple[float, ...]:
    """`"0.1,0.3,0.5"` -> (0.1, 0.3, 0.5), as `--keep` and CA_KEEP_FRACTION take them; one number is a curve of
    one point."""
    items = [item.strip() for item in text.split(",")]
    numbers = []
    for item in items:
        try:
            numbers.append(float(item))
        except ValueError:
            raise ValueError(
                f"keep fractions must be numbers in (0, 1] separated by commas (e.g. 0.1,0.3,0.5); {item!r} of "
                f"{text!r} is not a number"
            ) from None
    return keep_fractions(numbers)
