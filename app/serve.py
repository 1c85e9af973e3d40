"""Running the service: uvicorn with draining on SIGTERM, bounded connections and a deadline for
request headers. ``switchbank serve`` (app/cli.py) and the benchmarks' server start it this way."""

from __future__ import annotations

import asyncio
import gc

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def protocol(header_timeout: float):
    """uvicorn's httptools protocol, closing connections that do not finish sending a request's
    headers within ``header_timeout`` seconds of opening or of their previous answer. uvicorn
    times out idle keep-alive connections after an answer, but not a fresh connection that sends
    nothing, nor one that trickles its headers a byte at a time."""

    class Protocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

    return Protocol


def server(app, settings, host: str, port: int) -> uvicorn.Server:
    """The uvicorn server ``switchbank serve`` runs: readiness goes false the moment draining starts."""

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            # What start-up loaded (modules, backbone, the bank's switches and router index) lives as
            # long as the process: 4.4 million objects the collector tracks at 10,000 distinct
            # switches, which a full collection walks in 0.8 s. Frozen, they are never walked again;
            # the first request after ready had waited 0.4 s for such a collection. `switchbank
            # serve` holds the collector off until here, so the few thousand cyclic objects that
            # imports left behind are kept too.
            gc.freeze()
            gc.enable()

        def handle_exit(self, sig, frame):
            # so that load balancers stop sending before the listener closes
            app.state.ready = False
            app.state.not_ready_reason = "draining"
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_config=None, http=protocol(settings.header_timeout),
                            timeout_graceful_shutdown=settings.drain_seconds, timeout_keep_alive=5,
                            limit_concurrency=settings.max_connections)
    return Server(config)
