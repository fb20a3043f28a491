"""Router security over a real socket: bearer tokens with roles, TLS and mutual TLS, per-client stream limits."""

from __future__ import annotations

import subprocess

import grpc
import pytest

from orchestrator.apply import AdminServicer
from orchestrator.client import Client, PdclusterError
from orchestrator.config import ConfigError, parse_config
from orchestrator.fake_backend import FakeBackend
from orchestrator.security import (StreamLimitInterceptor, TLSFiles, TokenAuthInterceptor, TokensFileError,
                                   load_tokens, router_security, server_credentials)
from protos import admin_pb2_grpc
from router_harness import RunningRouter

ADMIN = "admin-token-0123456789abcdef"
CLIENT = "client-token-0123456789abcdef"


@pytest.fixture()
def tokens_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# roles\nadmin {ADMIN}\nclient {CLIENT}  # an application\n")
    return path


def _add_admin(backend):
    return lambda server: admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(backend), server)


def test_tokens_and_roles(tokens_file):
    backend = FakeBackend()
    interceptor = TokenAuthInterceptor(load_tokens(tokens_file))
    with RunningRouter(backend, interceptors=[interceptor], extra_services=[_add_admin(backend)]) as router:
        with Client(router.address) as anonymous:
            with pytest.raises(PdclusterError) as err:
                list(anonymous.generate("hi", max_tokens=2))
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in err.value.message
            assert anonymous.health()  # probes stay open for load balancers
        with Client(router.address, token="not-a-token-at-all") as stranger:
            with pytest.raises(PdclusterError) as err:
                stranger.status()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(router.address, token=CLIENT) as client:
            assert sum(len(c.token_ids) for c in client.generate("hi", max_tokens=3, ignore_eos=True)) == 3
            assert "prefill" in client.status()
            with pytest.raises(PdclusterError) as err:
                list(client.apply("model: {path: /m}\n"))
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "admin" in err.value.message
        with Client(router.address, token=ADMIN) as admin:
            # the admin call gets through authentication and reaches Apply, which rejects the bad file itself
            with pytest.raises(PdclusterError) as err:
                list(admin.apply("model: {path: /m}\ndecode: {replicas: many}\n"))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "decode.replicas" in err.value.message


def test_async_client_sends_the_token(tokens_file):
    import asyncio

    from orchestrator.client import AsyncClient

    with RunningRouter(interceptors=[TokenAuthInterceptor(load_tokens(tokens_file))]) as router:
        async def run():
            async with AsyncClient(router.address, token=CLIENT) as client:
                return [c async for c in client.generate("hey", max_tokens=2, ignore_eos=True)]

        assert sum(len(c.token_ids) for c in asyncio.run(run())) == 2


@pytest.mark.parametrize("text, words", [("", "no tokens"), ("owner abcdefghijklmnopq\n", "role"),
                                         ("admin short\n", "too short")])
def test_bad_tokens_file(tmp_path, text, words):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(TokensFileError, match=words):
        load_tokens(path)
    config = parse_config({"model": {"path": "/m"}, "router": {"auth": {"tokens_file": str(path)}}})
    with pytest.raises(ConfigError) as err:
        router_security(config.router)
    assert err.value.key == "router.auth.tokens_file"


def _self_signed(tmp_path, name: str):
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(cert), str(key)


def test_tls_and_mutual_tls(tmp_path):
    server_cert, server_key = _self_signed(tmp_path, "router")
    client_cert, client_key = _self_signed(tmp_path, "app")
    with RunningRouter(credentials=server_credentials(TLSFiles(cert=server_cert, key=server_key))) as router:
        with Client(router.address, tls_ca=server_cert) as client:
            assert len(list(client.generate("hi", max_tokens=2, ignore_eos=True))) >= 1
        with Client(router.address, timeout=3) as plaintext:  # a plaintext client cannot talk to a TLS router
            with pytest.raises(PdclusterError) as err:
                plaintext.status()
            assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    mutual = server_credentials(TLSFiles(cert=server_cert, key=server_key, client_ca=client_cert))
    with RunningRouter(credentials=mutual) as router:
        with Client(router.address, tls_ca=server_cert, tls_cert=client_cert, tls_key=client_key) as client:
            assert "decode" in client.status()
        with Client(router.address, tls_ca=server_cert, timeout=3) as no_certificate:
            with pytest.raises(PdclusterError) as err:
                no_certificate.status()
            assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_tls_config_needs_cert_and_key():
    with pytest.raises(ConfigError) as err:
        parse_config({"model": {"path": "/m"}, "router": {"tls": {"cert": "/c.pem"}}})
    assert err.value.key == "router.tls.key"


def test_streams_per_client_are_limited():
    backend = FakeBackend(token_delay_s=0.05)
    with RunningRouter(backend, interceptors=[StreamLimitInterceptor(1)]) as router:
        with Client(router.address) as client:
            first = client.generate("a", max_tokens=40, ignore_eos=True)
            next(first)  # the first stream is open
            with pytest.raises(PdclusterError) as err:
                list(client.generate("b", max_tokens=2))
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams_per_client" in err.value.message
            rest = list(first)
            assert rest[-1].finish_reason == "length"
            # the slot is free again once the first stream ended
            assert len(list(client.generate("c", max_tokens=2, ignore_eos=True))) >= 1
