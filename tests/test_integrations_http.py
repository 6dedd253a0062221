"""The webhook client against the local WebhookServer (no external network), and the
server's own calendar semantics."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.integrations.breaker import CLOSED, HALF_OPEN, OPEN, BreakerPolicy
from agent.integrations.http import IntegrationOutcome, WebhookClient, redact_url
from agent.integrations.spec import IntegrationSpec, SecretHeader
from agent.sim.webhooks import WebhookServer

SECRET = "s3cr3t-T0ken-value"
CALLER = "+41791234567"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> Iterator[WebhookServer]:
    with WebhookServer() as srv:
        srv.stall_s = 5.0
        yield srv


def spec(server: WebhookServer, path: str = "/crm/notes", method: str = "POST",
         name: str = "crm", **kw: Any) -> IntegrationSpec:
    kw.setdefault("timeout_ms", 1000)
    kw.setdefault("backoff_ms", 1)
    return IntegrationSpec(name=name, url=server.url + path, method=method, **kw)


def client(*specs: IntegrationSpec, **kw: Any) -> WebhookClient:
    kw.setdefault("sleep", lambda s: None)
    return WebhookClient({s.name: s for s in specs}, **kw)


def test_answer_is_ok_with_data(server: WebhookServer) -> None:
    c = client(spec(server, "/calendar/availability", name="calendar"))
    out = c.call("calendar", {"when": "2099-03-02T10:00"})
    assert out.ok and out.error == "" and out.status == 200 and out.attempts == 1
    assert out.data == {"available": True, "start": "2099-03-02T10:00",
                        "end": "2099-03-02T10:30"}
    assert out.breaker == CLOSED and not out.timed_out and out.latency_ms > 0
    [req] = server.requests
    assert req.method == "POST" and req.json == {"when": "2099-03-02T10:00"}
    assert req.headers["content-type"] == "application/json"
    c.close()


def test_get_sends_the_payload_as_query_parameters(server: WebhookServer) -> None:
    c = client(spec(server, "/lookup?src=pbx", method="GET", name="lookup"))
    out = c.call("lookup", {"phone": CALLER, "n": 3, "vip": True, "none": None})
    assert out.ok
    assert out.data["query"] == {"src": "pbx", "phone": CALLER, "n": "3", "vip": "true",
                                 "none": ""}
    assert server.requests[0].json is None


def test_head_gives_an_empty_body_as_empty_dict(server: WebhookServer) -> None:
    c = client(spec(server, "/ping", method="HEAD", name="ping"))
    out = c.call("ping")
    assert out.ok and out.data == {}


def test_stall_times_out_within_the_budget_while_the_server_still_stalls(
        server: WebhookServer) -> None:
    server.mode = "stall"
    c = client(spec(server, timeout_ms=250))
    out = c.call("crm", {"note": "x"})
    stalling, requests = server.stalling, server.requests
    assert out.timed_out and out.error == "timeout" and not out.ok and out.data is None
    assert out.attempts == 1 and len(requests) == 1
    # the client returned while the server was still holding the request
    assert stalling >= 1 and not requests[0].answered
    server.release()


def test_timeout_argument_overrides_the_spec(server: WebhookServer) -> None:
    server.mode = "stall"
    c = client(spec(server, timeout_ms=60_000))
    out = c.call("crm", {}, timeout_ms=200)
    assert out.error == "timeout" and server.stalling >= 1
    server.release()


def test_post_is_never_retried_on_503(server: WebhookServer) -> None:
    server.mode = "error"
    c = client(spec(server, retries=3))
    out = c.call("crm", {"note": "x"})
    assert not out.ok and out.error == "http-503" and out.status == 503
    assert out.attempts == 1 and len(server.requests) == 1


@pytest.mark.parametrize("status", [503, 500, 429])
def test_get_is_retried_on_5xx_and_429_up_to_retries(server: WebhookServer,
                                                      status: int) -> None:
    server.mode = "error"
    server.error_status = status
    c = client(spec(server, "/slots", method="GET", name="slots", retries=2))
    out = c.call("slots", {"day": "mon"})
    assert out.error == f"http-{status}" and out.attempts == 3 and len(server.requests) == 3


def test_post_marked_idempotent_is_retried(server: WebhookServer) -> None:
    server.mode = "flap"  # 1st answers, 2nd fails, 3rd answers
    c = client(spec(server, retries=1, idempotent=True))
    assert c.call("crm", {}).ok
    out = c.call("crm", {})
    assert out.ok and out.attempts == 2 and len(server.requests) == 3


def test_4xx_is_not_retried_and_does_not_trip_the_breaker(server: WebhookServer) -> None:
    s = spec(server, "/calendar/availability", name="calendar", retries=3, idempotent=True,
             breaker=BreakerPolicy(failures=2))
    c = client(s)
    for _ in range(4):
        out = c.call("calendar", {"when": "someday"})
        assert not out.ok and out.error == "http-400" and out.status == 400
        assert out.attempts == 1 and out.data is None
    assert len(server.requests) == 4
    assert c.breaker("calendar").state == CLOSED


def test_breaker_opens_stops_calling_half_opens_and_closes(server: WebhookServer) -> None:
    clock = Clock()
    changes: list[tuple[str, str, str]] = []
    server.mode = "error"
    s = spec(server, breaker=BreakerPolicy(failures=3, window_s=60, cooldown_s=30))
    c = client(s, clock=clock, on_breaker=lambda *t: changes.append(t))
    for _ in range(3):
        assert c.call("crm", {}).error == "http-503"
    assert c.breaker_states() == {"crm": OPEN}
    for _ in range(3):
        out = c.call("crm", {})
        assert out.error == "breaker-open" and out.attempts == 0 and out.breaker == OPEN
    assert len(server.requests) == 3  # no request while open
    clock.now += 30
    assert c.breaker_states() == {"crm": HALF_OPEN}
    server.mode = "answer"
    out = c.call("crm", {})  # the trial call
    assert out.ok and out.breaker == CLOSED and len(server.requests) == 4
    assert changes == [("crm", CLOSED, OPEN), ("crm", OPEN, HALF_OPEN), ("crm", HALF_OPEN, CLOSED)]


def test_a_failed_trial_opens_the_breaker_again(server: WebhookServer) -> None:
    clock = Clock()
    server.mode = "stall"
    s = spec(server, timeout_ms=200, breaker=BreakerPolicy(failures=1, cooldown_s=10))
    c = client(s, clock=clock)
    assert c.call("crm", {}).error == "timeout"
    assert c.call("crm", {}).error == "breaker-open"
    clock.now += 10
    out = c.call("crm", {})
    assert out.error == "timeout" and out.breaker == OPEN and out.attempts == 1
    assert len(server.requests) == 2
    server.release()


def test_flap_alternates(server: WebhookServer) -> None:
    server.mode = "flap"
    c = client(spec(server, retries=0, breaker=BreakerPolicy(failures=100)))
    results = [c.call("crm", {}).ok for _ in range(4)]
    assert results == [True, False, True, False]


def test_a_back_off_that_would_pass_the_deadline_is_not_slept(server: WebhookServer) -> None:
    server.mode = "error"
    slept: list[float] = []
    s = spec(server, "/slots", method="GET", name="slots", retries=5, backoff_ms=1000,
             timeout_ms=300)
    c = client(s, sleep=slept.append, rng=lambda: 0.0)  # first back-off 500 ms > budget
    out = c.call("slots")
    assert out.attempts == 1 and len(server.requests) == 1 and slept == []


def test_back_off_doubles_with_jitter(server: WebhookServer) -> None:
    server.mode = "error"
    slept: list[float] = []
    s = spec(server, "/slots", method="GET", name="slots", retries=3, backoff_ms=10,
             timeout_ms=5000)
    c = client(s, sleep=slept.append, rng=lambda: 1.0)
    assert c.call("slots").attempts == 4
    assert slept == pytest.approx([0.010, 0.020, 0.040])
    slept.clear()
    c2 = client(s, sleep=slept.append, rng=lambda: 0.0)
    c2.call("slots")
    assert slept == pytest.approx([0.005, 0.010, 0.020])


def test_no_attempt_starts_after_the_deadline(server: WebhookServer) -> None:
    """A stall eats the budget of the first attempt: no retry is sent afterwards."""
    server.mode = "stall"
    s = spec(server, "/slots", method="GET", name="slots", retries=5, timeout_ms=250)
    c = client(s, sleep=time.sleep)
    started = time.monotonic()
    out = c.call("slots")
    deadline = started + 0.25
    requests = server.requests
    assert out.error == "timeout" and out.attempts == 1 and len(requests) == 1
    assert all(r.received_at <= deadline for r in requests)
    server.release()


def test_retries_stop_at_the_deadline_with_real_back_off(server: WebhookServer) -> None:
    server.mode = "error"
    s = spec(server, "/slots", method="GET", name="slots", retries=50, backoff_ms=50,
             timeout_ms=300)
    c = client(s, sleep=time.sleep, rng=lambda: 1.0)  # 50, 100, 200 ms: the third ends past it
    started = time.monotonic()
    out = c.call("slots")
    requests = server.requests
    assert out.attempts == len(requests) < 51
    assert all(r.received_at <= started + 0.3 for r in requests)


def test_secret_header_from_env_reaches_the_server_and_is_never_logged(
        server: WebhookServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PBX_TEST_CRM_TOKEN", SECRET)
    s = spec(server, headers=(("x-source", "pbx"),),
             secret_headers=(("Authorization", SecretHeader(env="PBX_TEST_CRM_TOKEN",
                                                            prefix="Bearer ")),))
    c = client(s)
    with caplog.at_level(logging.DEBUG):
        out = c.call("crm", {"phone": CALLER, "note": "wants a callback"})
        server.mode = "error"
        c.call("crm", {"phone": CALLER})
    assert out.ok
    req = server.requests[0]
    assert req.headers["authorization"] == f"Bearer {SECRET}"
    assert req.headers["x-source"] == "pbx"
    assert "crm" in caplog.text and "/crm/notes" in caplog.text
    for leak in (SECRET, CALLER, "callback"):
        assert leak not in caplog.text


def test_secret_header_from_a_file(server: WebhookServer, tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    secret_file = tmp_path / "crm.token"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    s = spec(server, secret_headers=(("x-api-key", SecretHeader(file=str(secret_file))),))
    with caplog.at_level(logging.DEBUG):
        assert client(s).call("crm", {}).ok
    assert server.requests[0].headers["x-api-key"] == SECRET
    assert SECRET not in caplog.text


def test_missing_secret_sends_nothing(server: WebhookServer, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("PBX_TEST_MISSING_TOKEN", raising=False)
    results: list[IntegrationOutcome] = []
    s = spec(server, breaker=BreakerPolicy(failures=1),
             secret_headers=(("Authorization", SecretHeader(env="PBX_TEST_MISSING_TOKEN")),))
    c = client(s, on_result=results.append)
    with caplog.at_level(logging.INFO):
        out = c.call("crm", {})
    assert not out.ok and out.error == "secret" and out.attempts == 0
    assert server.requests == [] and "PBX_TEST_MISSING_TOKEN" in caplog.text
    assert c.breaker("crm").state == CLOSED  # a local problem does not count against the CRM
    assert results == [out]


def test_url_user_info_and_query_are_not_logged(server: WebhookServer,
                                                caplog: pytest.LogCaptureFixture) -> None:
    url = server.url.replace("http://", "http://agent:pa55w0rd@") + "/crm/notes?key=qu3ry"
    s = IntegrationSpec(name="crm", url=url, timeout_ms=1000)
    with caplog.at_level(logging.DEBUG):
        assert client(s).call("crm", {}).ok
    assert server.requests[0].query == {"key": "qu3ry"}
    assert "pa55w0rd" not in caplog.text and "qu3ry" not in caplog.text
    assert server.url + "/crm/notes" in caplog.text
    assert redact_url("https://u:p@h:8443/a/b?c=d#e") == "https://h:8443/a/b"


def test_on_result_gets_every_outcome(server: WebhookServer) -> None:
    clock = Clock()
    results: list[IntegrationOutcome] = []
    server.mode = "error"
    c = client(spec(server, breaker=BreakerPolicy(failures=1)), clock=clock,
               on_result=results.append)
    outs = [c.call("crm", {}), c.call("crm", {}), c.call("nope", {})]
    assert results == outs
    assert [o.error for o in results] == ["http-503", "breaker-open", "unknown-integration"]


def test_unknown_integration_never_raises() -> None:
    out = WebhookClient({}).call("calendar", {"when": "today"})
    assert not out.ok and out.error == "unknown-integration" and out.attempts == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_connection_refused_is_connect_and_retried_only_when_idempotent() -> None:
    url = f"http://127.0.0.1:{free_port()}/x"
    post = IntegrationSpec(name="post", url=url, retries=2, backoff_ms=1, timeout_ms=1000)
    get = IntegrationSpec(name="get", url=url, method="GET", retries=2, backoff_ms=1,
                          timeout_ms=1000)
    c = client(post, get)
    out = c.call("post", {})
    assert out.error == "connect" and out.attempts == 1 and out.status is None
    assert c.call("get").attempts == 3


def test_non_json_2xx_is_bad_json() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>login</html>")

    s = IntegrationSpec(name="crm", url="http://crm.local/x",
                        breaker=BreakerPolicy(failures=1))
    c = client(s, transport=httpx.MockTransport(handler))
    out = c.call("crm", {})
    assert not out.ok and out.error == "bad-json" and out.status == 200 and out.data is None
    assert c.breaker("crm").state == OPEN  # garbage answers are a sick system


def test_proxy_variables_do_not_reroute_webhooks(server: WebhookServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert client(spec(server)).call("crm", {}).ok
    assert len(server.requests) == 1


def test_concurrent_calls_share_one_client(server: WebhookServer) -> None:
    c = client(spec(server, breaker=BreakerPolicy(failures=1)))
    results: list[bool] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(5):
            ok = c.call("crm", {"n": 1}).ok
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 40 and len(server.requests) == 40
    assert len(c._clients) == 1
    c.close()
    assert c.call("crm", {}).ok  # a new pool after close()


def test_unencodable_payload_is_refused_before_sending(server: WebhookServer) -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    out = client(spec(server)).call("crm", loop)
    assert out.error == "bad-payload" and out.attempts == 0 and server.requests == []


# -- the server's calendar ----------------------------------------------------------------

FRIDAY_10_07 = datetime(2099, 3, 6, 10, 7)  # 2099-03-06 is a Friday


def cal(today: datetime) -> tuple[WebhookServer, httpx.Client]:
    srv = WebhookServer(today=lambda: today).start()
    return srv, httpx.Client(base_url=srv.url, trust_env=False, timeout=5)


def available(http: httpx.Client, when: str) -> Any:
    return http.post("/calendar/availability", json={"when": when}).json()


def test_first_free_slot_is_never_before_now_and_skips_bookings() -> None:
    assert FRIDAY_10_07.weekday() == 4
    srv, http = cal(FRIDAY_10_07)
    with srv, http:
        assert available(http, "2099-03-06") == {"available": True, "start": "2099-03-06T10:30",
                                                 "end": "2099-03-06T11:00"}
        assert available(http, "2099-03-01T09:00")["start"] == "2099-03-06T10:30"  # the past
        monday = available(http, "2099-03-09")
        assert monday["start"] == "2099-03-09T08:00"
        r = http.post("/calendar/bookings",
                      json={"start": monday["start"], "name": "Ann", "phone": CALLER})
        assert r.status_code == 201
        assert r.json() == {"booking_id": "BK-0001", "start": "2099-03-09T08:00"}
        assert available(http, "2099-03-09")["start"] == "2099-03-09T08:30"
        again = http.post("/calendar/bookings", json={"start": "2099-03-09T08:00"})
        assert again.status_code == 409 and again.json() == {"error": "slot taken"}
        assert [b["booking_id"] for b in srv.bookings] == ["BK-0001"]
        assert available(http, "2099-03-09T17:29")["start"] == "2099-03-09T17:30"


def test_saturday_hours_and_sunday_skipped() -> None:
    srv, http = cal(datetime(2099, 3, 6, 17, 45))  # Friday after the last slot
    with srv, http:
        assert available(http, "2099-03-06")["start"] == "2099-03-07T09:00"  # Saturday
        for hour in ("09", "10", "11", "12"):
            for minute in ("00", "30"):
                r = http.post("/calendar/bookings", json={"start": f"2099-03-07T{hour}:{minute}"})
                assert r.status_code == 201
        assert available(http, "2099-03-07")["start"] == "2099-03-09T08:00"  # Monday
        assert available(http, "2099-03-08T10:00")["start"] == "2099-03-09T08:00"  # Sunday
        assert http.post("/calendar/bookings",
                         json={"start": "2099-03-07T13:00"}).status_code == 400  # closed


def test_bad_or_missing_when_is_400() -> None:
    srv, http = cal(FRIDAY_10_07)
    with srv, http:
        for body in ({"when": "next tuesday"}, {}, {"when": 5}):
            r = http.post("/calendar/availability", json=body)
            assert r.status_code == 400 and "error" in r.json()


def test_messages_other_paths_get_and_flap() -> None:
    with WebhookServer() as srv, httpx.Client(base_url=srv.url, trust_env=False) as http:
        assert http.post("/messages", json={"to": "x"}).json() == {"ok": True,
                                                                   "message_id": "MSG-0001"}
        assert http.post("/messages", json={}).json()["message_id"] == "MSG-0002"
        assert http.post("/crm/notes", json={}).json() == {"ok": True, "path": "/crm/notes"}
        assert http.put("/any", json={}).json() == {"ok": True, "path": "/any"}
        assert http.get("/q", params={"a": "1"}).json() == {"ok": True, "path": "/q",
                                                            "query": {"a": "1"}}
        srv.mode = "flap"
        srv.error_status = 502
        assert [http.get("/f").status_code for _ in range(4)] == [200, 502, 200, 502]
        with pytest.raises(ValueError):
            srv.mode = "sulk"
