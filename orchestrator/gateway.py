"""The OpenAI-compatible HTTP gateway: /v1/completions, /v1/chat/completions (JSON or server-sent events),
/v1/models and /health, forwarded to the gRPC router through `orchestrator.client.AsyncClient`.

Who calls it: `orchestrator/serve.py` starts one on the router's event loop when cluster.yaml has a `gateway.port`
(or `pdcluster serve --openai PORT`): `await OpenAIGateway(...).start()` -> port, `await gateway.stop()`.

Why aiohttp: one asyncio library that is both the HTTP server and gives plain control over a streamed response
(server-sent events are just `await response.write(...)`), so the gateway shares the router's event loop with no
ASGI server or extra thread; it is widely used and maintained.

Authentication: the caller's `Authorization: Bearer <token>` (what the openai client sends as its api_key) is
passed on to the router, which checks it against its tokens file as for any gRPC client (401 when it refuses).

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad request (the router's
INVALID_ARGUMENT message as it is), 404 for an unknown model or path, 429 for RESOURCE_EXHAUSTED, 503 for
UNAVAILABLE. An error after a stream has started is sent as one last `data: {"error": ...}` event.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid

from aiohttp import web

from orchestrator.client import AsyncClient, PdclusterError
from orchestrator.gateway_chat import ChatFormatter
from orchestrator.gateway_protocol import (GatewayError, GenerateCall, chat_body, chat_chunk, completion_body,
                                           completion_chunk, models_body, parse_common, parse_completion,
                                           usage_chunk)

log = logging.getLogger("pdcluster.gateway")

_MAX_BODY_BYTES = 16 * 1024 * 1024
_REQUEST_ID_HEADER = "X-Request-Id"
_MAX_TOKEN_CLIENTS = 32  # router connections kept for distinct bearer tokens; the oldest is closed beyond this


class OpenAIGateway:
    def __init__(self, router_address: str, *, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None,
                 model_dir: str | None = None, max_context_len: int | None = None,
                 client_options: dict | None = None) -> None:
        """model_name / max_context_len: asked from the router's Status at start when not given. model_dir: where
        tokenizer_config.json (chat template) is looked for; None = the role-prefixed chat format.
        client_options: TLS options of orchestrator.client.AsyncClient (tls_ca, tls_cert, tls_key) for the router."""
        self._router_address = router_address
        self._client_options = dict(client_options or {})
        self._token_clients: dict[str, AsyncClient] = {}
        self._host, self._port = host, port
        self._model_name = model_name
        self._max_context_len = max_context_len
        self._chat = ChatFormatter.from_model_dir(model_dir)
        self._created = int(time.time())
        self._client: AsyncClient | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def model_name(self) -> str | None:
        return self._model_name

    async def start(self) -> int:
        """Binds and serves on the running event loop; returns the bound port (useful with port 0)."""
        self._client = AsyncClient(self._router_address, **self._client_options)
        if self._model_name is None or self._max_context_len is None:
            status = await self._client.status()
            self._model_name = self._model_name or status["model"]
            self._max_context_len = self._max_context_len or status.get("max_context_len")
        app = web.Application(middlewares=[_errors_middleware], client_max_size=_MAX_BODY_BYTES)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/health", self._health)
        # handler_cancellation: a client that hangs up cancels its handler, which cancels the request downstream.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
        except OSError as error:
            await self.stop()
            raise OSError(f"gateway cannot listen on {self._host}:{self._port}: {error}") from error
        self.port = self._runner.addresses[0][1]
        log.info("OpenAI gateway on http://%s:%d/v1 -> router %s", self._host, self.port, self._router_address)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for client in [self._client, *self._token_clients.values()]:
            if client is not None:
                await client.close()
        self._client, self._token_clients = None, {}

    @contextlib.asynccontextmanager
    async def _client_for(self, request: web.Request):
        """The router connection that presents the caller's bearer token (or none). A new token's connection is
        kept only once the router accepted a call with it, so unknown tokens never push known ones out."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            yield self._client
            return
        client = self._token_clients.get(token)
        if client is not None:
            yield client
            return
        client = AsyncClient(self._router_address, token=token, **self._client_options)
        is_accepted = False
        try:
            yield client
            is_accepted = True
        except GatewayError as error:
            is_accepted = error.status not in (401, 403)
            raise
        finally:
            if not is_accepted:
                await client.close()
            elif token not in self._token_clients:
                if len(self._token_clients) >= _MAX_TOKEN_CLIENTS:  # close the oldest (its calls are cancelled)
                    await self._token_clients.pop(next(iter(self._token_clients))).close()
                self._token_clients[token] = client

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(models_body(self._model_name, self._created, self._max_context_len))

    async def _health(self, request: web.Request) -> web.Response:
        is_serving = await self._client.health()
        return web.json_response({"status": "ok" if is_serving else "unavailable"}, status=200 if is_serving else 503)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        call = parse_completion(await _json_body(request), self._model_name)
        return await self._answer(request, call, is_chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        call = parse_common(body, self._model_name, default_max_tokens=None)
        prompt = self._chat.render(body.get("messages"))
        return await self._answer(request, GenerateCall(prompt=prompt, options=call.options, is_stream=call.is_stream,
                                                        include_usage=call.include_usage), is_chat=True)

    async def _answer(self, request: web.Request, call: GenerateCall, *, is_chat: bool) -> web.StreamResponse:
        request_id = request.headers.get(_REQUEST_ID_HEADER) or uuid.uuid4().hex
        async with self._client_for(request) as client:
            return await self._relay(request, client, call, is_chat, request_id)

    async def _relay(self, request: web.Request, client: AsyncClient, call: GenerateCall, is_chat: bool,
                     request_id: str) -> web.StreamResponse:
        response_id = f"{'chatcmpl' if is_chat else 'cmpl'}-{request_id}"
        stream = client.generate(call.prompt, token_ids=call.token_ids, request_id=request_id, **call.options)
        # aclosing: however this handler ends (client gone, error), the gRPC call is cancelled at once.
        async with contextlib.aclosing(stream):
            try:
                first = await anext(stream)  # errors before any output become a plain HTTP error
            except PdclusterError as error:
                raise GatewayError.from_grpc(error.code, error.message) from None
            headers = {_REQUEST_ID_HEADER: request_id}
            if not call.is_stream:
                text, last = first.text, first
                async for chunk in stream:
                    text, last = text + chunk.text, chunk
                body = (chat_body if is_chat else completion_body)(response_id, self._model_name, text, last)
                return web.json_response(body, headers=headers)
            response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache"})
            await response.prepare(request)
            await self._stream(response, response_id, call, is_chat, first, stream)
            return response

    async def _stream(self, response: web.StreamResponse, response_id: str, call: GenerateCall, is_chat: bool,
                      first, stream) -> None:
        model, created = self._model_name, int(time.time())

        def event(text: str | None, reason: str | None) -> dict:
            if not is_chat:
                return completion_chunk(response_id, model, created, text or "", reason)
            return chat_chunk(response_id, model, created, {} if text is None else {"content": text}, reason)

        if is_chat:  # OpenAI's first chat chunk names the role
            await _send(response, chat_chunk(response_id, model, created, {"role": "assistant", "content": ""}, None))
        chunk = first
        try:
            while True:
                if chunk.text:
                    await _send(response, event(chunk.text, None))
                if chunk.is_last:
                    await _send(response, event(None, chunk.finish_reason))
                    if call.include_usage:
                        object_name = "chat.completion.chunk" if is_chat else "text_completion"
                        await _send(response, usage_chunk(response_id, model, created, object_name, chunk.usage))
                    break
                chunk = await anext(stream)
        except PdclusterError as error:  # the status line is gone: the error travels as one last event
            await _send(response, GatewayError.from_grpc(error.code, error.message).body())
        except StopAsyncIteration:
            await _send(response, GatewayError(500, "the router ended the stream without a final message",
                                               type="server_error").body())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()


async def _send(response: web.StreamResponse, payload: dict) -> None:
    await response.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GatewayError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    return body


@web.middleware
async def _errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except GatewayError as error:
        return web.json_response(error.body(), status=error.status)
    except PdclusterError as error:
        gateway_error = GatewayError.from_grpc(error.code, error.message)
        return web.json_response(gateway_error.body(), status=gateway_error.status)
    except web.HTTPRequestEntityTooLarge:
        return web.json_response(GatewayError(413, "the request body is too large").body(), status=413)
    except web.HTTPException as error:  # unknown path, wrong method
        if error.status < 400:
            raise
        body = GatewayError(error.status, f"{request.method} {request.path}: {error.reason}",
                            type="invalid_request_error" if error.status < 500 else "server_error").body()
        return web.json_response(body, status=error.status)
    except Exception as error:
        log.exception("gateway: %s %s failed", request.method, request.path)
        return web.json_response(GatewayError(500, f"{type(error).__name__}: {error}", type="server_error").body(),
                                 status=500)
