"""The webhook client: one JSON-over-HTTP call to an integration, bounded by a total budget.

A caller is waiting on the line while a flow calls its calendar or CRM, so a call here:

* never takes longer than its budget (``timeout_ms``): every attempt gets the time that is
  left as its httpx timeout, and no attempt or back-off starts past the deadline. (httpx
  applies that timeout per phase: connect, write, each read. The dead-system cases, refused,
  unreachable or accepted-but-silent, end at the deadline; a system slow in several phases of
  one attempt, or trickling its body, can overrun it by up to one more budget.);
* never calls a system its circuit breaker has given up on (the refusal is immediate);
* retries only what may be repeated (idempotent methods, or ``idempotent: true``), and only
  failures that a retry can fix (connect errors, timeouts, 429 and 5xx), never other 4xx;
* never raises: the flow gets an :class:`IntegrationOutcome` and takes its fallback;
* never logs header values, payloads or response bodies (secrets and caller data): the log
  line names the integration, method, URL without user-info or query, status and timing;
  httpx's own request log, which prints the full URL, is turned down to WARNING.

Each integration has its own pooled ``httpx.Client``, created with ``trust_env=False``: the
systems behind the agent are on-prem and reached directly, so an ``HTTP_PROXY`` or
``ALL_PROXY`` variable in the service environment (set for model downloads, say) must not
reroute webhooks, nor may a ``.netrc`` add credentials to them. TLS is verified against the
system trust store (where an on-prem CA is installed; OpenSSL's ``SSL_CERT_FILE`` and
``SSL_CERT_DIR`` apply), through one SSL context built up front: building it takes tens of
milliseconds, which must not come out of the first call's budget.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from agent.errors import ConfigError
from agent.integrations.breaker import CircuitBreaker
from agent.integrations.spec import IntegrationSpec

_LOGGER = logging.getLogger(__name__)


def quiet_http_loggers() -> None:
    """Keep httpx's own request log (INFO: the full URL, with user-info and the query string
    that carries a GET payload) and httpcore's traces (DEBUG: response headers) out of the
    service log, unless an operator configured those loggers explicitly."""
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)

#: methods whose payload travels as query parameters; the others send a JSON body
QUERY_METHODS = frozenset(("GET", "HEAD", "DELETE"))


@dataclass
class IntegrationOutcome:
    """What one webhook call came to; the flow branches on ``ok`` and reads ``data``."""

    name: str
    ok: bool
    #: parsed JSON body (dict/list/...), {} for an empty 2xx body, None on failure
    data: Any = None
    #: last HTTP status seen
    status: int | None = None
    #: the whole call, retries and back-off included (ms)
    latency_ms: float = 0.0
    timed_out: bool = False
    #: "" | "timeout" | "breaker-open" | "connect" | "http-<status>" | "bad-json" | "secret"
    #: | "unknown-integration" | "bad-payload" (payload cannot be encoded) | "internal"
    error: str = ""
    #: HTTP requests actually sent (0 when the breaker refused)
    attempts: int = 0
    #: breaker state after the call
    breaker: str = "closed"


def redact_url(url: str) -> str:
    """``url`` without user-info, query string or fragment: what may be logged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(invalid url)"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, default=str, separators=(",", ":"))


def _encode(method: str, payload: Mapping[str, Any] | None
            ) -> tuple[dict[str, str] | None, bytes | None]:
    """(query params, JSON body) for ``payload``; raises TypeError/ValueError if unencodable."""
    if method in QUERY_METHODS:
        if not payload:
            return None, None
        return {str(key): _query_value(value) for key, value in payload.items()}, None
    body = json.dumps(dict(payload or {}), default=str, separators=(",", ":"))
    return None, body.encode("utf-8")


class WebhookClient:
    """Calls the configured integrations; safe to use from several call threads at once."""

    def __init__(self, specs: Mapping[str, IntegrationSpec], *,
                 clock: Callable[[], float] = time.monotonic,
                 on_result: Callable[[IntegrationOutcome], None] | None = None,
                 on_breaker: Callable[[str, str, str], None] | None = None,
                 transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        """``clock`` drives the breakers only (HTTP deadlines use ``time.monotonic``);
        ``on_result`` gets every outcome, ``on_breaker`` every breaker transition
        (name, old, new; called under the breaker's lock, so it must not call back into it);
        ``transport`` replaces the network (tests); ``sleep``/``rng`` drive the back-off."""
        quiet_http_loggers()
        self._specs = dict(specs)
        self._on_result = on_result
        self._transport = transport
        self._sleep = sleep
        self._rng = rng
        self._lock = threading.Lock()
        self._clients: dict[str, httpx.Client] = {}
        self._ssl = ssl.create_default_context()
        self._breakers = {name: CircuitBreaker(name, spec.breaker, clock, on_change=on_breaker)
                          for name, spec in self._specs.items()}
        self._log_urls = {name: redact_url(spec.url) for name, spec in self._specs.items()}

    def breaker(self, name: str) -> CircuitBreaker:
        """The breaker of integration ``name`` (KeyError when there is no such integration)."""
        return self._breakers[name]

    def breaker_states(self) -> dict[str, str]:
        """{integration: closed | open | half-open}."""
        return {name: breaker.state for name, breaker in self._breakers.items()}

    def close(self) -> None:
        """Close the connection pools (a later call opens a new one)."""
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing must not fail the caller
                _LOGGER.debug("closing a webhook client failed", exc_info=True)

    def call(self, name: str, payload: Mapping[str, Any] | None = None, *,
             timeout_ms: int | None = None) -> IntegrationOutcome:
        """Call integration ``name`` with ``payload``; ``timeout_ms`` (default: the spec's) is
        the total budget, retries and back-off included. Never raises."""
        started = time.monotonic()
        try:
            outcome = self._call(name, payload, timeout_ms, started)
        except Exception as exc:  # noqa: BLE001 - a flow must get an outcome, never a trace
            _LOGGER.error("integration %s: internal error %s", name, type(exc).__name__)
            outcome = IntegrationOutcome(name, False, error="internal",
                                         latency_ms=(time.monotonic() - started) * 1000)
        if self._on_result is not None:
            try:
                self._on_result(outcome)
            except Exception:  # noqa: BLE001 - a KPI hook must not break the call
                _LOGGER.exception("integration %s: on_result hook failed", name)
        return outcome

    def _call(self, name: str, payload: Mapping[str, Any] | None, timeout_ms: int | None,
              started: float) -> IntegrationOutcome:
        spec = self._specs.get(name)
        if spec is None:
            _LOGGER.warning("integration %s: not configured", name)
            return IntegrationOutcome(name, False, error="unknown-integration")
        breaker = self._breakers[name]
        # Secrets and payload first: a local problem must neither send a request nor use up
        # a half-open breaker's trial call (nor count against the remote system).
        try:
            headers = self._headers(spec)
        except ConfigError as exc:
            return self._local_failure(spec, "secret", str(exc), started)
        try:
            params, content = _encode(spec.method, payload)
        except (TypeError, ValueError) as exc:
            return self._local_failure(spec, "bad-payload", type(exc).__name__, started)
        if content is not None:
            headers["content-type"] = "application/json"
        budget_ms = spec.timeout_ms if timeout_ms is None else timeout_ms
        if budget_ms <= 0:
            outcome = IntegrationOutcome(name, False, timed_out=True, error="timeout",
                                         breaker=breaker.state)
            return self._log(spec, outcome, started)
        deadline = started + budget_ms / 1000.0
        if not breaker.allow():
            outcome = IntegrationOutcome(name, False, error="breaker-open", breaker=breaker.state)
            return self._log(spec, outcome, started)
        outcome = IntegrationOutcome(name, False)
        try:
            self._attempts(spec, params, content, headers, deadline, outcome)
        finally:
            outcome.latency_ms = (time.monotonic() - started) * 1000
            breaker.record(self._system_ok(outcome), outcome.latency_ms)
        outcome.breaker = breaker.state
        return self._log(spec, outcome, started)

    def _attempts(self, spec: IntegrationSpec, params: dict[str, str] | None,
                  content: bytes | None, headers: dict[str, str], deadline: float,
                  outcome: IntegrationOutcome) -> None:
        client = self._client(spec.name)
        tries = 1 + max(0, spec.retries) if spec.is_idempotent else 1
        for attempt in range(tries):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if outcome.attempts == 0:
                    outcome.error, outcome.timed_out = "timeout", True
                return
            outcome.attempts += 1
            retry = self._attempt(client, spec, params, content, headers, remaining, outcome)
            if not retry or attempt == tries - 1:
                return
            delay = spec.backoff_ms / 1000.0 * 2 ** attempt * (0.5 + 0.5 * self._rng())
            if time.monotonic() + delay >= deadline:
                return  # the next attempt could not start before the deadline
            if delay > 0:
                self._sleep(delay)

    def _attempt(self, client: httpx.Client, spec: IntegrationSpec,
                 params: dict[str, str] | None, content: bytes | None,
                 headers: dict[str, str], remaining: float,
                 outcome: IntegrationOutcome) -> bool:
        """One HTTP request; fills ``outcome``; True when a retry could help."""
        outcome.timed_out = False
        try:
            url = httpx.URL(spec.url)
            if params:  # merged with the URL's own query (httpx's params= would replace it)
                url = url.copy_merge_params(params)
            response = client.request(spec.method, url, content=content, headers=headers,
                                      timeout=httpx.Timeout(remaining))
        except httpx.TimeoutException:
            outcome.error, outcome.timed_out = "timeout", True
            return True
        except httpx.TransportError:
            outcome.error = "connect"
            return True
        except Exception as exc:  # noqa: BLE001 - e.g. an invalid URL: not worth a retry
            _LOGGER.debug("integration %s: request failed: %s", spec.name, type(exc).__name__)
            outcome.error = "connect"
            return False
        status = response.status_code
        outcome.status = status
        if 200 <= status < 300:
            body = response.content
            if not body.strip():
                outcome.ok, outcome.data, outcome.error = True, {}, ""
                return False
            try:
                data = json.loads(body)
            except ValueError:
                outcome.error = "bad-json"
                return False
            outcome.ok, outcome.data, outcome.error = True, data, ""
            return False
        outcome.error = f"http-{status}"
        return status == 429 or status >= 500

    @staticmethod
    def _system_ok(outcome: IntegrationOutcome) -> bool:
        """What the breaker hears: a client error (4xx but 429, or 3xx) means the system is up."""
        if outcome.ok:
            return True
        status = outcome.status
        return (outcome.error.startswith("http-") and status is not None
                and status < 500 and status != 429)

    def _headers(self, spec: IntegrationSpec) -> dict[str, str]:
        headers = {key: value for key, value in spec.headers}
        for key, secret in spec.secret_headers:
            headers[key] = secret.value()
        return headers

    def _client(self, name: str) -> httpx.Client:
        with self._lock:
            client = self._clients.get(name)
            if client is None:
                # trust_env=False: no proxy variables, no .netrc (see the module docstring)
                client = httpx.Client(trust_env=False, verify=self._ssl,
                                      transport=self._transport, follow_redirects=False)
                self._clients[name] = client
            return client

    def _local_failure(self, spec: IntegrationSpec, error: str, why: str,
                       started: float) -> IntegrationOutcome:
        # ``why`` is a ConfigError message (env var or file name, never the value) or a type
        outcome = IntegrationOutcome(spec.name, False, error=error,
                                     breaker=self._breakers[spec.name].state)
        outcome.latency_ms = (time.monotonic() - started) * 1000
        _LOGGER.warning("integration %s: %s %s not sent: %s: %s", spec.name, spec.method,
                        self._log_urls[spec.name], error, why)
        return outcome

    def _log(self, spec: IntegrationSpec, outcome: IntegrationOutcome,
             started: float) -> IntegrationOutcome:
        if not outcome.latency_ms:
            outcome.latency_ms = (time.monotonic() - started) * 1000
        level = logging.INFO if outcome.ok else logging.WARNING
        _LOGGER.log(level, "integration %s: %s %s status=%s attempts=%d latency=%.0fms "
                    "error=%s breaker=%s", spec.name, spec.method, self._log_urls[spec.name],
                    outcome.status if outcome.status is not None else "-", outcome.attempts,
                    outcome.latency_ms, outcome.error or "-", outcome.breaker)
        return outcome
