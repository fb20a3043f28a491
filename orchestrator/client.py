"""pdcluster client SDK: stream generations from a pdcluster router over gRPC.

Needs only grpcio and protobuf (no torch, ray, yaml or mesh), so it can be installed next to any application.

    with Client("127.0.0.1:50051") as client:
        for chunk in client.generate("Hello", max_tokens=16):
            print(chunk.text, end="")
        print(chunk.finish_reason, chunk.usage, chunk.timings)

    async with AsyncClient("127.0.0.1:50051") as client:
        async for chunk in client.generate(token_ids=[1, 2, 3]):
            ...

Errors surface as PdclusterError with the gRPC status code (INVALID_ARGUMENT names the offending field).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from orchestrator.client_status import status_from_proto
from protos import generation_pb2, generation_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_HEALTH_TIMEOUT_S = 5.0
_RETRY_BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0)  # then 2.0 for every further retry
_FINISH_REASON_NAMES = {
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_CANCELLED: "cancelled",
    generation_pb2.FINISH_REASON_ERROR: "error",
}
_TIMING_FIELDS = ("queue_ms", "prefill_ms", "kv_transfer_ms", "ttft_ms", "tpot_ms", "e2e_ms")


class PdclusterError(Exception):
    """A failed call: `.code` is the grpc.StatusCode, `.code_name` its name, `.message` the router's words."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def code_name(self) -> str:
        return self.code.name


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from a prefill replica's prefix cache

    def __getitem__(self, key: str) -> int:
        """usage["prompt_tokens"] works too, like the timings dict."""
        if key not in ("prompt_tokens", "completion_tokens", "cached_prompt_tokens"):
            raise KeyError(key)
        return getattr(self, key)


@dataclass(frozen=True)
class Chunk:
    """One streamed message. The last one has finish_reason set, and usage, timings and replicas."""

    token_ids: list[int]
    text: str
    request_id: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" on the last chunk
    usage: Usage | None = None
    # *_ms keys (queue, prefill, kv_transfer, ttft, tpot, e2e), kv_bytes, and {prefill,decode}_comm_bytes: kind -> bytes
    timings: dict[str, Any] | None = None
    prefill_replica: str | None = None
    decode_replica: str | None = None

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None


def build_request(
    prompt: str | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    max_tokens: int | None = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    request_id: str | None = None,
) -> generation_pb2.GenerateRequest:
    """The GenerateRequest for these arguments. Values are checked by the router, not here."""
    if isinstance(stop, str):
        stop = [stop]  # a lone string would otherwise become one stop per character
    sampling = generation_pb2.SamplingOptions(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=list(stop or ()),
        stop_token_ids=list(stop_token_ids or ()),
        ignore_eos=ignore_eos,
    )
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if seed is not None:
        sampling.seed = seed
    return generation_pb2.GenerateRequest(
        request_id=request_id or "", prompt=prompt or "", token_ids=list(token_ids or ()), sampling=sampling
    )


def chunk_from_response(response: generation_pb2.GenerateResponse) -> Chunk:
    if response.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED:
        return Chunk(token_ids=list(response.token_ids), text=response.text, request_id=response.request_id)
    timings: dict[str, Any] = {name: getattr(response.timings, name) for name in _TIMING_FIELDS}
    timings["kv_bytes"] = response.timings.kv_bytes
    # Payload bytes of each tier's collectives for the request, by kind (absent kinds moved nothing).
    timings["prefill_comm_bytes"] = dict(response.timings.prefill_comm_bytes)
    timings["decode_comm_bytes"] = dict(response.timings.decode_comm_bytes)
    return Chunk(
        token_ids=list(response.token_ids),
        text=response.text,
        request_id=response.request_id,
        finish_reason=_FINISH_REASON_NAMES.get(response.finish_reason, "error"),
        usage=Usage(prompt_tokens=response.usage.prompt_tokens, completion_tokens=response.usage.completion_tokens,
                    cached_prompt_tokens=response.usage.cached_prompt_tokens),
        timings=timings,
        prefill_replica=response.prefill_replica,
        decode_replica=response.decode_replica,
    )


def _to_error(error: grpc.RpcError) -> PdclusterError:
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return PdclusterError(code or grpc.StatusCode.UNKNOWN, details or "")


def _backoff_s(attempt: int) -> float:
    return _RETRY_BACKOFF_S[min(attempt, len(_RETRY_BACKOFF_S) - 1)]


class _Deadline:
    """One overall time limit shared by every retry of a call."""

    def __init__(self, timeout_s: float | None) -> None:
        self._end = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())


def _health_message_classes():
    """grpc.health.v1 request/response classes, built in a private descriptor pool.

    The client must not depend on grpcio-health-checking, and registering grpc.health.v1 in the default pool
    would clash with that package where both are loaded (the router). Only field 1 of each matters; the
    response's enum is read as a plain int (SERVING = 1), which is the same on the wire.
    """
    file_proto = descriptor_pb2.FileDescriptorProto(name="pdcluster_client/health.proto", package="grpc.health.v1", syntax="proto3")
    request = file_proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    response = file_proto.message_type.add(name="HealthCheckResponse")
    response.field.add(name="status", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
                       label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")),
    )


_HealthCheckRequest, _HealthCheckResponse = _health_message_classes()
_HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
_SERVING = 1


@dataclass(frozen=True)
class _Connection:
    """How to reach the router: plaintext or TLS (optionally with a client certificate), and a bearer token."""

    address: str
    token: str | None = None
    root_certificates: bytes | None = None  # PEM of the CA that signed the router's certificate; TLS when set
    client_cert: bytes | None = None  # PEM; with client_key, for mutual TLS
    client_key: bytes | None = None

    @classmethod
    def make(cls, address, token, tls_ca, tls_cert, tls_key) -> "_Connection":
        def read(path):
            if path is None:
                return None
            with open(path, "rb") as file:
                return file.read()

        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together (mutual TLS)")
        if tls_cert is not None and tls_ca is None:
            raise ValueError("mutual TLS needs tls_ca (the CA of the router's certificate) too")
        return cls(address, token, read(tls_ca), read(tls_cert), read(tls_key))

    def _credentials(self):
        return grpc.ssl_channel_credentials(self.root_certificates, self.client_key, self.client_cert)

    def _auth(self):
        return _AuthInterceptor(self.token) if self.token else None

    def channel(self) -> grpc.Channel:
        if self.root_certificates is not None:
            channel = grpc.secure_channel(self.address, self._credentials())
        else:
            channel = grpc.insecure_channel(self.address)
        auth = self._auth()
        return grpc.intercept_channel(channel, auth) if auth else channel

    def aio_channel(self) -> grpc.aio.Channel:
        auth = self._auth()
        interceptors = [_AsyncAuthInterceptor(self.token), _AsyncAuthStreamInterceptor(self.token)] if auth else None
        if self.root_certificates is not None:
            return grpc.aio.secure_channel(self.address, self._credentials(), interceptors=interceptors)
        return grpc.aio.insecure_channel(self.address, interceptors=interceptors)


def _with_token(details, token: str):
    metadata = list(details.metadata or ()) + [("authorization", f"Bearer {token}")]
    return _Details(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready,
                    getattr(details, "compression", None))


class _Details(
    collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                        "compression")),
    grpc.ClientCallDetails,
):
    pass


class _AuthInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_token(details, self._token), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_token(details, self._token), request)


class _AsyncAuthInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_aio_token(details, self._token), request)


class _AsyncAuthStreamInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_aio_token(details, self._token), request)


def _with_aio_token(details, token: str):
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add("authorization", f"Bearer {token}")
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


class Client:
    """Blocking client. Thread-safe; one channel, replaced only when a retry reconnects.

    timeout: seconds for a whole call (all retries included); None = no limit.
    retries: how many times a Generate or Status call that failed with UNAVAILABLE is retried on a fresh
    connection; a Generate is retried only if no message had arrived yet, so the caller never sees a token twice.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = None, retries: int = 0,
                 token: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        """token: bearer token when the router has authentication on. tls_ca: PEM file of the CA that signed
        the router's certificate (turns TLS on); tls_cert + tls_key: this client's certificate (mutual TLS)."""
        if not address:
            raise ValueError("address must be HOST:PORT, got an empty string")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self._connection = _Connection.make(address, token, tls_ca, tls_cert, tls_key)
        self._lock = threading.Lock()
        self._channel = self._connection.channel()
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        max_tokens: int | None = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        request_id: str | None = None,
    ) -> Iterator[Chunk]:
        """Streams Chunks. Exactly one of prompt and token_ids; max_tokens None lets the router choose.
        Stopping the iteration early (break, then close() or garbage collection) cancels the request."""
        return self._generate(build_request(
            prompt, token_ids=token_ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, request_id=request_id,
        ))

    def generate_text(self, prompt: str | None = None, **options) -> str:
        return "".join(chunk.text for chunk in self.generate(prompt, **options))

    def status(self) -> dict:
        """The deployment's replicas and load, shaped as documented in orchestrator/client_status.py."""
        deadline = _Deadline(self.timeout)
        for attempt in range(self.retries + 1):
            try:
                return status_from_proto(self._stub.Status(generation_pb2.StatusRequest(), timeout=deadline.remaining()))
            except grpc.RpcError as error:
                if not self._should_retry(error, attempt):
                    raise _to_error(error) from None
                self._reconnect(attempt)
        raise AssertionError("unreachable")

    def health(self, service: str = "") -> bool:
        """True when the router reports SERVING; False when it is not serving or cannot be reached."""
        check = self._channel.unary_unary(
            _HEALTH_CHECK_METHOD,
            request_serializer=_HealthCheckRequest.SerializeToString,
            response_deserializer=_HealthCheckResponse.FromString,
        )
        try:
            response = check(_HealthCheckRequest(service=service), timeout=self.timeout or DEFAULT_HEALTH_TIMEOUT_S)
        except grpc.RpcError:
            return False
        return response.status == _SERVING

    def apply(self, config_yaml: str, *, dry_run: bool = False, drain_timeout_s: float = 0.0) -> Iterator[str]:
        """Ask the router to change the deployment to match `config_yaml` (the text of a cluster.yaml). Yields the
        plan and then one line per completed step; raises PdclusterError if the change is refused."""
        from protos import admin_pb2, admin_pb2_grpc

        request = admin_pb2.ApplyRequest(config_yaml=config_yaml, dry_run=dry_run, drain_timeout_s=drain_timeout_s)
        lines: list[str] = []
        try:
            for progress in admin_pb2_grpc.AdminStub(self._channel).Apply(request, timeout=self.timeout):
                if progress.line:
                    lines.append(progress.line)
                    yield progress.line
                if progress.done and not progress.ok:
                    raise PdclusterError(grpc.StatusCode.FAILED_PRECONDITION, "; ".join(lines) or "apply refused")
        except grpc.RpcError as error:
            raise _to_error(error) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _generate(self, request: generation_pb2.GenerateRequest) -> Iterator[Chunk]:
        deadline = _Deadline(self.timeout)
        for attempt in range(self.retries + 1):
            call = self._stub.Generate(request, timeout=deadline.remaining())
            has_received = False
            try:
                for response in call:
                    has_received = True
                    yield chunk_from_response(response)
                return
            except grpc.RpcError as error:
                if has_received or not self._should_retry(error, attempt):
                    raise _to_error(error) from None
            finally:
                call.cancel()  # no-op once finished; otherwise the caller stopped early: cancel on the router too
            self._reconnect(attempt)

    def _should_retry(self, error: grpc.RpcError, attempt: int) -> bool:
        return error.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries

    def _reconnect(self, attempt: int) -> None:
        time.sleep(_backoff_s(attempt))
        # A fresh channel dials at once instead of waiting out the old one's reconnect backoff. The old one is
        # not closed: closing would cancel other threads' calls on it; it is released when they finish.
        with self._lock:
            self._channel = self._connection.channel()
            self._stub = generation_pb2_grpc.GenerationStub(self._channel)


class AsyncClient:
    """The asyncio twin of Client: `async for chunk in client.generate(...)`, `await client.status()`.

    Breaking out of `async for` early leaves the stream to be closed when it is garbage collected; wrap it in
    `contextlib.aclosing(...)` to cancel the request at once.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = None, retries: int = 0,
                 token: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        if not address:
            raise ValueError("address must be HOST:PORT, got an empty string")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self._connection = _Connection.make(address, token, tls_ca, tls_cert, tls_key)
        self._channel: grpc.aio.Channel | None = None  # made on first use, inside the caller's event loop
        self._stub: generation_pb2_grpc.GenerationStub | None = None

    async def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        max_tokens: int | None = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        request_id: str | None = None,
    ) -> AsyncIterator[Chunk]:
        """As Client.generate."""
        request = build_request(
            prompt, token_ids=token_ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, request_id=request_id,
        )
        deadline = _Deadline(self.timeout)
        for attempt in range(self.retries + 1):
            call = self._get_stub().Generate(request, timeout=deadline.remaining())
            has_received = False
            try:
                async for response in call:
                    has_received = True
                    yield chunk_from_response(response)
                return
            except grpc.RpcError as error:
                if has_received or not self._should_retry(error, attempt):
                    raise _to_error(error) from None
            finally:
                call.cancel()
            await self._reconnect(attempt)

    async def generate_text(self, prompt: str | None = None, **options) -> str:
        return "".join([chunk.text async for chunk in self.generate(prompt, **options)])

    async def status(self) -> dict:
        deadline = _Deadline(self.timeout)
        for attempt in range(self.retries + 1):
            try:
                response = await self._get_stub().Status(generation_pb2.StatusRequest(), timeout=deadline.remaining())
                return status_from_proto(response)
            except grpc.RpcError as error:
                if not self._should_retry(error, attempt):
                    raise _to_error(error) from None
                await self._reconnect(attempt)
        raise AssertionError("unreachable")

    async def health(self, service: str = "") -> bool:
        self._get_stub()
        check = self._channel.unary_unary(
            _HEALTH_CHECK_METHOD,
            request_serializer=_HealthCheckRequest.SerializeToString,
            response_deserializer=_HealthCheckResponse.FromString,
        )
        try:
            response = await check(_HealthCheckRequest(service=service), timeout=self.timeout or DEFAULT_HEALTH_TIMEOUT_S)
        except grpc.RpcError:
            return False
        return response.status == _SERVING

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def _get_stub(self) -> generation_pb2_grpc.GenerationStub:
        if self._stub is None:
            self._channel = self._connection.aio_channel()
            self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        return self._stub

    def _should_retry(self, error: grpc.RpcError, attempt: int) -> bool:
        return error.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries

    async def _reconnect(self, attempt: int) -> None:
        await asyncio.sleep(_backoff_s(attempt))
        # Same reasoning as Client._reconnect: a fresh channel, the old one left to the calls still on it.
        self._channel = self._connection.aio_channel()
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
