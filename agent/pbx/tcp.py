"""The asyncio TCP listener lifecycle shared by the FastAGI and AudioSocket servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging

_LOGGER = logging.getLogger(__name__)


class TcpServerBase:
    """Bind, serve each connection in its own task, close with a bounded wait.

    Subclasses implement :meth:`_serve` for one connection.
    """

    #: shown in the log line when listening starts
    kind = "TCP"

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0 and started)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def active_connections(self) -> int:
        """Connections being served now."""
        return len(self._tasks)

    async def start(self) -> None:
        """Start listening."""
        self._server = await asyncio.start_server(self._on_connect, self.host, self._port)
        _LOGGER.info("%s server listening on %s:%d", self.kind, self.host, self.port)

    async def close(self, timeout_s: float = 2.0) -> None:
        """Stop listening, cancel running handlers and wait (bounded) for them."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout_s)
            self._server = None

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # Server shutdown. asyncio's stream callback logs an error for a cancelled
            # connection task, so the cancellation ends here.
            _LOGGER.debug("connection task cancelled by close()")
        finally:
            if task is not None:
                self._tasks.discard(task)
            await self._after_connection(writer)

    async def _after_connection(self, writer: asyncio.StreamWriter) -> None:
        """Hook run when a connection's task ends (default: nothing)."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError
