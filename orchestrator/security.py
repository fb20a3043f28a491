"""Router security: bearer-token authentication with two roles, and TLS (optionally mutual) from cluster.yaml.

Roles: `client` tokens may call Generation (Generate, Status); `admin` tokens may call everything, including
Admin (Apply). The standard health service stays open so load balancers can probe it. With no tokens file
configured, authentication is off (the router listens on 127.0.0.1 by default for that reason).

Tokens file format (one token per line, `#` comments): `<role> <token>`, e.g.
    admin  3f1c...   # operators
    client 9a2b...   # applications
Tokens are compared in constant time; they are never logged.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("pdcluster.security")

ROLES = ("client", "admin")
_OPEN_SERVICES = ("/grpc.health.v1.Health/",)
_ADMIN_SERVICES = ("/pdcluster.v1.Admin/",)


class TokensFileError(ValueError):
    pass


def load_tokens(path: str | Path) -> dict[str, str]:
    """token -> role. Raises TokensFileError naming the line for a malformed file."""
    tokens: dict[str, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise TokensFileError(f"cannot read tokens file {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ROLES:
            raise TokensFileError(f"{path}:{number}: expected '<role> <token>' with role one of {ROLES}")
        role, token = parts
        if len(token) < 16:
            raise TokensFileError(f"{path}:{number}: token is too short (at least 16 characters)")
        tokens[token] = role
    if not tokens:
        raise TokensFileError(f"{path}: no tokens")
    return tokens


def _role_of(tokens: dict[str, str], presented: str) -> str | None:
    found = None
    for token, role in tokens.items():  # every entry is compared, so timing does not reveal which one matched
        if hmac.compare_digest(token.encode(), presented.encode()):
            found = role
    return found


def _denying_handler(handler, code: grpc.StatusCode, message: str):
    async def deny_unary(request, context):
        await context.abort(code, message)

    async def deny_stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises; this makes the function an async generator

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny_unary, **kwargs)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: dict[str, str]):
        self._tokens = dict(tokens)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(_OPEN_SERVICES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        header = metadata.get("authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            return _denying_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                    "missing bearer token: pass `authorization: Bearer <token>` (SDK: token=...)")
        role = _role_of(self._tokens, header[7:].strip())
        if role is None:
            log.warning("refused a call to %s with an unknown token", method)
            return _denying_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        if method.startswith(_ADMIN_SERVICES) and role != "admin":
            return _denying_handler(handler, grpc.StatusCode.PERMISSION_DENIED,
                                    f"{method} needs an admin token; this token has the {role} role")
        return handler


@dataclass(frozen=True, kw_only=True)
class TLSFiles:
    cert: str
    key: str
    client_ca: str | None = None  # set: clients must present a certificate signed by this CA (mutual TLS)


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise TokensFileError(f"cannot read router.tls.{what} {path}: {exc.strerror}") from None

    client_ca = read(tls.client_ca, "client_ca") if tls.client_ca else None
    return grpc.ssl_server_credentials([(read(tls.key, "key"), read(tls.cert, "cert"))],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


def _client_host(peer: str) -> str:
    # "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555" -> the host part: streams are counted per client machine
    body = peer.split(":", 1)[1] if ":" in peer else peer
    return body.rsplit(":", 1)[0] if body.count(":") >= 1 else body


class StreamLimitInterceptor(grpc.aio.ServerInterceptor):
    """At most `max_streams` concurrent server-streaming calls (Generate) per client host: one client cannot take
    the whole router's admission budget."""

    def __init__(self, max_streams: int):
        self._max_streams = max_streams
        self._open: dict[str, int] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_stream is None:
            return handler
        inner = handler.unary_stream
        limit, open_streams = self._max_streams, self._open

        async def limited(request, context):
            host = _client_host(context.peer())
            if open_streams.get(host, 0) >= limit:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"client {host} already has {limit} streams open (router.max_streams_per_client)")
            open_streams[host] = open_streams.get(host, 0) + 1
            try:
                result = inner(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:  # a handler that writes with context.write() and returns a coroutine
                    await result
            finally:
                open_streams[host] -= 1
                if not open_streams[host]:
                    del open_streams[host]

        return grpc.unary_stream_rpc_method_handler(limited, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)


def router_security(router_section) -> tuple[list, grpc.ServerCredentials | None]:
    """(interceptors, server credentials or None) for a RouterSection; file problems raise ConfigError."""
    from orchestrator.config import ConfigError

    interceptors = []
    if router_section.tokens_file:
        try:
            interceptors.append(TokenAuthInterceptor(load_tokens(router_section.tokens_file)))
        except TokensFileError as exc:
            raise ConfigError("router.auth.tokens_file", str(exc)) from None
    if router_section.max_streams_per_client:
        interceptors.append(StreamLimitInterceptor(router_section.max_streams_per_client))
    credentials = None
    if router_section.tls_cert:
        try:
            credentials = server_credentials(TLSFiles(cert=router_section.tls_cert, key=router_section.tls_key,
                                                      client_ca=router_section.tls_client_ca))
        except TokensFileError as exc:
            raise ConfigError("router.tls", str(exc)) from None
    return interceptors, credentials
