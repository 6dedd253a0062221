"""The integrations of one agent process: the webhook client and the side-work queue.

Built once per process by the runtime; call sessions use :meth:`call` (on the call path,
bounded by the integration's timeout and circuit breaker) and :meth:`background` (off the
call path: the bounded, persistent side-work queue). Post-call webhooks go through the queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.config import Config
from agent.integrations.http import IntegrationOutcome, WebhookClient
from agent.integrations.sidework import SideWorkQueue

_LOGGER = logging.getLogger(__name__)


class IntegrationService:
    """Webhooks on the call path and side work off it, for every call of a process."""

    def __init__(self, config: Config, *,
                 on_result: Callable[[IntegrationOutcome], None] | None = None,
                 on_breaker: Callable[[str, str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.client = WebhookClient(config.integrations, clock=clock, on_result=on_result,
                                    on_breaker=on_breaker)
        self.sidework = SideWorkQueue(config.sidework, self._deliver,
                                      path=config.sidework.store_path(config.state_dir))
        self._started = False
        self._closed = False

    def start(self) -> None:
        """Start the side-work worker (restores the jobs left by the last run)."""
        if not self._started:
            self.sidework.start()
            self._started = True

    def call(self, name: str, payload: dict[str, Any]) -> IntegrationOutcome:
        """Call a webhook now; answers within its timeout, never raises."""
        return self.client.call(name, payload)

    def background(self, name: str, payload: Mapping[str, Any]) -> None:
        """Queue work for a webhook off the call path (never blocks the call)."""
        if name not in self.config.integrations:
            _LOGGER.warning("side work for unknown integration %s dropped", name)
            return
        self.sidework.put(name, payload)

    def post_call(self, summary: Mapping[str, Any]) -> None:
        """Send a finished call's summary to every post-call webhook (through the queue)."""
        for name in self.config.sidework.post_call:
            self.sidework.put(name, summary)

    def _deliver(self, name: str, payload: Mapping[str, Any]) -> bool:
        outcome = self.client.call(name, dict(payload),
                                   timeout_ms=self.config.sidework.timeout_ms)
        return outcome.ok

    def close(self, timeout_s: float = 5.0) -> None:
        """Keep what is still pending (or count it lost), close the HTTP connections."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self.sidework.stop(timeout_s)
        self.client.close()
