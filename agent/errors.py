"""The one small error tree used across pbx-agent."""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error pbx-agent raises on purpose."""


class ProtocolError(AgentError, ValueError):
    """Malformed traffic from a PBX peer (AGI, AudioSocket, ESL)."""


class ConfigError(AgentError):
    """A config or rule file is invalid; the message names file, key and reason."""

    def __init__(self, path: str, key: str, reason: str, line: int | None = None) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        #: 1-based line in ``path`` where the offending key or item starts, when known
        self.line = line
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {key}: {reason}")


class ModelMissing(AgentError):
    """A model file is not installed; the message names the command that installs it."""


class CallRejected(AgentError):
    """Admission refused a call; ``reason`` goes to the dialplan as AGENT_REASON."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class EngineError(AgentError):
    """An STT, LLM or TTS engine failed."""


class EngineTimeout(EngineError):
    """An engine call did not finish within its deadline."""
