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


@dataclass(frozen=True)
class LiveLimits:
    """Limits and load read from the running PBX (AMI or inbound ESL); None = not reported.

    ``max_calls`` is already the number of inbound calls the PBX admits (FreeSWITCH's
    ``max_sessions`` N is stored as N-1). ``source`` names the connection (``ami 127.0.0.1:5038``),
    never a credential; ``at`` is the monotonic time of the reading.
    """

    pbx: str
    source: str
    at: float
    max_calls: int | None = None
    current_calls: int | None = None
    max_load: float | None = None
    sessions_per_second: float | None = None
    min_idle_cpu: float | None = None
    idle_cpu: float | None = None
