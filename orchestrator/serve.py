"""A running pdcluster: the Ray deployment of both tiers plus the gRPC router, started and stopped as one.

Who calls it: `pdcluster serve` and `pdcluster demo` (orchestrator/cli.py) and the end-to-end tests. The router's
event loop runs in a background thread, so the caller's thread stays free (to wait for Ctrl-C, to run a client, or
to run tests). When cluster.yaml asks for them, the Prometheus endpoint (`metrics:`) and the OpenAI-compatible
gateway (`gateway:`) start and stop with the router; every request ends with one JSON line on the
`pdcluster.requests` logger (orchestrator/request_log.py).
"""

from __future__ import annotations

import asyncio
import errno
import sys
import threading

from mesh.tokenizer import load_tokenizer
from orchestrator.config import ClusterConfig
from orchestrator.deploy import Deployment
from orchestrator.request_log import RequestLog, RequestRecord
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
        self.metrics = None  # orchestrator.metrics.ClusterMetrics when metrics.port is set
        self.metrics_port: int | None = None
        self.gateway_port: int | None = None
        self._metrics_server = None
        self._poller = None
        self._gateway = None
        self._request_log = RequestLog()
        self._stopping = False
        self.autoscaler = None  # orchestrator.autoscale_runner.AutoscaleRunner when a tier has an autoscale block
        self._autoscale_task = None

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
            if self.config.metrics.is_enabled:
                from orchestrator.metrics import ClusterMetrics

                self.metrics = ClusterMetrics()
            self.backend = ClusterBackend(self.deployment, metrics=self.metrics)
            tokenizer = load_tokenizer(self.config.model.path)
            self._loop = asyncio.new_event_loop()
            self._loop.set_exception_handler(self._on_loop_exception)
            self._thread = threading.Thread(target=self._loop.run_forever, name="pdcluster-router", daemon=True)
            self._thread.start()
            self._server = build_server(self.backend, tokenizer, host=router.host, port=router.port,
                                        max_inflight=router.max_inflight,
                                        max_message_bytes=router.max_message_bytes,
                                        max_prompt_tokens=router.max_prompt_tokens,
                                        extra_services=[self._add_admin],
                                        interceptors=interceptors, credentials=credentials,
                                        on_request_done=self._on_request_done)
            self.port = self._call(self._server.start())
            self._health_task = asyncio.run_coroutine_threadsafe(self.backend.health_loop(), self._loop)
            self._start_autoscaler()
            endpoints = self._start_observability()
        except BaseException:
            self.stop()
            raise
        print(f"pdcluster: router listening on {self.address} (model {self.config.model.name})", file=out, flush=True)
        for line in endpoints:
            print(f"pdcluster: {line}", file=out, flush=True)
        return self

    def _on_request_done(self, record: RequestRecord) -> None:
        self._request_log.write(record)
        if self.autoscaler is not None:
            self.autoscaler.record(record)
        if self.metrics is not None:
            self.metrics.observe_request(record)

    def _start_autoscaler(self) -> None:
        """The planner loop on the router's loop, when some tier has an autoscale block; `pdcluster status` shows
        its decisions (the backend's status carries them)."""
        from orchestrator.autoscale_runner import AutoscaleRunner

        if not AutoscaleRunner.is_wanted(self.config):
            return
        self.autoscaler = AutoscaleRunner(self.backend)
        self.backend.autoscaler = self.autoscaler
        self._autoscale_task = asyncio.run_coroutine_threadsafe(self.autoscaler.run(), self._loop)

    def _start_observability(self) -> list[str]:
        """The metrics endpoint (+ replica poller) and the OpenAI gateway, where cluster.yaml asks for them;
        returns a line per endpoint for the console."""
        config, lines = self.config, []
        if self.metrics is not None:
            from orchestrator.metrics import MetricsServer, ReplicaPoller

            server = self._server
            self.metrics.bind_in_flight(lambda: server.num_inflight)
            self._poller = ReplicaPoller(self.backend, self.metrics)
            self._call(self._poller.start())
            self._metrics_server = MetricsServer(self.metrics, host=config.metrics.host, port=config.metrics.port)
            self.metrics_port = self._metrics_server.start()
            lines.append(f"Prometheus metrics on http://{config.metrics.host}:{self.metrics_port}/metrics")
        if config.gateway.is_enabled:
            from orchestrator.config import ConfigError
            from orchestrator.gateway import OpenAIGateway

            router = config.router
            if router.tls_client_ca:
                raise ConfigError("gateway", "the gateway cannot present a client certificate to a router that "
                                  "requires one (router.tls.client_ca); turn one of them off")
            self._gateway = OpenAIGateway(
                self.address, host=config.gateway.host, port=config.gateway.port, model_name=config.model.name,
                model_dir=config.model.path, max_context_len=self.backend.model_info.max_context_len,
                client_options={"tls_ca": router.tls_cert} if router.tls_cert else None)
            self.gateway_port = self._call(self._gateway.start())
            lines.append(f"OpenAI-compatible API on http://{config.gateway.host}:{self.gateway_port}/v1")
        return lines

    def _add_admin(self, server) -> None:
        from orchestrator.apply import AdminServicer
        from protos import admin_pb2_grpc

        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.backend), server)

    def _call(self, coro, timeout: float | None = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def status(self) -> dict:
        return self._call(self.backend.status())

    def _on_loop_exception(self, loop, context) -> None:
        # grpc.aio's poller can fire once more after the stopped server closed its descriptor; only while we
        # are shutting down is that expected (EBADF), and it is not worth a traceback on the user's terminal.
        error = context.get("exception")
        if self._stopping and isinstance(error, OSError) and error.errno == errno.EBADF:
            return
        loop.default_exception_handler(context)

    def stop(self, grace_s: float = 5.0, *, remove_tiers: bool | None = None) -> None:
        """Stop accepting requests, let in-flight ones finish for up to grace_s, then tear the tiers down.
        remove_tiers: None (default) removes them unless cluster.yaml sets router.detach_tiers, in which case they
        keep running for the next router; True removes detached tiers too; False keeps them (detached only: tiers
        that are not detached belong to this process and always go)."""
        self._stopping = True
        if getattr(self, "_health_task", None) is not None:
            self._health_task.cancel()
            self._health_task = None
        if self._autoscale_task is not None:  # before the replicas go: no scaling while stopping
            self._autoscale_task.cancel()
            self._autoscale_task = None
        if self._loop is not None:  # the gateway first: it forwards to the router
            for stoppable in (self._gateway, self._poller):
                if stoppable is not None:
                    try:
                        self._call(stoppable.stop(), timeout=grace_s + 10)
                    except Exception:
                        pass
        self._gateway = self._poller = None
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None
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
            keep = self.config.router.detach_tiers if remove_tiers is None else not remove_tiers
            if keep:
                self.deployment.release()
            else:
                self.deployment.shutdown()
            self.deployment = None

    def __enter__(self) -> "RunningCluster":
        return self.start() if self.deployment is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
