"""The gRPC router: serves pdcluster.v1.Generation (plus the standard health service) over a Backend.

Per Generate call: validate (INVALID_ARGUMENT naming the field), admit (RESOURCE_EXHAUSTED beyond
max_inflight), tokenize, stream the backend's tokens with incremental text, match stop strings, and end with a
message carrying finish reason, usage, timings and replicas. Whenever the router stops listening before the
backend finished (stop string, client cancel, deadline, error), it closes the backend's stream, which cancels
the request downstream.

Called by the CLI / deployment code: `build_server(...)`, then `await server.start()`, and
`await server.stop(grace_s)` on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mesh.tokenizer import IncrementalDecoder
from orchestrator.backend import Backend, BackendError, FinishEvent, RequestSpec, Timings, TokenEvent
from orchestrator.client_status import StatusFormatError, status_to_proto
from orchestrator.request_log import RequestRecord, outcome_for
from orchestrator.stop_strings import StopStringMatcher
from orchestrator.validation import ParsedRequest, RequestValidationError, check_prompt, parse_request, sampling_params
from protos import generation_pb2, generation_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name  # "pdcluster.v1.Generation"
_FINISH_REASON_ENUM = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "cancelled": generation_pb2.FINISH_REASON_CANCELLED,
    "error": generation_pb2.FINISH_REASON_ERROR,
}


class _RequestTrace:
    """What the router learns about one request while relaying it, for the final message and the request record
    (orchestrator/request_log.py) made when the call ends."""

    def __init__(self, arrival_time: float, request_id: str = "") -> None:
        self.arrival_time = arrival_time  # time.perf_counter() when the call arrived
        self.request_id = request_id
        self.code = "OK"  # the gRPC status the client gets; set before aborting
        self.error = ""
        self.finish_reason: str | None = None
        self.num_prompt_tokens = 0
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_first_event_tokens = 0
        self.num_completion_tokens = 0
        self.prefill_replica = ""
        self.decode_replica = ""
        self.backend_timings = Timings()

    def on_tokens(self, event: TokenEvent) -> None:
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
            self.num_first_event_tokens = len(event.token_ids)
        self.last_token_time = now
        self.num_completion_tokens += len(event.token_ids)
        self._note_source(event.prefill_replica, event.decode_replica, event.timings)

    def on_finish(self, event: FinishEvent) -> None:
        self._note_source(event.prefill_replica, event.decode_replica, event.timings)

    def _note_source(self, prefill_replica: str, decode_replica: str, timings: Timings | None) -> None:
        self.prefill_replica = prefill_replica or self.prefill_replica
        self.decode_replica = decode_replica or self.decode_replica
        self.backend_timings = timings or self.backend_timings

    def fail(self, code_name: str, message: str) -> None:
        self.code, self.error = code_name, message

    def timings_ms(self) -> dict:
        end_time = time.perf_counter()
        ttft_ms = tpot_ms = 0.0
        if self.first_token_time is not None:
            ttft_ms = (self.first_token_time - self.arrival_time) * 1e3
            num_later_tokens = self.num_completion_tokens - self.num_first_event_tokens
            if num_later_tokens > 0:
                tpot_ms = (self.last_token_time - self.first_token_time) * 1e3 / num_later_tokens
        backend = self.backend_timings
        return dict(
            queue_ms=backend.queue_s * 1e3,
            prefill_ms=backend.prefill_s * 1e3,
            kv_transfer_ms=backend.kv_transfer_s * 1e3,
            ttft_ms=ttft_ms,
            tpot_ms=tpot_ms,
            e2e_ms=(end_time - self.arrival_time) * 1e3,
            kv_bytes=backend.kv_bytes,
            prefill_comm_bytes=dict(backend.prefill_comm_bytes),
            decode_comm_bytes=dict(backend.decode_comm_bytes),
        )

    def timings_proto(self) -> generation_pb2.Timings:
        return generation_pb2.Timings(**self.timings_ms())

    def record(self) -> RequestRecord:
        return RequestRecord(
            request_id=self.request_id, outcome=outcome_for(self.code, self.finish_reason), code=self.code,
            error=self.error, prefill_replica=self.prefill_replica, decode_replica=self.decode_replica,
            prompt_tokens=self.num_prompt_tokens, completion_tokens=self.num_completion_tokens,
            end_time=time.time(), **self.timings_ms(),
        )


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, backend: Backend, tokenizer, *, max_inflight: int, max_prompt_tokens: int | None,
                 on_request_done: Callable[[RequestRecord], None] | None = None) -> None:
        self._backend = backend
        self._on_request_done = on_request_done
        self._tokenizer = tokenizer
        self._max_inflight = max_inflight
        self._max_prompt_tokens = max_prompt_tokens
        self._inflight_request_ids: set[str] = set()

    @property
    def num_inflight(self) -> int:
        return len(self._inflight_request_ids)

    # A coroutine writing with context.write (not an async generator): a client cancel or deadline then raises
    # CancelledError inside this task at whatever it awaits, so every finally below runs at once.
    async def Generate(self, request, context) -> None:
        trace = _RequestTrace(time.perf_counter(), request_id=request.request_id)
        try:
            await self._generate(request, context, trace)
        except asyncio.CancelledError:  # grpc cancels this task when the client goes away or the deadline passes
            time_remaining = context.time_remaining()
            is_late = time_remaining is not None and time_remaining <= 0
            trace.fail("DEADLINE_EXCEEDED" if is_late else "CANCELLED", "deadline passed" if is_late else "client cancelled")
            raise
        except BaseException as error:
            if trace.code == "OK":  # not one of our aborts
                trace.fail("UNKNOWN", f"{type(error).__name__}: {error}")
            raise
        finally:
            self._report(trace)

    def _report(self, trace: _RequestTrace) -> None:
        if self._on_request_done is None:
            return
        try:
            self._on_request_done(trace.record())
        except Exception:  # metrics or logging must never fail a request
            logger.exception("request %s: on_request_done failed", trace.request_id)

    async def _generate(self, request, context, trace: _RequestTrace) -> None:
        model_info = self._backend.model_info
        try:
            parsed = parse_request(request, model_info)
        except RequestValidationError as error:
            await _abort(context, trace, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        # Admission: no await between the check and the add, so the count cannot be overtaken.
        if self.num_inflight >= self._max_inflight:
            await _abort(context, trace, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"router at capacity: {self.num_inflight} requests in flight")
        request_id = parsed.request_id or uuid.uuid4().hex
        trace.request_id = request_id
        if request_id in self._inflight_request_ids:
            await _abort(context, trace, grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request_id!r} is already in flight")
        self._inflight_request_ids.add(request_id)
        try:
            spec = await self._make_spec(request_id, parsed, context, trace)
            trace.num_prompt_tokens = len(spec.prompt_token_ids)
            await self._relay(spec, context, trace)
        finally:
            self._inflight_request_ids.discard(request_id)

    async def _make_spec(self, request_id: str, parsed: ParsedRequest, context, trace: _RequestTrace) -> RequestSpec:
        """Tokenize and finish validation (the checks that need the prompt's length)."""
        model_info = self._backend.model_info
        if parsed.prompt is not None:
            try:
                # Off the event loop: a long prompt would stall every other stream.
                prompt_token_ids = await asyncio.to_thread(self._tokenizer.encode, parsed.prompt)
            except Exception as error:
                logger.exception("request %s: tokenizer failed", request_id)
                await _abort(context, trace, grpc.StatusCode.INTERNAL,
                             f"tokenizing the prompt failed: {type(error).__name__}: {error}")
        else:
            prompt_token_ids = parsed.token_ids
        try:
            check_prompt(parsed, prompt_token_ids, model_info, self._max_prompt_tokens)
            params = sampling_params(parsed, len(prompt_token_ids), model_info)
        except RequestValidationError as error:
            await _abort(context, trace, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        time_remaining = context.time_remaining()
        return RequestSpec(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            stop=parsed.stop,
            deadline=None if time_remaining is None else time.time() + time_remaining,
        )

    async def _relay(self, spec: RequestSpec, context, trace: _RequestTrace) -> None:
        """Stream the backend's events to the client as text; end with the final message."""
        decoder = IncrementalDecoder(self._tokenizer, spec.prompt_token_ids)  # the prompt is decoding context only
        stop_matcher = StopStringMatcher(spec.stop)
        finish_reason = None
        stream = self._backend.generate(spec)
        try:
            async for event in stream:
                if isinstance(event, TokenEvent):
                    trace.on_tokens(event)
                    text = stop_matcher.push(decoder.push(event.token_ids))
                    await context.write(
                        generation_pb2.GenerateResponse(request_id=spec.request_id, token_ids=event.token_ids, text=text)
                    )
                    if stop_matcher.is_stopped:
                        finish_reason = "stop"
                        break
                elif isinstance(event, FinishEvent):
                    trace.on_finish(event)
                    finish_reason = event.finish_reason
                    break
                else:
                    raise TypeError(f"backend yielded {type(event).__name__}; expected TokenEvent or FinishEvent")
            else:
                raise RuntimeError("backend stream ended without a FinishEvent")
        except BackendError as error:
            logger.info("request %s: backend error %s: %s", spec.request_id, error.code.name, error.message)
            await _abort(context, trace, error.code, error.message)
        except Exception as error:
            logger.exception("request %s: failed while generating", spec.request_id)
            await _abort(context, trace, grpc.StatusCode.INTERNAL,
                         f"request {spec.request_id} failed: {type(error).__name__}: {error}")
        finally:
            # Cancels the request downstream unless it finished. Before the final message goes out, so that a
            # client reading it can count on the backend having let go of the request.
            await _close_stream(stream)

        tail_text = ""
        if not stop_matcher.is_stopped:  # the backend finished: release held-back text (a stop string may still match)
            tail_text = stop_matcher.push(decoder.flush())
            if not stop_matcher.is_stopped:
                tail_text += stop_matcher.flush()  # may still end on a stop string it was holding back
            if stop_matcher.is_stopped:
                finish_reason = "stop"
        trace.finish_reason = finish_reason
        logger.debug(
            "request %s: finish=%s prompt=%d completion=%d backend_ttft=%.1fms", spec.request_id, finish_reason,
            len(spec.prompt_token_ids), trace.num_completion_tokens, trace.backend_timings.ttft_s * 1e3,
        )
        await context.write(generation_pb2.GenerateResponse(
            request_id=spec.request_id,
            text=tail_text,
            finish_reason=_FINISH_REASON_ENUM[finish_reason],
            usage=generation_pb2.Usage(prompt_tokens=len(spec.prompt_token_ids), completion_tokens=trace.num_completion_tokens,
                                       cached_prompt_tokens=trace.backend_timings.num_cached_tokens),
            timings=trace.timings_proto(),
            prefill_replica=trace.prefill_replica,
            decode_replica=trace.decode_replica,
        ))

    async def Status(self, request, context) -> generation_pb2.StatusResponse:
        try:
            status = await self._backend.status()
            return status_to_proto(
                status, max_context_len=self._backend.model_info.max_context_len, num_inflight=self.num_inflight
            )
        except BackendError as error:
            await context.abort(error.code, error.message)
        except StatusFormatError as error:
            logger.error("backend status has the wrong shape: %s", error)
            await context.abort(grpc.StatusCode.INTERNAL, f"backend status has the wrong shape: {error}")
        except Exception as error:
            logger.exception("backend status failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"backend status failed: {type(error).__name__}: {error}")


async def _abort(context, trace: _RequestTrace, code: grpc.StatusCode, message: str) -> None:
    """Ends the call with `code` (raises), noting it for the request record first."""
    trace.fail(code.name, message)
    await context.abort(code, message)


async def _close_stream(stream) -> None:
    aclose = getattr(stream, "aclose", None)  # async generators have it; a bare AsyncIterator may not
    if aclose is not None:
        await aclose()


class RouterServer:
    """One gRPC server: Generation + grpc.health.v1.Health on host:port."""

    def __init__(self, servicer: GenerationServicer, *, host: str, port: int, max_message_bytes: int,
                 extra_services=(), interceptors=(), credentials: grpc.ServerCredentials | None = None) -> None:
        self._servicer = servicer
        self._interceptors = tuple(interceptors)  # e.g. bearer-token auth, per-client stream limits
        self._credentials = credentials  # TLS; None listens in plaintext
        self._extra_services = tuple(extra_services)  # callables(server) that add more servicers (Admin)
        self._address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        self._max_message_bytes = max_message_bytes
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self.port: int | None = None

    @property
    def num_inflight(self) -> int:
        return self._servicer.num_inflight

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port (useful with port 0). Health is SERVING after."""
        if self._server is not None:
            raise RuntimeError("RouterServer.start() called twice")
        # Created here, not in __init__, so the server belongs to the event loop that runs it.
        server = grpc.aio.server(
            interceptors=self._interceptors,
            options=[
                ("grpc.max_receive_message_length", self._max_message_bytes),
                ("grpc.max_send_message_length", self._max_message_bytes),
            ]
        )
        generation_pb2_grpc.add_GenerationServicer_to_server(self._servicer, server)
        health_servicer = health.aio.HealthServicer()
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for add_service in self._extra_services:
            add_service(server)
        try:
            if self._credentials is not None:
                port = server.add_secure_port(self._address, self._credentials)
            else:
                port = server.add_insecure_port(self._address)
        except RuntimeError as error:
            raise OSError(f"router cannot listen on {self._address}: {error}") from error
        if port == 0:  # older grpc reports a failed bind this way
            raise OSError(f"router cannot listen on {self._address}")
        await server.start()
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._health, self.port = server, health_servicer, port
        logger.info("router serving %s on port %d", SERVICE_NAME, port)
        return port

    async def set_serving(self, is_serving: bool) -> None:
        """Health status of the whole server and of Generation, e.g. NOT_SERVING while no replica is ready."""
        if self._health is None:
            raise RuntimeError("RouterServer.set_serving() before start()")
        status = health_pb2.HealthCheckResponse.SERVING if is_serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def stop(self, grace_s: float | None) -> None:
        """Health turns NOT_SERVING, new calls are refused, calls in flight get grace_s to finish."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        logger.info("router stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def build_server(
    backend: Backend,
    tokenizer,
    *,
    host: str,
    port: int,
    max_inflight: int,
    max_message_bytes: int,
    max_prompt_tokens: int | None = None,
    extra_services=(),
    on_request_done: Callable[[RequestRecord], None] | None = None,
    interceptors=(),
    credentials: grpc.ServerCredentials | None = None,
) -> RouterServer:
    """The router over `backend`; `tokenizer` follows mesh/tokenizer.py (encode, decode; IncrementalDecoder).
    `on_request_done(record)` is called on the router's event loop once per Generate call when it ends, whatever
    ended it (it must be quick and not block: metrics, one log line)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {port}")
    if max_inflight < 1:
        raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
    if max_message_bytes < 1024:
        raise ValueError(f"max_message_bytes must be >= 1024, got {max_message_bytes}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")
    servicer = GenerationServicer(backend, tokenizer, max_inflight=max_inflight, max_prompt_tokens=max_prompt_tokens,
                                  on_request_done=on_request_done)
    return RouterServer(servicer, host=host, port=port, max_message_bytes=max_message_bytes,
                        extra_services=extra_services, interceptors=interceptors, credentials=credentials)
