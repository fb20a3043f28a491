"""A running pdcluster: the Ray deployment of both tiers plus the gRPC router, started and stopped as one.

Who calls it: `pdcluster serve` and `pdcluster demo` (orchestrator/cli.py) and the end-to-end tests. The router's
event loop runs in a background thread, so the caller's thread stays free (to wait for Ctrl-C, to run a client, or
to run tests).
"""

from __future__ import annotations

import asyncio
import sys
import threading

from mesh.tokenizer import load_tokenizer
from orchestrator.config import ClusterConfig
from orchestrator.deploy import Deployment
from orchestrator.security import router_security


class RunningCluster:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.deployment: Deployment | None = None
        self.backend = None
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None

    @property
    def address(self) -> str:
        host = self.config.router.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"{host}:{self.port}"

    def start(self, *, out=sys.stderr) -> "RunningCluster":
        from orchestrator.cluster import ClusterBackend
        from orchestrator.router import build_server

        router = self.config.router
        interceptors, credentials = router_security(router)  # a bad tokens or TLS file fails before deploying
        self.deployment = Deployment.start(self.config, out=out)
        try:
            self.backend = ClusterBackend(self.deployment)
            tokenizer = load_tokenizer(self.config.model.path)
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="pdcluster-router", daemon=True)
            self._thread.start()
            self._server = build_server(self.backend, tokenizer, host=router.host, port=router.port,
                                        max_inflight=router.max_inflight,
                                        max_message_bytes=router.max_message_bytes,
                                        max_prompt_tokens=router.max_prompt_tokens,
                                        extra_services=[self._add_admin],
                                        interceptors=interceptors, credentials=credentials)
            self.port = self._call(self._server.start())
        except BaseException:
            self.stop()
            raise
        print(f"pdcluster: router listening on {self.address} (model {self.config.model.name})", file=out, flush=True)
        return self

    def _add_admin(self, server) -> None:
        from orchestrator.apply import AdminServicer
        from protos import admin_pb2_grpc

        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.backend), server)

    def _call(self, coro, timeout: float | None = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def status(self) -> dict:
        return self._call(self.backend.status())

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting requests, let in-flight ones finish for up to grace_s, then tear the tiers down."""
        if self._server is not None and self._loop is not None:
            try:
                self._call(self._server.stop(grace_s), timeout=grace_s + 10)
            except Exception:
                pass
            self._server = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop = None
        if self.deployment is not None:
            self.deployment.shutdown()
            self.deployment = None

    def __enter__(self) -> "RunningCluster":
        return self.start() if self.deployment is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
