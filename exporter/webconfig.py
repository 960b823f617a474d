"""--web.config.file: TLS and basic authentication in the exporter-toolkit format.

The file is the one Prometheus, node_exporter and every exporter-toolkit server read
(https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md):

    tls_server_config: {cert_file, key_file, client_auth_type, client_ca_file, ...}
    http_server_config: {http2, headers: {X-Frame-Options: deny, ...}}
    basic_auth_users: {alice: $2y$10$...}

As exporter-toolkit does, the file is read again when it changes: basic auth and headers
on each request, TLS on each new connection (certificate, key and client CA files too).
A file that turns invalid is not used: the last valid one keeps serving, and the error
is logged once. What Python's ssl module cannot do is refused with the key path, never
silently ignored (docs/configuration.md lists each difference).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import bcrypt
import yaml
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .config import (
    MAX_CA_FILE_BYTES,
    MAX_CONFIG_BYTES,
    MAX_KEY_FILE_BYTES,
    _bool,
    _construct,
    _describe,
    _fail,
    _Reader,
    _Unscalar,
    compose_document,
    raise_found,
    read_bounded,
)
from .errors import ConfigError
from .logs import fields

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_WEB_CONFIG_BYTES = MAX_CONFIG_BYTES
MAX_USERS = 1000  # every request compares the name with each user's
MAX_LIST_ITEMS = 64
# Distinct (user, hash, password) outcomes remembered; exporter-toolkit keeps 100.
CREDENTIAL_CACHE_SIZE = 256
# bcrypt reads at most 72 bytes of a password (Go's compare ignores the rest too).
BCRYPT_MAX_PASSWORD = 72
# Longer Authorization headers are refused unread (aiohttp caps a header at 8 KiB anyway).
MAX_AUTHORIZATION = 4096
# exporter-toolkit's hash of "fakepassword": an unknown user costs one bcrypt too, so the
# time of an answer does not tell which user names exist.
FAKE_HASH = b"$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"

NO_CLIENT_CERT = "NoClientCert"
VERIFY_IF_GIVEN = "VerifyClientCertIfGiven"
REQUIRE_AND_VERIFY = "RequireAndVerifyClientCert"
_CLIENT_AUTH = {
    "": ssl.CERT_NONE,
    NO_CLIENT_CERT: ssl.CERT_NONE,
    VERIFY_IF_GIVEN: ssl.CERT_OPTIONAL,
    REQUIRE_AND_VERIFY: ssl.CERT_REQUIRED,
}
# Go's crypto/tls modes that ask for a certificate without verifying it: Python's ssl
# module verifies every certificate it asks for, so it cannot do what they say.
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_OLD_VERSIONS = ("TLS10", "TLS11")
# Go's tls.CipherSuites() names for TLS 1.0-1.2, as OpenSSL names them.
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
}
# TLS 1.3 suites: Go accepts their names and ignores them (TLS 1.3 suites are not
# configurable there); so does this.
TLS13_CIPHER_SUITES = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
)
CURVES = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}
# exporter-toolkit lets only these response headers be set, some to fixed values.
HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
# Keys of newer exporter-toolkit versions that this exporter does not do, and why.
_UNSUPPORTED_ROOT = {
    "rate_limit": "not supported by llm-exporter (--web.max-connections bounds the load instead)",
}
_UNSUPPORTED_TLS = {
    "client_allowed_sans": "not supported: Python's ssl module cannot check a client"
    " certificate's names during the handshake; give client_ca_file a CA that signs only"
    " the allowed clients",
}
_BCRYPT_RE = re.compile(r"^\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}$")  # the ones pyca bcrypt reads


@dataclass(frozen=True)
class TLSServerConfig:
    """tls_server_config: the certificate to serve and how clients are verified."""

    cert_file: Path | None = None
    key_file: Path | None = None
    cert: str | None = None  # inline PEM, instead of cert_file
    key: str | None = field(default=None, repr=False)  # inline PEM, instead of key_file
    client_auth_type: str = NO_CLIENT_CERT
    client_ca_file: Path | None = None
    client_ca: str | None = None  # inline PEM, instead of client_ca_file
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        """The files the TLS context is built from."""
        paths = (self.cert_file, self.key_file, self.client_ca_file)
        return tuple(path for path in paths if path is not None)


@dataclass(frozen=True)
class HTTPServerConfig:
    """http_server_config: HTTP/2 (never served here) and extra response headers."""

    http2: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WebConfig:
    """A whole --web.config.file."""

    tls: TLSServerConfig | None = None
    http: HTTPServerConfig = HTTPServerConfig()
    users: Mapping[str, str] = field(default_factory=dict, repr=False)  # name: bcrypt hash


def load_web_config(path: str | Path) -> WebConfig:
    """Read and check a web configuration file, its certificates and keys included."""
    return _read(Path(path)).config


# Reading and checking the file


def _text(value: Any, path: str, node: yaml.Node) -> str:
    # No ${ENV} expansion, unlike the main configuration: exporter-toolkit has none, and a
    # file that promtool checks must mean the same here.
    if isinstance(value, _Unscalar) or not isinstance(value, str):
        raise _fail(path, node, f"expected a string, got {_describe(value)}")
    return value


def _secret_text(value: Any, path: str, node: yaml.Node) -> str:
    if isinstance(value, _Unscalar):
        raise _fail(path, node, f"expected a string, got {_describe(value)}")
    if not isinstance(value, str):  # never repeat a secret
        raise _fail(path, node, "expected a string: put the value in quotes")
    return value


def _bcrypt_hash(value: Any, path: str, node: yaml.Node) -> str:
    text = _secret_text(value, path, node)
    match = _BCRYPT_RE.match(text)
    if match is None:
        reason = 'not a bcrypt hash: expected $2y$, the cost, $ and 53 characters, as `htpasswd -nBC 10 ""` prints'
        raise _fail(path, node, reason)
    if not 4 <= int(match.group(1)) <= 31:
        raise _fail(path, node, "not a bcrypt hash: its cost must be from 04 to 31")
    return text


def _names(
    reader: _Reader, key: str, known: Mapping[str, str] | tuple[str, ...], what: str
) -> tuple[str, ...]:
    """A list of names from a fixed set."""
    names: list[str] = []
    for index, (node, path) in enumerate(reader.sequence(key)):
        if index >= MAX_LIST_ITEMS:
            reader.errors.append(_fail(path, node, f"more than {MAX_LIST_ITEMS} items"))
            break
        if not isinstance(node, yaml.ScalarNode):
            reader.errors.append(_fail(path, node, f"expected a string, got {_describe(node)}"))
            continue
        name = _construct(node, path)
        if not isinstance(name, str) or name not in known:
            expected = ", ".join(known)
            reader.errors.append(
                _fail(path, node, f"unknown {what} {_describe(name)}, expected one of {expected}")
            )
            continue
        names.append(name)
    return tuple(names)


def _refuse_unsupported(reader: _Reader, unsupported: Mapping[str, str]) -> None:
    for key, reason in unsupported.items():
        if reader.node(key) is not None:
            reader.errors.append(reader.error(reader._sub(key), reason, reader.items[key][0]))


def _kind(node: yaml.Node) -> str:
    # Never the value: a key or a hash given where a mapping belongs must not be echoed.
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "a mapping" if isinstance(node, yaml.MappingNode) else "a single value"


def _mapping(reader: _Reader, key: str) -> _Reader | None:
    """The sub-mapping at key, or None if unset; a ConfigError, without its value, if it is
    something else."""
    node = reader.node(key)
    if node is None:
        return None
    if not isinstance(node, yaml.MappingNode):
        raise reader.error(reader._sub(key), f"expected a mapping, got {_kind(node)}", node)
    return _Reader(node, reader._sub(key), reader.file, reader.errors)


def _section(reader: _Reader, key: str, parse: Callable[[_Reader | None], T], default: T) -> T:
    """A sub-mapping parsed by parse; the default, with the error kept, if it is bad."""
    try:
        return parse(_mapping(reader, key))
    except ConfigError as exc:
        reader.errors.append(exc)
        return default


def _parse_tls(
    reader: _Reader | None, directory: Path, lines: dict[str, int]
) -> TLSServerConfig | None:
    if reader is None:
        return None
    lines.update({key: value.start_mark.line + 1 for key, (_, value) in reader.items.items()})
    _refuse_unsupported(reader, _UNSUPPORTED_TLS)

    def file(key: str) -> Path | None:
        text = reader.scalar(key, _text, "")
        return directory / text if text else None  # relative to the file's folder, as Go does

    ciphers = (*CIPHER_SUITES, *TLS13_CIPHER_SUITES)
    client_auth_type = reader.scalar("client_auth_type", _text, "")
    tls = TLSServerConfig(
        cert_file=file("cert_file"),
        key_file=file("key_file"),
        cert=reader.scalar("cert", _text, "") or None,
        key=reader.scalar("key", _secret_text, "", secret=True) or None,
        client_auth_type=client_auth_type or NO_CLIENT_CERT,
        client_ca_file=file("client_ca_file"),
        client_ca=reader.scalar("client_ca", _text, "") or None,
        min_version=reader.scalar("min_version", _text, "TLS12"),
        max_version=reader.scalar("max_version", _text, "TLS13"),
        cipher_suites=_names(reader, "cipher_suites", ciphers, "cipher suite"),
        prefer_server_cipher_suites=reader.scalar("prefer_server_cipher_suites", _bool, True),
        curve_preferences=_names(reader, "curve_preferences", tuple(CURVES), "curve"),
    )
    reader.finish()
    # As exporter-toolkit's IsEnabled: any of these set turns TLS on; none, and it is off.
    enabled = tls.cert_file or tls.cert or tls.key_file or tls.key or tls.client_ca_file
    if not (enabled or tls.client_ca or client_auth_type):
        _check_versions(tls, reader)
        return None
    _check_tls(tls, reader)
    return tls


def _check_versions(tls: TLSServerConfig, reader: _Reader) -> None:
    for key in ("min_version", "max_version"):
        version = getattr(tls, key)
        if version in _OLD_VERSIONS:
            reason = f"{version} is refused: OpenSSL 3 speaks TLS 1.0 and 1.1 only at security level 0 (RFC 8996 deprecates them)"
            reader.errors.append(reader.error(reader._sub(key), reason, reader.items[key][1]))
        elif version not in _VERSIONS:
            reason = f"unknown TLS version {_describe(version)}, expected TLS12 or TLS13"
            reader.errors.append(reader.error(reader._sub(key), reason, reader.items[key][1]))


def _check_tls(tls: TLSServerConfig, reader: _Reader) -> None:
    """The checks that need no file read; each problem is kept with its key path."""

    def fail(key: str, reason: str) -> None:
        entry = reader.items.get(key)
        reader.errors.append(
            reader.error(f"{reader.path}.{key}", reason, entry[1] if entry else None)
        )

    for inline, file in (
        ("cert", "cert_file"),
        ("key", "key_file"),
        ("client_ca", "client_ca_file"),
    ):
        if getattr(tls, inline) is not None and getattr(tls, file) is not None:
            fail(inline, f"set {file} or {inline}, not both")
    if tls.client_auth_type in _UNVERIFIED_CLIENT_AUTH:
        reason = (
            f"{tls.client_auth_type} is not supported: Python's ssl module verifies every client"
            f" certificate it asks for; use {VERIFY_IF_GIVEN} or {REQUIRE_AND_VERIFY}"
            " with client_ca_file"
        )
        fail("client_auth_type", reason)
    elif tls.client_auth_type not in _CLIENT_AUTH:
        known = ", ".join((NO_CLIENT_CERT, VERIFY_IF_GIVEN, REQUIRE_AND_VERIFY))
        fail(
            "client_auth_type",
            f"unknown client_auth_type {_describe(tls.client_auth_type)}, expected one of {known}",
        )
    elif tls.client_auth_type == NO_CLIENT_CERT and (tls.client_ca_file or tls.client_ca):
        key = "client_ca_file" if tls.client_ca_file else "client_ca"
        fail(
            key,
            f"a client CA is set, but client_auth_type is {NO_CLIENT_CERT}: set it to {REQUIRE_AND_VERIFY}",
        )
    _check_versions(tls, reader)
    if tls.min_version == "TLS13" and tls.max_version == "TLS12":
        fail("max_version", "is below min_version: no TLS version is left")
    tls12 = [name for name in tls.cipher_suites if name in CIPHER_SUITES]
    if tls.cipher_suites and not tls12 and tls.min_version != "TLS13":
        fail(
            "cipher_suites",
            "lists no TLS 1.2 cipher suite, yet TLS 1.2 is allowed: list one, or set min_version: TLS13",
        )
    if len(tls.curve_preferences) > 1:
        fail(
            "curve_preferences",
            "Python's ssl module sets one curve only: list one (the others cannot be offered)",
        )
    if not (tls.cert_file or tls.cert):
        fail("cert_file", "missing: TLS needs cert_file (or cert) and key_file (or key)")
    if not (tls.key_file or tls.key):
        fail("key_file", "missing: TLS needs cert_file (or cert) and key_file (or key)")


def _header_value(value: Any, path: str, node: yaml.Node) -> str:
    if isinstance(value, _Unscalar):
        raise _fail(path, node, f"expected a string, got {_describe(value)}")
    text = node.value  # as written: Go's YAML reads `X-XSS-Protection: 1` as the string "1"
    if not text.replace("\t", " ").isprintable():
        raise _fail(
            path, node, "a header value must not contain line breaks or other control characters"
        )
    return str(text)


def _parse_http(reader: _Reader | None) -> HTTPServerConfig:
    if reader is None:
        return HTTPServerConfig()
    http2 = reader.scalar("http2", _bool, True)
    headers: dict[str, str] = {}
    section = _mapping(reader, "headers")
    if section is not None:
        for name, (key_node, _) in section.items.items():
            path = f"{section.path}.{name}"
            if name not in HEADERS:  # exact names, as exporter-toolkit compares them
                allowed = ", ".join(HEADERS)
                section.errors.append(
                    section.error(path, f"this header cannot be set; allowed: {allowed}", key_node)
                )
                section.used.add(name)
                continue
            value = section.scalar(name, _header_value, "")
            allowed_values = HEADERS[name]
            if allowed_values and value not in allowed_values:
                reason = f"expected one of {', '.join(allowed_values)}, got {_describe(value)}"
                section.errors.append(section.error(path, reason, section.items[name][1]))
            elif value:  # blank: not sent
                headers[name] = value
    reader.finish()
    return HTTPServerConfig(http2=http2, headers=headers)


def _parse_users(reader: _Reader | None) -> dict[str, str]:
    if reader is None:
        return {}
    if len(reader.items) > MAX_USERS:
        raise reader.error(
            reader.path, f"more than {MAX_USERS} users: use TLS client certificates instead"
        )
    users = {}
    for name, (key_node, _) in reader.items.items():
        if ":" in name:
            reader.errors.append(
                reader.error(f"{reader.path}.{name}", 'a user name cannot contain ":"', key_node)
            )
        users[name] = reader.scalar(name, _bcrypt_hash, "", secret=True)
    return users


def parse_web_config(text: str, file: str = "", directory: Path | None = None) -> WebConfig:
    """The web configuration in text, its structure checked (no file is read); relative
    paths are taken from directory (the file's folder)."""
    return _parse(text, file, directory, {})


def _parse(text: str, file: str, directory: Path | None, lines: dict[str, int]) -> WebConfig:
    """parse_web_config, noting the line of each key of tls_server_config in lines."""
    root = compose_document(text, file)
    if root is None or root.tag == "tag:yaml.org,2002:null":
        return WebConfig()  # an empty file: plain HTTP, no authentication
    errors: list[ConfigError] = []
    config = WebConfig()
    try:
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError("", f"expected a mapping, got {_kind(root)}", line=1)
        reader = _Reader(root, "", file, errors)
        base = directory if directory is not None else Path(".")
        _refuse_unsupported(reader, _UNSUPPORTED_ROOT)
        config = WebConfig(
            tls=_section(reader, "tls_server_config", lambda r: _parse_tls(r, base, lines), None),
            http=_section(reader, "http_server_config", _parse_http, HTTPServerConfig()),
            users=_section(reader, "basic_auth_users", _parse_users, {}),
        )
        reader.finish()
    except ConfigError as exc:
        errors.append(exc)
    raise_found(errors, file)
    return config


# Building the TLS context


class _Encrypted(Exception):
    """An encrypted private key: neither this nor exporter-toolkit can ask for its password."""


def _no_password() -> bytes:
    raise _Encrypted


def _ssl_reason(exc: OSError) -> str:
    return re.sub(r"^\[[^\]]*\] | \(_ssl\.c:\d+\)$", "", str(exc.strerror or exc))


@contextlib.contextmanager
def _pem_file(text: str) -> Iterator[str]:
    """A path OpenSSL can read an inline PEM from; on Linux it never touches a disk."""
    if hasattr(os, "memfd_create"):
        descriptor = os.memfd_create("llm-exporter-pem", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(descriptor, text.encode())
            yield f"/proc/self/fd/{descriptor}"
        finally:
            os.close(descriptor)
        return
    with tempfile.TemporaryDirectory() as folder:  # private to this user (mode 0700)
        path = os.path.join(folder, "pem")
        with open(path, "w", opener=lambda p, flags: os.open(p, flags, 0o600)) as handle:
            handle.write(text)
        yield path


class _Where:
    """Turns a problem with one key of tls_server_config into a ConfigError with its line."""

    def __init__(self, lines: Mapping[str, int], file: str) -> None:
        self.lines = lines
        self.file = file

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(
            f"tls_server_config.{key}", reason, line=self.lines.get(key), file=self.file
        )


def _read_pem(path: Path, limit: int, key: str, where: _Where) -> str:
    try:
        return read_bounded(path, limit)
    except ConfigError as exc:
        raise where.error(key, f"{path}: {exc.reason}") from None


def _build_context(tls: TLSServerConfig, where: _Where) -> ssl.SSLContext:
    """A server context as tls_server_config says; a ConfigError naming the key at fault."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.maximum_version = _VERSIONS[tls.max_version]
    cert_key = "cert_file" if tls.cert_file else "cert"
    cert = (
        _read_pem(tls.cert_file, MAX_CA_FILE_BYTES, cert_key, where)
        if tls.cert_file
        else tls.cert or ""
    )
    key_key = "key_file" if tls.key_file else "key"
    key = (
        _read_pem(tls.key_file, MAX_KEY_FILE_BYTES, key_key, where)
        if tls.key_file
        else tls.key or ""
    )
    if "-----BEGIN CERTIFICATE-----" not in cert:
        raise where.error(cert_key, "no PEM certificate found (-----BEGIN CERTIFICATE-----)")
    try:  # the certificate alone first, so that a bad one is not blamed on the key
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert)
    except (OSError, ValueError) as exc:
        detail = _ssl_reason(exc) if isinstance(exc, OSError) else "not PEM"
        raise where.error(cert_key, f"cannot read the certificate: {detail}") from None
    with _pem_file(cert) as cert_path, _pem_file(key) as key_path:
        try:
            context.load_cert_chain(cert_path, key_path, password=_no_password)
        except _Encrypted:
            raise where.error(key_key, "the key is encrypted: give an unencrypted key") from None
        except OSError as exc:
            reason = _ssl_reason(exc)
            if "KEY_VALUES_MISMATCH" in str(exc) or "mismatch" in reason:
                reason = "the key does not match the certificate"
            raise where.error(key_key, f"cannot use the key: {reason}") from None
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    openssl_names = [CIPHER_SUITES[name] for name in tls.cipher_suites if name in CIPHER_SUITES]
    if openssl_names:
        try:
            context.set_ciphers(":".join(openssl_names))
        except ssl.SSLError:
            raise where.error(
                "cipher_suites", "none of these cipher suites is available in this OpenSSL"
            ) from None
        available = {cipher["name"] for cipher in context.get_ciphers()}
        missing = [
            name
            for name in tls.cipher_suites
            if name in CIPHER_SUITES and CIPHER_SUITES[name] not in available
        ]
        if missing:
            raise where.error(
                "cipher_suites", f"not available in this OpenSSL: {', '.join(missing)}"
            )
    if tls.curve_preferences:
        context.set_ecdh_curve(CURVES[tls.curve_preferences[0]])
    context.verify_mode = _CLIENT_AUTH[tls.client_auth_type]
    if tls.client_ca_file or tls.client_ca:
        ca_key = "client_ca_file" if tls.client_ca_file else "client_ca"
        if tls.client_ca_file:
            ca = _read_pem(tls.client_ca_file, MAX_CA_FILE_BYTES, ca_key, where)
        else:
            ca = tls.client_ca or ""
        try:
            context.load_verify_locations(cadata=ca)
        except (OSError, ValueError) as exc:
            detail = _ssl_reason(exc) if isinstance(exc, OSError) else "not PEM"
            raise where.error(ca_key, f"cannot load CA certificates: {detail}") from None
    elif context.verify_mode != ssl.CERT_NONE:
        # Go verifies against the system's roots when no client CA is given; so does this.
        context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    return context


# The file as the server uses it

_Stat = tuple[int, int, int, int, int] | None


def _stat(path: Path) -> _Stat:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class _Loaded:
    """One valid reading of the file: the configuration, its TLS context, and what the
    file and the files it names looked like before they were read."""

    config: WebConfig
    context: ssl.SSLContext | None
    files: tuple[Path, ...]
    signature: tuple[_Stat, ...]


def _read(path: Path) -> _Loaded:
    file = str(path)
    before = _stat(path)
    try:
        text = read_bounded(path, MAX_WEB_CONFIG_BYTES)
    except ConfigError as exc:
        exc.file = file
        raise
    lines: dict[str, int] = {}
    config = _parse(text, file, path.parent, lines)
    tls_files = config.tls.files if config.tls is not None else ()
    signature = (before, *(_stat(tls_file) for tls_file in tls_files))
    context = None
    if config.tls is not None:
        context = _build_context(config.tls, _Where(lines, file))
    return _Loaded(config, context, (path, *tls_files), signature)


Checkpw = Callable[[bytes, bytes], bool]


class WebConfigFile:
    """The --web.config.file of a running server: read again when it (or a certificate,
    key or CA file it names) changes, and the last valid reading kept when it is not valid."""

    def __init__(self, path: str | Path, *, checkpw: Checkpw = bcrypt.checkpw) -> None:
        self.path = Path(path)
        self._loaded = _read(self.path)
        self._failed: tuple[_Stat, ...] | None = None
        self._checkpw = checkpw
        self._cache: OrderedDict[tuple[bytes, bytes, bytes], bool] = OrderedDict()
        # Remembered outcomes are keyed by an HMAC of the password, not the password.
        self._cache_key = secrets.token_bytes(32)
        self._bcrypt_lock = asyncio.Lock()  # one bcrypt at a time, as exporter-toolkit does
        self._tls: _PerConnection | None = None
        if self._loaded.context is not None:
            self._tls = _PerConnection(ssl.PROTOCOL_TLS_SERVER)
            self._tls.source = self

    @property
    def config(self) -> WebConfig:
        """The configuration as the file says now (or its last valid reading)."""
        return self._fresh().config

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The context to serve with: each new connection gets the TLS settings and
        certificates of the file as it is then. None when the file configures no TLS."""
        return self._tls

    def tls_context(self) -> ssl.SSLContext:
        """The TLS context as the files say now (or their last valid reading)."""
        context = self._fresh().context
        assert context is not None
        return context

    def reload(self) -> bool:
        """Read the file again now; ConfigError (and the running one kept) if it is not
        valid. True if it changed."""
        loaded = self._check(_read(self.path))
        changed = loaded.config != self._loaded.config or loaded.signature != self._loaded.signature
        self._loaded, self._failed = loaded, None
        return changed

    def _check(self, loaded: _Loaded) -> _Loaded:
        if (loaded.context is None) != (self._tls is None):
            turned = "off" if self._tls is not None else "on"
            raise ConfigError(
                "tls_server_config",
                f"TLS cannot be turned {turned} while running: restart the exporter",
                file=str(self.path),
            )
        return loaded

    def _fresh(self) -> _Loaded:
        loaded = self._loaded
        signature = tuple(_stat(file) for file in loaded.files)
        if signature == loaded.signature or signature == self._failed:
            return loaded
        try:
            loaded = self._check(_read(self.path))
        except ConfigError as exc:
            self._failed = signature
            log.error(
                "web configuration not reloaded, keeping the running one", extra=fields(error=exc)
            )
            return self._loaded
        log.info("web configuration reloaded", extra=fields(file=str(self.path)))
        self._loaded, self._failed = loaded, None
        return loaded

    def install(self, app: web.Application) -> None:
        """Ask every request of app for basic auth (if users are set) and add the headers."""
        app.middlewares.append(self._middleware())
        app.on_response_prepare.append(self._add_headers)

    def _middleware(self) -> Middleware:
        @web.middleware
        async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
            users = self.config.users
            if users and not await self.authorized(request.headers.get("Authorization"), users):
                # As exporter-toolkit (Go's http.Error): 401, a challenge, a one-word body.
                return web.Response(
                    status=401,
                    text="Unauthorized\n",
                    headers={"WWW-Authenticate": "Basic", "X-Content-Type-Options": "nosniff"},
                )
            return await handler(request)

        return authenticate

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        for name, value in self.config.http.headers.items():
            response.headers[name] = value

    async def authorized(self, header: str | None, users: Mapping[str, str]) -> bool:
        """Whether an Authorization header holds the name and password of one of users."""
        credentials = basic_credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        hashed = None
        for name, value in users.items():  # every name compared, in constant time each
            if hmac.compare_digest(name.encode(), user):
                hashed = value.encode()
        known = hashed is not None
        hashed = hashed or FAKE_HASH
        password = password[:BCRYPT_MAX_PASSWORD]
        key = (user, hashed, hmac.new(self._cache_key, password, hashlib.sha256).digest())
        ok = self._remembered(key)
        if ok is None:
            async with self._bcrypt_lock:
                ok = self._remembered(key)  # a request for the same credential may have done it
                if ok is None:
                    ok = await asyncio.to_thread(self._bcrypt, password, hashed)
                    self._cache[key] = ok
                    while len(self._cache) > CREDENTIAL_CACHE_SIZE:
                        self._cache.popitem(last=False)
        return ok and known

    def _remembered(self, key: tuple[bytes, bytes, bytes]) -> bool | None:
        ok = self._cache.get(key)
        if ok is not None:
            self._cache.move_to_end(key)
        return ok

    def _bcrypt(self, password: bytes, hashed: bytes) -> bool:
        try:
            return bool(self._checkpw(password, hashed))
        except ValueError:  # a hash bcrypt cannot read: never a match
            return False


def basic_credentials(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) from an Authorization: Basic header, as Go's Request.BasicAuth
    reads it; None if there is none or it is malformed."""
    if header is None or len(header) > MAX_AUTHORIZATION or header[:6].lower() != "basic ":
        return None
    encoded = header[6:]
    if len(encoded) % 4:  # padded, as Go's StdEncoding wants (strict mode lets "YTpi=" by)
        return None
    try:
        decoded = binascii.a2b_base64(encoded.encode("ascii"), strict_mode=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


class _PerConnection(ssl.SSLContext):
    """A server context that hands each new connection the TLS context of the web
    configuration as it is then (asyncio wraps every accepted connection with wrap_bio).

    Swapping the context in an SNI callback would not do: OpenSSL then takes only the
    certificate from the new context, not its versions, ciphers, curves or client
    verification.
    """

    source: WebConfigFile

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return self.source.tls_context().wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
