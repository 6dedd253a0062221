"""What an integration is, as declared in the config (`integrations:`): plain frozen data.

`agent.config` parses the YAML into these; the webhook client and the side-work queue take
them. Secrets are references (environment variable or root-only file) resolved at use time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import ConfigError
from agent.integrations.breaker import BreakerPolicy

#: HTTP methods a webhook may use; the first four are idempotent by RFC 9110
METHODS = ("GET", "HEAD", "PUT", "DELETE", "POST", "PATCH")
IDEMPOTENT_METHODS = frozenset(("GET", "HEAD", "PUT", "DELETE"))


@dataclass(frozen=True)
class SecretRef:
    """Where a secret is read from at use time (never stored in the config, never logged)."""

    env: str = ""
    file: str = ""

    def read(self) -> str:
        """The secret: the environment variable if set, else the file's first line, else ""."""
        if self.env and os.environ.get(self.env):
            return os.environ[self.env]
        if self.file:
            try:
                lines = Path(self.file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError(self.file, "(file)",
                                  f"cannot read secret: {exc.strerror}") from None
            if not lines or not lines[0].strip():
                raise ConfigError(self.file, "(file)", "secret file is empty")
            return lines[0].strip()
        return ""


@dataclass(frozen=True)
class SecretHeader(SecretRef):
    """A header whose value is a secret read at use time: ``prefix`` + the secret."""

    prefix: str = ""

    def value(self) -> str:
        """The header value; raises ConfigError naming the env var or file when unreadable."""
        secret = self.read()
        if not secret and self.env:
            raise ConfigError("(environment)", self.env, "secret variable is not set")
        return self.prefix + secret


@dataclass(frozen=True)
class IntegrationSpec:
    """One HTTP webhook (JSON in, JSON out) the flows may call, or side work is sent to."""

    name: str
    url: str
    method: str = "POST"
    #: plain headers (no secrets: the config parser refuses credential-looking plain values)
    headers: tuple[tuple[str, str], ...] = ()
    #: headers whose values come from the environment or a file
    secret_headers: tuple[tuple[str, SecretHeader], ...] = ()
    #: the caller never waits longer than this for one call, retries included
    timeout_ms: int = 2000
    #: extra attempts after the first, only when the call is idempotent
    retries: int = 1
    #: first back-off between attempts (doubled each time, with jitter)
    backoff_ms: int = 100
    #: None = from the method (GET/HEAD/PUT/DELETE yes, POST/PATCH no)
    idempotent: bool | None = None
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)

    @property
    def is_idempotent(self) -> bool:
        """Whether a failed attempt may be repeated."""
        if self.idempotent is not None:
            return self.idempotent
        return self.method in IDEMPOTENT_METHODS


@dataclass(frozen=True)
class SideWorkConfig:
    """The background queue for work off the call path (CRM notes, post-call webhooks)."""

    #: jobs kept at most; a full queue drops the oldest job and counts it
    max_jobs: int = 1000
    #: delivery attempts per job before it is given up (counted as failed)
    max_attempts: int = 5
    #: first retry delay (doubled per attempt, capped at max_backoff_s)
    backoff_s: float = 2.0
    max_backoff_s: float = 300.0
    #: per-attempt timeout of a side-work delivery
    timeout_ms: int = 5000
    #: SQLite file the pending jobs are kept in: "" = <state_dir>/sidework.sqlite; "off" = memory
    path: str = ""
    #: integrations sent a summary of every call when it ends (post-call webhooks)
    post_call: tuple[str, ...] = ()

    def store_path(self, state_dir: str) -> str | None:
        """The SQLite file of pending side work, or None when kept in memory only."""
        if self.path == "off":
            return None
        return self.path or str(Path(state_dir) / "sidework.sqlite")
