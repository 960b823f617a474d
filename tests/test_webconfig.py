"""--web.config.file: exporter-toolkit's own test files, TLS and basic auth on real sockets.

The files under tests/fixtures/webconfig/ are exporter-toolkit's (its README names the
commit); each keeps the outcome exporter-toolkit's tests assert, except where this file
says why Python's ssl module cannot do the same.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import bcrypt
import httpx
import pytest
import trustme
from aiohttp import web

from exporter.config import parse_config
from exporter.errors import ConfigError
from exporter.server import Exporter, start_runner
from exporter.webconfig import WebConfigFile, basic_credentials, load_web_config
from llamacpp_server import free_port
from tests.helpers import parse, provider_yaml
from tests.standins import StandIn, ollama_routes

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = ROOT / "tests" / "fixtures" / "webconfig"
EXAMPLE = ROOT / "examples" / "web-config.yml"
NO_HOST = "host:\n  enabled: false\n"
AUTH_HEADER_SECRET = "sk-client-own-key-7731"


# Serving and asking


async def hello(request: web.Request) -> web.Response:
    """exporter-toolkit's test handler."""
    return web.Response(text="Hello World!")


@asynccontextmanager
async def serving(web_config: WebConfigFile) -> AsyncIterator[int]:
    """A small app behind the web configuration on a free 127.0.0.1 port; the port."""
    app = web.Application()
    app.router.add_get("/", hello)
    web_config.install(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=web_config.ssl_context).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def client_context(
    # exporter-toolkit's CAs allow "any extended key usage" only, which OpenSSL refuses for
    # a server's chain (Go does not): trust its server certificate itself instead.
    ca: Path | trustme.CA | None = UPSTREAM / "server.crt",
    *,
    cert: tuple[Path, Path] | trustme.LeafCert | None = None,
    ciphers: str | None = None,
    curve: str | None = None,
    version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A TLS client trusting ca (a file or a trustme CA), optionally with a certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if isinstance(ca, trustme.CA):
        ca.configure_trust(context)
    elif ca is not None:
        context.load_verify_locations(cafile=str(ca))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if isinstance(cert, trustme.LeafCert):
        cert.configure_cert(context)
    elif cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if curve is not None:
        context.set_ecdh_curve(curve)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


async def ask(
    port: int,
    context: ssl.SSLContext | None = None,
    path: str = "/",
    *,
    auth: tuple[str, str] | None = None,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """One request on a new connection (https when a context is given)."""
    scheme = "https" if context is not None else "http"
    async with httpx.AsyncClient(verify=context or False, timeout=30) as http:
        return await http.request(
            method, f"{scheme}://127.0.0.1:{port}{path}", auth=auth, headers=headers
        )


async def refused(
    port: int,
    context: ssl.SSLContext | None = None,
    path: str = "/",
    *,
    auth: tuple[str, str] | None = None,
) -> str:
    """The error of a request that must fail (a handshake refused, a plain request to TLS)."""
    with pytest.raises(httpx.TransportError) as caught:
        await ask(port, context, path, auth=auth)
    causes: list[str] = []
    error: BaseException | None = caught.value
    while error is not None and len(causes) < 10:  # httpx's, httpcore's, then ssl's own
        causes.append(repr(error))
        error = error.__cause__ or error.__context__
    return " <- ".join(causes)


def server_refusal(web_config: WebConfigFile, client: ssl.SSLContext) -> str:
    """Why the server refuses a handshake with this client ("" if it does not), from an
    in-memory handshake through the server's own context.

    asyncio closes a connection whose handshake failed without sending OpenSSL's alert, so
    a client on a socket sees only the connection end; the server's reason is checked here.
    """
    server_context = web_config.ssl_context
    assert server_context is not None
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_server, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(to_server, from_server, server_side=True)
    peer = client.wrap_bio(to_client, from_client, server_hostname="127.0.0.1")
    for _ in range(20):
        with contextlib.suppress(ssl.SSLWantReadError):
            peer.do_handshake()
        to_server.write(from_client.read())
        try:
            server.do_handshake()
            with contextlib.suppress(ssl.SSLWantReadError):
                server.read()  # TLS 1.3 verifies the client's certificate after its Finished
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            return str(exc.reason)
        to_client.write(from_server.read())
    return ""


def hashed(password: str, cost: int = 4) -> str:
    """A bcrypt hash (cost 4: tests need no slow hashes)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


def write(path: Path, text: str) -> Path:
    """Replace a file as an operator's tools do: a new file renamed over the old one."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def write_cert(folder: Path, cert: trustme.LeafCert, name: str = "server") -> None:
    """A leaf's chain and key as name.crt and name.key in folder, each replaced whole."""
    write(folder / f"{name}.crt", "".join(pem.bytes().decode() for pem in cert.cert_chain_pems))
    write(folder / f"{name}.key", cert.private_key_pem.bytes().decode())


@pytest.fixture
def ca() -> trustme.CA:
    """A fresh CA for the test."""
    return trustme.CA()


# exporter-toolkit's test files: which are refused, and why

UPSTREAM_REFUSED = [
    # (file, the key path and reason it is refused with): TestYAMLFiles in tls_config_test.go
    ("web_config_junk.yml", ":1: expected a mapping, got a single value"),
    ("web_config_junk_key.yml", ':2: tls_server_config.cert_filse: unknown key (did you mean "cert_file"?)'),
    ("web_config_noAuth_certPath_empty.bad.yml", ":2: tls_server_config.cert_file: missing"),
    ("web_config_noAuth_cert_empty.bad.yml", ":2: tls_server_config.cert_file: missing"),
    ("web_config_noAuth_keyPath_empty.bad.yml", ":3: tls_server_config.key_file: missing"),
    ("web_config_noAuth_key_empty.bad.yml", ":2: tls_server_config.key_file: missing"),
    ("web_config_noAuth_certPath_keyPath_empty.bad.yml", ":2: tls_server_config.cert_file: missing"),
    ("web_config_noAuth_certPath_invalid.bad.yml", ":2: tls_server_config.cert_file: "),
    ("web_config_noAuth_keyPath_invalid.bad.yml", ":2: tls_server_config.cert_file: "),
    ("web_config_noAuth_certPath_keyPath_invalid.bad.yml", ":2: tls_server_config.cert_file: "),
    ("web_config_noAuth.bad.yml", ":4: tls_server_config.client_ca_file: a client CA is set, but client_auth_type is NoClientCert"),
    ("web_config_auth_clientCAs_invalid.bad.yml", ":4: tls_server_config.client_ca_file: a client CA is set"),
    ("web_config_auth_user_list_invalid.bad.yml", ":5: basic_auth_users.john: not a bcrypt hash"),
    ("web_config_noAuth_inventedCiphers.bad.yml", ':6: tls_server_config.cipher_suites[0]: unknown cipher suite "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA2048"'),
    ("web_config_noAuth_inventedCurves.bad.yml", ':6: tls_server_config.curve_preferences[0]: unknown curve "CurveP257"'),
    ("web_config_noAuth_wrongTLSVersion.bad.yml", ':5: tls_server_config.min_version: unknown TLS version "TLS111"'),
    # TestServerBehaviour's bad header files
    ("web_config_headers_content_type_options.bad.yml", ':3: http_server_config.headers.X-Content-Type-Options: expected one of nosniff, got "sniff"'),
    ("web_config_headers_frame_options.bad.yml", ':3: http_server_config.headers.X-Frame-Options: expected one of deny, sameorigin, got "foo"'),
    ("web_config_headers_extra_header.bad.yml", ":3: http_server_config.headers.Content-Type: this header cannot be set"),
]  # fmt: skip

# Files exporter-toolkit accepts and this refuses: what Python's ssl module cannot honour.
UPSTREAM_DIFFERENCES = [
    ("web_config_noAuth_allCurves.good.yml", ":6: tls_server_config.curve_preferences: Python's ssl module sets one curve only"),
    ("tls_config_noAuth.requireanyclientcert.good.yml", ":4: tls_server_config.client_auth_type: RequireAnyClientCert is not supported"),
    ("web_config_auth_client_san.good.yaml", ":6: tls_server_config.client_allowed_sans: not supported"),
    ("web_config_rate_limiter_one_second.yaml", ":1: rate_limit: not supported by llm-exporter"),
]  # fmt: skip

UPSTREAM_ACCEPTED = [
    "web_config_empty.yml",
    "web_config_noAuth.good.yml",
    "web_config_noAuth.good.blocking.yml",
    "web_config_noAuth_tlsInline.good.yml",
    "web_config_noAuth_allCiphers.good.yml",
    "web_config_noAuth_someCiphers.good.yml",
    "web_config_noAuth_someCiphers_noOrder.good.yml",
    "web_config_noAuth_someCurves.good.yml",
    "web_config_noAuth_noHTTP2.good.yml",
    # Refused by Go only because HTTP/2 needs an AES-128-GCM suite; aiohttp never speaks
    # HTTP/2, so the file is valid here.
    "web_config_noAuth_noHTTP2Cipher.bad.yml",
    "web_config_headers.good.yml",
    "tls_config_noAuth.requireandverifyclientcert.good.yml",
    "web_config_users.good.yml",
    "web_config_users_noTLS.good.yml",
]


@pytest.mark.parametrize(
    ("name", "error"),
    UPSTREAM_REFUSED + UPSTREAM_DIFFERENCES,
    ids=[name for name, _ in UPSTREAM_REFUSED + UPSTREAM_DIFFERENCES],
)
def test_exporter_toolkits_bad_files_are_refused_with_the_key_path(name: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_web_config(UPSTREAM / name)
    assert f"config error: {UPSTREAM / name}{error}" in str(caught.value)


@pytest.mark.parametrize("name", UPSTREAM_ACCEPTED)
def test_exporter_toolkits_good_files_are_accepted(name: str) -> None:
    load_web_config(UPSTREAM / name)


def test_a_missing_file_is_refused_with_its_name() -> None:
    with pytest.raises(ConfigError) as caught:
        load_web_config(UPSTREAM / "somefile")
    assert str(caught.value) == (
        f"config error: {UPSTREAM / 'somefile'}: cannot read the file: No such file or directory"
    )


# exporter-toolkit's TestServerBehaviour and TestUsers, on real sockets


async def test_tls_is_served_and_a_plain_request_gets_no_answer() -> None:
    async with serving(WebConfigFile(UPSTREAM / "web_config_noAuth.good.yml")) as port:
        good = await ask(port, client_context())
        plain = await refused(port)
    assert (good.status_code, good.text) == (200, "Hello World!")
    assert "Error" in plain


async def test_an_inline_certificate_and_key_are_served() -> None:
    async with serving(WebConfigFile(UPSTREAM / "web_config_noAuth_tlsInline.good.yml")) as port:
        response = await ask(port, client_context())
    assert response.text == "Hello World!"


async def test_a_tls_1_1_client_is_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = client_context(ciphers="DEFAULT@SECLEVEL=0", version=ssl.TLSVersion.TLSv1_1)
    web_config = WebConfigFile(UPSTREAM / "web_config_noAuth.good.yml")
    async with serving(web_config) as port:
        await refused(port, old)
    assert server_refusal(web_config, old) == "UNSUPPORTED_PROTOCOL"


async def test_cipher_suites_are_the_servers_choice_in_its_order() -> None:
    some = WebConfigFile(UPSTREAM / "web_config_noAuth_someCiphers.good.yml")
    any_order = WebConfigFile(UPSTREAM / "web_config_noAuth_someCiphers_noOrder.good.yml")
    both = "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384"
    unshared = client_context(ciphers="ECDHE-RSA-AES256-SHA")
    async with serving(some) as port:
        one = await ask(port, client_context(ciphers="ECDHE-RSA-AES128-GCM-SHA256"))
        await refused(port, unshared)
        chosen = await cipher_of(port, client_context(ciphers=both))
    async with serving(any_order) as port:
        clients_choice = await cipher_of(port, client_context(ciphers=both))
    assert one.status_code == 200
    assert server_refusal(some, unshared) == "NO_SHARED_CIPHER"
    assert chosen == "ECDHE-RSA-AES128-GCM-SHA256"  # the first of the server's list
    # prefer_server_cipher_suites: false; the server lists AES-256 first, the client AES-128
    assert clients_choice == "ECDHE-RSA-AES128-GCM-SHA256"


async def cipher_of(port: int, context: ssl.SSLContext) -> str:
    """The cipher suite a TLS 1.2 handshake agrees on."""
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    cipher = writer.get_extra_info("cipher")[0]
    writer.close()
    return str(cipher)


async def test_one_curve_is_the_only_one_offered() -> None:
    web_config = WebConfigFile(UPSTREAM / "web_config_noAuth_someCurves.good.yml")  # TLS 1.3, P-521
    other = client_context(curve="secp384r1")
    async with serving(web_config) as port:
        same = await ask(port, client_context(curve="secp521r1"))
        await refused(port, other)
    assert same.status_code == 200
    assert server_refusal(web_config, other) == "NO_SUITABLE_KEY_SHARE"


async def test_http2_off_and_the_allowed_headers_are_served() -> None:
    async with serving(WebConfigFile(UPSTREAM / "web_config_noAuth_noHTTP2.good.yml")) as port:
        tls12 = await ask(port, client_context())
    async with serving(WebConfigFile(UPSTREAM / "web_config_headers.good.yml")) as port:
        page = await ask(port)
        missing = await ask(port, path="/nowhere")
    assert tls12.status_code == 200
    for response in (page, missing):
        assert response.headers["X-Frame-Options"] == "deny"
        assert response.headers["X-XSS-Protection"] == "1"
        assert (
            response.headers["Content-Security-Policy"] == "default-src 'self' *.test.example.net"
        )
        assert (
            response.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
        )
    assert missing.status_code == 404


async def test_client_certificates_are_required_and_verified(ca: trustme.CA) -> None:
    """RequireAndVerifyClientCert with the self-signed client of exporter-toolkit's tests:
    no certificate and one from another CA fail the handshake, as in Go."""
    own = (UPSTREAM / "client_selfsigned.pem", UPSTREAM / "client_selfsigned.key")
    stranger = ca.issue_cert("client@example.com")
    web_config = WebConfigFile(UPSTREAM / "tls_config_noAuth.requireandverifyclientcert.good.yml")
    async with serving(web_config) as port:
        accepted = await ask(port, client_context(cert=own))
        await refused(port, client_context())
        await refused(port, client_context(cert=stranger))
    assert accepted.text == "Hello World!"
    assert server_refusal(web_config, client_context()) == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert server_refusal(web_config, client_context(cert=stranger)) == "CERTIFICATE_VERIFY_FAILED"


async def test_a_client_certificate_if_given_is_verified(tmp_path: Path, ca: trustme.CA) -> None:
    clients = trustme.CA()
    write_cert(tmp_path, ca.issue_cert("127.0.0.1"))
    clients.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    file = write(
        tmp_path / "web.yml",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: clients.pem\n",
    )
    web_config = WebConfigFile(file)
    stranger = client_context(ca, cert=trustme.CA().issue_cert("x"))
    async with serving(web_config) as port:
        anonymous = await ask(port, client_context(ca))
        known = await ask(port, client_context(ca, cert=clients.issue_cert("prometheus")))
        await refused(port, stranger)
    assert anonymous.status_code == known.status_code == 200
    assert server_refusal(web_config, stranger) == "CERTIFICATE_VERIFY_FAILED"


async def test_a_new_connection_reads_the_file_again(tmp_path: Path) -> None:
    """exporter-toolkit's TestConfigReloading: a file that requires client certificates
    is replaced by one that does not, and the next connection is accepted."""
    for name in ("server.crt", "server.key"):
        shutil.copy(UPSTREAM / name, tmp_path / name)
    blocking = (UPSTREAM / "web_config_noAuth.good.blocking.yml").read_text()
    file = write(tmp_path / "web.yml", blocking)
    web_config = WebConfigFile(file)
    async with serving(web_config) as port:
        await refused(port, client_context())
        before = server_refusal(web_config, client_context())
        write(file, (UPSTREAM / "web_config_noAuth.good.yml").read_text())
        after = await ask(port, client_context())
    assert before == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert after.text == "Hello World!"


@pytest.mark.parametrize("name", ["web_config_users_noTLS.good.yml", "web_config_users.good.yml"])
async def test_basic_auth_users(name: str) -> None:
    """exporter-toolkit's TestUsers (and its fake-password test): 401 with a Basic
    challenge unless the name and password match."""
    web_config = WebConfigFile(UPSTREAM / name)
    context = client_context() if web_config.ssl_context is not None else None
    async with serving(web_config) as port:
        answers = {
            who: await ask(port, context, auth=auth)
            for who, auth in {
                "none": None,
                "dave": ("dave", "dave123"),
                "carol": ("carol", "carol123"),
                "bad password": ("dave", "bad"),
                "unknown user": ("nonexistent", "nonexistent"),
                "fake password": ("nonexistent", "fakepassword"),
            }.items()
        }
    assert {who: r.status_code for who, r in answers.items()} == {
        "none": 401,
        "dave": 200,
        "carol": 200,
        "bad password": 401,
        "unknown user": 401,
        "fake password": 401,
    }
    refusal = answers["bad password"]
    assert refusal.headers["WWW-Authenticate"] == "Basic"
    assert refusal.text == "Unauthorized\n"
    assert answers["dave"].text == "Hello World!"


# The exporter's own endpoints, rotation, the bcrypt cache


def users_file(folder: Path, users: dict[str, str], tls: bool = False, extra: str = "") -> Path:
    """A web configuration with these users (name: password), and TLS from server.crt/key."""
    lines = ["basic_auth_users:"] + [f"  {name}: {hashed(pw)}" for name, pw in users.items()]
    if tls:
        lines += ["tls_server_config:", "  cert_file: server.crt", "  key_file: server.key"]
    return write(folder / "web.yml", "\n".join(lines) + "\n" + extra)


@asynccontextmanager
async def exporter_serving(
    web_config: WebConfigFile,
    config_text: str = "providers: []\n",
    *,
    config_path: Path | None = None,
    enable_lifecycle: bool = False,
) -> AsyncIterator[tuple[Exporter, int]]:
    """The whole exporter as `llm-exporter` runs it, behind the web configuration."""
    exporter = Exporter(
        parse_config(config_text),
        config_path,
        enable_lifecycle=enable_lifecycle,
        web_config=web_config,
    )
    runner = await start_runner(exporter)
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=web_config.ssl_context).start()
        yield exporter, runner.addresses[0][1]
    finally:
        await runner.cleanup()
        await exporter.aclose()


ENDPOINTS = [
    ("GET", "/"),
    ("GET", "/metrics"),
    ("GET", "/health"),
    ("GET", "/models"),
    ("GET", "/-/healthy"),
    ("GET", "/-/ready"),
    ("POST", "/-/reload"),
    ("GET", "/no-such-page"),
]


async def test_every_endpoint_of_the_exporter_asks_for_credentials(
    tmp_path: Path, ca: trustme.CA
) -> None:
    write_cert(tmp_path, ca.issue_cert("127.0.0.1"))
    extra = "http_server_config:\n  headers:\n    X-Frame-Options: sameorigin\n"
    web_config = WebConfigFile(users_file(tmp_path, {"prometheus": "s3cret"}, True, extra))
    context = client_context(ca)
    async with exporter_serving(web_config) as (_, port):
        without = [await ask(port, context, path, method=m) for m, path in ENDPOINTS]
        wrong = [
            await ask(port, context, p, method=m, auth=("prometheus", "x")) for m, p in ENDPOINTS
        ]
        right = [
            await ask(port, context, p, method=m, auth=("prometheus", "s3cret"))
            for m, p in ENDPOINTS
        ]
    assert [r.status_code for r in without] == [401] * len(ENDPOINTS)
    assert [r.status_code for r in wrong] == [401] * len(ENDPOINTS)
    # /-/reload answers only with --web.enable-lifecycle; an unknown page is 404.
    assert [r.status_code for r in right] == [200] * 6 + [403, 404]
    for response in (*without, *right):
        assert response.headers["X-Frame-Options"] == "sameorigin"
    assert all(r.headers["WWW-Authenticate"] == "Basic" for r in without)


async def test_rotated_certificates_and_passwords_apply_without_a_restart(
    tmp_path: Path, ca: trustme.CA
) -> None:
    write_cert(tmp_path, ca.issue_cert("127.0.0.1"))
    file = users_file(tmp_path, {"prometheus": "first"}, tls=True)
    async with serving(WebConfigFile(file)) as port:
        before = await ask(port, client_context(ca), auth=("prometheus", "first"))
        renewed = trustme.CA()
        write_cert(tmp_path, renewed.issue_cert("127.0.0.1"))  # the key and certificate files
        old_ca = await refused(port, client_context(ca), auth=("prometheus", "first"))
        new_ca = await ask(port, client_context(renewed), auth=("prometheus", "first"))
        users_file(tmp_path, {"prometheus": "second"}, tls=True)  # the password
        old_password = await ask(port, client_context(renewed), auth=("prometheus", "first"))
        new_password = await ask(port, client_context(renewed), auth=("prometheus", "second"))
    assert before.status_code == 200
    assert "CERTIFICATE_VERIFY_FAILED" in old_ca, old_ca  # the client's own verification
    assert new_ca.status_code == 200
    assert old_password.status_code == 401
    assert new_password.status_code == 200


async def test_a_flood_of_one_credential_costs_one_bcrypt(tmp_path: Path) -> None:
    calls: list[bytes] = []

    def counting(password: bytes, hashed_password: bytes) -> bool:
        calls.append(hashed_password)
        return bcrypt.checkpw(password, hashed_password)

    web_config = WebConfigFile(users_file(tmp_path, {"prometheus": "s3cret"}), checkpw=counting)
    async with serving(web_config) as port:

        async def flood(user: str, password: str) -> list[int]:
            answers = await asyncio.gather(*(ask(port, auth=(user, password)) for _ in range(40)))
            return [answer.status_code for answer in answers]

        good = await flood("prometheus", "s3cret")
        after_good = len(calls)
        wrong = await flood("prometheus", "guess")
        after_wrong = len(calls)
        unknown = await flood("mallory", "guess")
    assert good == [200] * 40 and wrong == [401] * 40 and unknown == [401] * 40
    assert (after_good, after_wrong, len(calls)) == (1, 2, 3)
    assert calls[2].startswith(b"$2y$10$QOauhQ")  # an unknown user costs a bcrypt too


def test_basic_credentials_are_read_as_go_reads_them() -> None:
    def header(raw: bytes) -> str:
        return "Basic " + base64.b64encode(raw).decode()

    assert basic_credentials(header(b"alice:pa:ss")) == (b"alice", b"pa:ss")
    assert basic_credentials("bAsIc " + base64.b64encode(b"a:b").decode()) == (b"a", b"b")
    assert basic_credentials(header(b":")) == (b"", b"")
    for bad in (None, "", "Bearer x", header(b"no-colon"), "Basic !!!", "Basic YTpi=", "Basic"):
        assert basic_credentials(bad) is None, bad
    assert basic_credentials("Basic " + "A" * 5000) is None


# Invalid files: the exact error, never a secret


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  verify: true\n",
         ':4: tls_server_config.verify: unknown key (known keys: cert, cert_file, cipher_suites, client_allowed_sans, client_auth_type, client_ca, client_ca_file, curve_preferences, key, key_file, max_version, min_version, prefer_server_cipher_suites)'),
        ("basic_auth_user:\n  a: b\n",
         ':1: basic_auth_user: unknown key (did you mean "basic_auth_users"?)'),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerify\n",
         ':4: tls_server_config.client_auth_type: unknown client_auth_type "RequireAndVerify", expected one of NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert'),
        ("tls_server_config:\n  cert_file: server.crt\n",
         ":2: tls_server_config.key_file: missing: TLS needs cert_file (or cert) and key_file (or key)"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.crt\n",
         ":3: tls_server_config.key_file: cannot use the key: PEM lib"),
        ("tls_server_config:\n  cert_file: server.key\n  key_file: server.key\n",
         ":2: tls_server_config.cert_file: no PEM certificate found (-----BEGIN CERTIFICATE-----)"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: other.key\n",
         ":3: tls_server_config.key_file: cannot use the key: the key does not match the certificate"),
        ("tls_server_config:\n  cert_file: .\n  key_file: server.key\n",
         ":2: tls_server_config.cert_file: FOLDER: not a regular file (a pipe, device or directory is refused)"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS10\n",
         ":4: tls_server_config.min_version: TLS10 is refused: OpenSSL 3 speaks TLS 1.0 and 1.1 only at security level 0"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS13\n  max_version: TLS12\n",
         ":5: tls_server_config.max_version: is below min_version"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
         ":4: tls_server_config.cipher_suites: lists no TLS 1.2 cipher suite, yet TLS 1.2 is allowed"),
        ("tls_server_config:\n  cert_file: server.crt\n  cert: inline\n  key_file: server.key\n",
         ":3: tls_server_config.cert: set cert_file or cert, not both"),
        ("basic_auth_users:\n  alice: $2y$10$tooShort\n",
         ":2: basic_auth_users.alice: not a bcrypt hash"),
        ("basic_auth_users:\n  alice: $2y$99$" + "a" * 53 + "\n",
         ":2: basic_auth_users.alice: not a bcrypt hash: its cost must be from 04 to 31"),
        ("basic_auth_users:\n  alice: 12345\n",
         ":2: basic_auth_users.alice: expected a string: put the value in quotes"),
        ("basic_auth_users:\n  a:b: " + "$2y$10$" + "a" * 53 + "\n",
         ':2: basic_auth_users.a:b: a user name cannot contain ":"'),
        ("basic_auth_users: [alice]\n", ":1: basic_auth_users: expected a mapping, got a list"),
        ("http_server_config:\n  http2: maybe\n", ':2: http_server_config.http2: expected true or false, got "maybe"'),
        ("tls_server_config: {cert_file: a, cert_file: b}\n", ":1: tls_server_config.cert_file: duplicate key"),
        ("[unclosed\n", ":2: invalid YAML"),
    ],
    ids=["unknown key", "misspelt section", "bad client_auth_type", "cert without key",
         "key not a key", "cert not a cert", "key of another cert", "cert a folder",
         "TLS 1.0", "versions crossed", "no TLS 1.2 suite", "inline and file",
         "short hash", "hash cost", "number as hash", "colon in name", "users a list",
         "http2 not a bool", "duplicate key", "bad YAML"],
)  # fmt: skip
def test_invalid_files_give_the_exact_error(
    text: str, error: str, tmp_path: Path, ca: trustme.CA
) -> None:
    write_cert(tmp_path, ca.issue_cert("127.0.0.1"))
    write_cert(tmp_path, ca.issue_cert("127.0.0.1"), "other")
    file = write(tmp_path / "web.yml", text)
    with pytest.raises(ConfigError) as caught:
        load_web_config(file)
    assert str(caught.value).startswith(
        f"config error: {file}{error.replace('FOLDER', str(tmp_path))}"
    ), str(caught.value)


def test_no_secret_is_ever_repeated(tmp_path: Path) -> None:
    key = "-----BEGIN PRIVATE KEY-----\nMIIsecretmaterial\n-----END PRIVATE KEY-----\n"
    almost = "$2y$10$" + "Z" * 52  # one character short of a hash
    for text in (
        f"basic_auth_users:\n  alice: '{almost}'\n",
        f"basic_auth_users: '{almost}'\n",
        "tls_server_config:\n  cert_file: nowhere.crt\n  key: |\n    "
        + key.replace("\n", "\n    "),
        key,  # a key file given as the web configuration
    ):
        file = write(tmp_path / "web.yml", text)
        with pytest.raises(ConfigError) as caught:
            load_web_config(file)
        assert "Z" * 10 not in str(caught.value) and "secretmaterial" not in str(caught.value)


def test_an_unreadable_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_web_config(tmp_path)
    assert str(caught.value) == (
        f"config error: {tmp_path}: not a regular file (a pipe, device or directory is refused)"
    )


async def test_a_file_that_turns_invalid_keeps_the_last_valid_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = users_file(tmp_path, {"prometheus": "s3cret"})
    web_config = WebConfigFile(file)
    async with serving(web_config) as port:
        write(file, "basic_auth_users:\n  prometheus: not-a-hash\n")
        with caplog.at_level(logging.ERROR, logger="exporter.webconfig"):
            kept = [await ask(port, auth=("prometheus", "s3cret")) for _ in range(3)]
        users_file(tmp_path, {"prometheus": "fixed"})
        fixed = await ask(port, auth=("prometheus", "fixed"))
    assert [r.status_code for r in kept] == [200, 200, 200]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # once per change, not once per request
    assert "basic_auth_users.prometheus: not a bcrypt hash" in str(errors[0].__dict__)
    assert "not-a-hash" not in str(errors[0].__dict__)
    assert fixed.status_code == 200


async def test_a_reload_refuses_a_bad_web_config_and_keeps_the_running_one(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """SIGHUP and POST /-/reload go through Exporter.reload: a bad web configuration refuses
    the whole reload, with its key path, and the running one stays."""
    config = tmp_path / "llm-exporter.yml"
    config.write_text("providers: []\n")
    file = users_file(tmp_path, {"prometheus": "s3cret"})
    web_config = WebConfigFile(file)
    async with exporter_serving(web_config, config_path=config, enable_lifecycle=True) as (
        exporter,
        port,
    ):
        auth = ("prometheus", "s3cret")
        write(file, file.read_text().replace("basic_auth_users", "basic_auth_user"))
        answer = await ask(port, path="/-/reload", method="POST", auth=auth)
        with pytest.raises(ConfigError) as caught:
            await exporter.reload()
        still = await ask(port, path="/metrics", auth=auth)
        write_cert(tmp_path, ca.issue_cert("127.0.0.1"))
        write(file, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
        with pytest.raises(ConfigError) as turned_on:
            await exporter.reload()
    assert answer.status_code == 500
    assert (
        f'config error: {file}:1: basic_auth_user: unknown key (did you mean "basic_auth_users"?)'
        in answer.text
    )
    assert "basic_auth_user: unknown key" in str(caught.value)
    assert exporter.reload_state.successful is False
    assert still.status_code == 200
    assert "tls_server_config: TLS cannot be turned on while running" in str(turned_on.value)


async def test_the_gateway_serves_tls_and_passes_the_clients_authorization(
    tmp_path: Path, ca: trustme.CA
) -> None:
    seen: list[str | None] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"object": "list", "data": []})

    write_cert(tmp_path, ca.issue_cert("127.0.0.1"))
    web_config = WebConfigFile(users_file(tmp_path, {"prometheus": "s3cret"}, tls=True))
    async with StandIn(ollama_routes(**{"/v1/models": record})) as provider:
        gateway = "{listen: '127.0.0.1:0'}"
        config = (
            "providers:\n"
            + provider_yaml("p", "ollama", provider.url, gateway=gateway)
            + "\n"
            + NO_HOST
        )
        async with exporter_serving(web_config, config) as (exporter, port):
            gateway_port = int(exporter.gateway.addresses["p"].rsplit(":", 1)[1])
            bearer = {"Authorization": f"Bearer {AUTH_HEADER_SECRET}"}
            through = await ask(gateway_port, client_context(ca), "/v1/models", headers=bearer)
            basic = {"Authorization": "Basic " + base64.b64encode(b"provider:own").decode()}
            through_basic = await ask(gateway_port, client_context(ca), "/v1/models", headers=basic)
            plain = await refused(gateway_port, path="/v1/models")
            exporter_itself = await ask(port, client_context(ca), "/metrics", headers=bearer)
    assert through.status_code == through_basic.status_code == 200
    assert seen == [f"Bearer {AUTH_HEADER_SECRET}", basic["Authorization"]]
    assert "Error" in plain
    assert exporter_itself.status_code == 401


# The example file, the docs, and the command


@contextmanager
def example_folder(tmp_path: Path, text: str | None = None) -> Iterator[Path]:
    """examples/web-config.yml (or text) in a folder with the certificate files it names."""
    text = text if text is not None else EXAMPLE.read_text()
    leaf = trustme.CA().issue_cert("127.0.0.1")
    for name in re.findall(r"^\s*(?:cert|key)_file:\s*(\S+)", text, re.MULTILINE):
        pem = leaf.private_key_pem if name.endswith(".key") else leaf.cert_chain_pems[0]
        pem.write_to_path(str(tmp_path / name))
    yield write(tmp_path / "web-config.yml", text)


def test_the_example_passes_promtool_and_loads(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed: `make system-deps` installs it")
    with example_folder(tmp_path) as file:
        checked = subprocess.run(
            ["promtool", "check", "web-config", str(file)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        config = load_web_config(file)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout + checked.stderr
    assert config.tls is not None and set(config.users) == {"prometheus"}
    assert bcrypt.checkpw(b"change-me", config.users["prometheus"].encode())


def test_the_docs_web_configuration_blocks_load(tmp_path: Path) -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    section = docs.split("## Web configuration (`--web.config.file`)", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```ya?ml\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert blocks
    for block in blocks:
        with example_folder(tmp_path, block) as file:
            load_web_config(file)
    assert "| `--web.config.file` |" in docs


@pytest.mark.parametrize("section", ["tls_server_config", "http_server_config", ""])
def test_the_docs_name_every_key_the_parser_knows(section: str, tmp_path: Path) -> None:
    text = f"{section}:\n  bogus: 1\n" if section else "bogus: 1\n"
    with pytest.raises(ConfigError) as caught:
        load_web_config(write(tmp_path / "web.yml", text))
    known = re.findall(r"\w+", str(caught.value).split("known keys:", 1)[1])
    docs = (ROOT / "docs" / "configuration.md").read_text()
    documented = docs.split("## Web configuration (`--web.config.file`)", 1)[1]
    documented = documented.split("\n## ", 1)[0]
    for key in known:
        prefix = rf"(?:{section})?\.?" if section else ""
        assert re.search(rf"`{prefix}{key}[`.]", documented), key


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """llm-exporter with these flags, to its end."""
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_a_bad_web_config_refuses_to_start_and_a_good_one_checks(tmp_path: Path) -> None:
    config = tmp_path / "llm-exporter.yml"
    config.write_text("providers: []\n")
    bad = write(tmp_path / "web.yml", "tls_server_config:\n  cert_file: server.crt\n")
    started = run("--config.file", str(config), "--web.config.file", str(bad))
    with example_folder(tmp_path) as good:
        checked = run(
            "--config.file", str(config), "--web.config.file", str(good), "--config.check"
        )
    assert started.returncode == 2
    assert started.stderr.strip() == (
        f"config error: {bad}:2: tls_server_config.key_file: missing:"
        " TLS needs cert_file (or cert) and key_file (or key)"
    )
    assert checked.returncode == 0, checked.stderr
    assert f"{good}: valid web configuration" in checked.stdout


def test_the_command_serves_tls_with_auth_and_sighup_refuses_a_bad_file(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """And /-/reload stays off without --web.enable-lifecycle while SIGHUP reloads."""
    write_cert(tmp_path, ca.issue_cert("127.0.0.1"))
    web_file = users_file(tmp_path, {"prometheus": "s3cret"}, tls=True)
    config = tmp_path / "llm-exporter.yml"
    config.write_text("providers: []\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", "--config.file", str(config),
         "--web.listen-address", f"127.0.0.1:{port}", "--web.config.file", str(web_file)],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    auth = ("prometheus", "s3cret")
    context = client_context(ca)
    try:
        with httpx.Client(verify=context, timeout=10) as http:
            for _ in range(200):
                try:
                    if http.get(f"{url}/-/healthy", auth=auth).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            without = http.get(f"{url}/-/healthy")
            reload_api = http.post(f"{url}/-/reload", auth=auth)
            write(web_file, web_file.read_text() + "rate_limit: {interval: 1s, burst: 5}\n")
            process.send_signal(signal.SIGHUP)
            for _ in range(400):  # until the refused reload shows
                kept = http.get(f"{url}/metrics", auth=auth)
                if parse(kept.text).value("llm_exporter_config_last_reload_successful") == 0:
                    break
                time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(10)
    assert process.stderr is not None
    log = process.stderr.read()
    assert without.status_code == 401
    assert reload_api.status_code == 403
    assert kept.status_code == 200
    assert parse(kept.text).value("llm_exporter_config_last_reload_successful") == 0
    assert status == 0
    assert "tls=true" in log
    assert "configuration reload failed" in log
    assert f"{web_file}:" in log and "rate_limit: not supported by llm-exporter" in log
    assert "s3cret" not in log and "$2b$" not in log
    assert "Traceback" not in log
