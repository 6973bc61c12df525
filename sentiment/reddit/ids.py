"""Reddit ids: base36 numbers, lower case, growing with time (per kind)."""

from __future__ import annotations

from typing import Final

__all__ = ["base36_to_int", "to_base36"]

_DIGITS: Final = "0123456789abcdefghijklmnopqrstuvwxyz"


def to_base36(number: int) -> str:
    """Spell `number` the way Reddit spells ids (lowercase base36)."""
    if number < 0:
        raise ValueError("ids are non-negative")
    digits: list[str] = []
    while True:
        number, rest = divmod(number, 36)
        digits.append(_DIGITS[rest])
        if number == 0:
            return "".join(reversed(digits))


def base36_to_int(value: str) -> int:
    return int(value, 36)
