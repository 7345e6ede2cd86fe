"""Which steps are recorded: every step at the start, where init problems show, then sparser.

Unrecorded steps carry no hooks at all, so they cost close to nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Record steps ``0..dense-1``, then every ``every`` steps, or log-spaced when ``log``.

    With ``log=True``, ``per_decade`` steps are recorded per factor of ten after the dense
    phase (e.g. 10: 10, 12, 15, 19, 25, 31, 39, 50, 63, 79, 100, 125, ...); ``every`` still
    caps the gap when it is set (>0), so long runs keep a regular heartbeat.
    """

    dense: int = 10
    every: int = 25
    log: bool = False
    per_decade: int = 10

    def __post_init__(self) -> None:
        if self.dense < 0 or self.every < 0 or self.per_decade < 1:
            raise ValueError(f"invalid schedule {self}: counts must be non-negative")
        if not self.log and self.every == 0 and self.dense == 0:
            raise ValueError("schedule records nothing: set dense>0 or every>0")

    def is_recorded(self, step: int) -> bool:
        """Whether ``step`` (0-based) is recorded."""
        if step < self.dense:
            return True
        if self.every > 0 and step % self.every == 0:
            return True
        if self.log and step > 0:
            return step in self._log_steps_near(step)
        return False

    def _log_steps_near(self, step: int) -> set[int]:
        # Log-spaced grid 10**(k/per_decade), rounded; only the grid points near `step` matter.
        k = math.log10(step) * self.per_decade
        return {
            round(10 ** (j / self.per_decade))
            for j in (math.floor(k) - 1, math.floor(k), math.floor(k) + 1)
        }

    def recorded_steps(self, total: int) -> list[int]:
        """All recorded steps below ``total``."""
        return [s for s in range(total) if self.is_recorded(s)]

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """Parse ``"dense=10,every=25"`` or ``"log"`` / ``"log,dense=20"`` from the CLI."""
        fields: dict[str, object] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            if key == "log" and not sep:
                fields["log"] = True
            elif key in ("dense", "every", "per_decade") and sep and value.isdigit():
                fields[key] = int(value)
            elif key == "log" and sep:
                fields["log"] = value.lower() in ("1", "true", "yes")
            else:
                raise ValueError(
                    f"bad schedule item {item!r}; use e.g. 'dense=10,every=25' or 'log,dense=20'"
                )
        return cls(**fields)  # type: ignore[arg-type]
