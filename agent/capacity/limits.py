"""Channel limits a PBX enforces itself, with where each value came from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PbxLimit:
    """One limit; ``value`` None = unlimited/unset; ``source`` is ``file:line`` or ``default``."""

    name: str
    value: float | None
    source: str


@dataclass(frozen=True)
class PbxLimits:
    """All limits read from one PBX's config (``pbx`` is ``asterisk`` or ``freeswitch``)."""

    pbx: str
    limits: tuple[PbxLimit, ...]

    def get(self, name: str) -> PbxLimit | None:
        """Return the limit called ``name`` (case-insensitive), or None if not tracked."""
        wanted = name.lower()
        for limit in self.limits:
            if limit.name.lower() == wanted:
                return limit
        return None

    def max_calls(self) -> int | None:
        """Most concurrent inbound calls the PBX admits, or None when it sets no limit."""
        if self.pbx == "asterisk":
            limit = self.get("maxcalls")
            if limit is None or limit.value is None or limit.value <= 0:
                return None
            return int(limit.value)
        if self.pbx == "freeswitch":
            limit = self.get("max-sessions")
            if limit is None or limit.value is None or limit.value <= 0:
                return None
            # sofia rejects an INVITE once sess_count >= max, counting the new session itself.
            return max(int(limit.value) - 1, 0)
        return None
