"""Transport security and caller authentication: TLS / mTLS server credentials and a bearer-token
check that leaves the health service open to probes."""

from __future__ import annotations

import contextlib
import datetime
import hmac
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from digitserve.server.settings import Settings

logger = logging.getLogger(__name__)

# Methods callable without a token: load balancers and kubelet probes cannot send one. Reflection
# is not among them: it lists the API, which a caller without a token has no use for.
OPEN_METHOD_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)
MISSING_TOKEN = "missing bearer token; send the metadata 'authorization: Bearer <token>'"
INVALID_TOKEN = "invalid bearer token"
# RFC 6750 b64token: what may follow "Bearer " in an authorization header.
_TOKEN_SYNTAX = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class SecurityConfigError(Exception):
    """A certificate, key or token that cannot be read or used, at start-up: the server exits 1
    with this one line (never reported to callers)."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None


def _read_pem(path: Path, what: str) -> bytes:
    data = _read(path, what)
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"{what} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


# Addresses that mean "every interface": no certificate name can cover them, none is checked.
_ANY_HOST = frozenset({"", "0.0.0.0", "::", "*"})


@dataclass(frozen=True)
class Certificate:
    """The served chain's first expiry and the names the server's own certificate covers."""

    not_after: datetime.datetime
    names: tuple[str, ...]

    @property
    def expires(self) -> float:  # Unix time
        return self.not_after.timestamp()


def _utc(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_certificate(settings: Settings, cert_pem: bytes, key_pem: bytes,
                      now: datetime.datetime | None = None) -> Certificate:
    """Refuses (SecurityConfigError) a chain that does not parse or holds a certificate not valid
    now, or a key not the certificate's; warns when the chain expires within
    --tls-expiry-warning-days or its names do not cover --host."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = settings.tls_cert, settings.tls_key
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise SecurityConfigError(f"TLS certificate {cert_path}: not a readable PEM certificate chain"
                                  ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # encrypted; never say more about a key
        raise SecurityConfigError(
            f"TLS key {key_path}: encrypted; grpc needs an unencrypted key (e.g. `openssl pkey "
            "-in KEY -out PLAIN`), readable only by the server") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SecurityConfigError(f"TLS key {key_path}: not a readable PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise SecurityConfigError(
            f"TLS key {key_path} is not the key of TLS certificate {cert_path} (their public keys "
            "differ); give the key the certificate was issued for")
    now = now or datetime.datetime.now(datetime.UTC)
    for position, cert in enumerate(chain):
        which = f"TLS certificate {cert_path}" + ("" if position == 0 else (
            f" (certificate {position + 1} of the chain, {cert.subject.rfc4514_string()})"))
        if now < cert.not_valid_before_utc:
            raise SecurityConfigError(
                f"{which}: not valid before {_utc(cert.not_valid_before_utc)} (now {_utc(now)}); "
                "check the clock, or use a certificate valid now")
        if now > cert.not_valid_after_utc:
            raise SecurityConfigError(
                f"{which}: expired at {_utc(cert.not_valid_after_utc)} (now {_utc(now)}); renew it")
    not_after = min(cert.not_valid_after_utc for cert in chain)
    days_left = (not_after - now).total_seconds() / 86400
    if days_left < settings.tls_expiry_warning_days:
        logger.warning("TLS certificate %s expires at %s, in %.1f days (--tls-expiry-warning-days %g); "
                       "renew it", cert_path, _utc(not_after), days_left, settings.tls_expiry_warning_days)
    names = _names(chain[0])
    host = settings.host.strip("[]")
    if host not in _ANY_HOST and not _covers(names, host):
        logger.warning("TLS certificate %s is for %s, not --host %s: clients that connect to %s will "
                       "refuse it", cert_path, ", ".join(names) or "no name", host, host)
    return Certificate(not_after, names)


def _names(cert: Any) -> tuple[str, ...]:
    """A certificate's subject alternative names (DNS, IP); its common name without them (as grpc)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return (*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)))


def _covers(names: Sequence[str], host: str) -> bool:
    """Whether a certificate for ``names`` is valid for ``host`` (RFC 6125: an IP address only by
    an equal address, a DNS name exactly or by a wildcard for its whole first label)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        host = host.lower().rstrip(".")
        parent = host.split(".", 1)[1] if "." in host else None
        return any(name == host or (name.startswith("*.") and parent == name[2:])
                   for name in (n.lower().rstrip(".") for n in names))
    for name in names:
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(name) == address:
                return True
    return False


def server_credentials(settings: Settings, now: datetime.datetime | None = None
                       ) -> tuple[grpc.ServerCredentials, Certificate] | None:
    """TLS credentials from --tls-cert/--tls-key (None without them) and check_certificate's
    findings; with --tls-client-ca, client certificates signed by that CA are required (mTLS)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert = _read_pem(settings.tls_cert, "TLS certificate")
    key = _read_pem(settings.tls_key, "TLS key")
    client_ca = None if settings.tls_client_ca is None else _read_pem(settings.tls_client_ca, "TLS client CA")
    certificate = check_certificate(settings, cert, key, now)
    credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                              require_client_auth=client_ca is not None)
    return credentials, certificate


def load_tokens(settings: Settings) -> list[bytes]:
    """The accepted bearer tokens: MNIST_AUTH_TOKEN, or one per non-blank line of --auth-token-file
    (several let clients move to a new one); empty when neither is set (no token required)."""
    if settings.auth_token is not None:
        lines, source = [settings.auth_token], "MNIST_AUTH_TOKEN"
    elif settings.auth_token_file is not None:
        data = _read(settings.auth_token_file, "token file")
        try:
            lines, source = data.decode("ascii").splitlines(), f"token file {settings.auth_token_file}"
        except UnicodeDecodeError:
            raise SecurityConfigError(f"token file {settings.auth_token_file}: not ASCII text") from None
    else:
        return []
    if not (tokens := [line.strip() for line in lines if line.strip()]):
        raise SecurityConfigError(f"{source}: holds no token")
    for number, token in enumerate(tokens, 1):
        if not _TOKEN_SYNTAX.fullmatch(token):
            raise SecurityConfigError(  # never echo the token itself
                f"{source}: token {number} is not a bearer token (letters, digits and -._~+/ only; "
                "e.g. `openssl rand -hex 32`)")
    return [token.encode("ascii") for token in tokens]


class TokenAuth:
    """Lets a call through only with ``authorization: Bearer <token>`` naming an accepted token
    (compared in constant time); methods under ``open_prefixes`` (health) need none."""

    def __init__(self, tokens: Sequence[bytes], open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES) -> None:
        if not tokens:
            raise ValueError("TokenAuth needs at least one token")
        self._tokens = list(tokens)
        self._open = tuple(open_prefixes)

    def is_open(self, method: str) -> bool:
        return method.startswith(self._open)

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """None if the metadata carries an accepted token, else the UNAUTHENTICATED message."""
        if not (values := [v for k, v in metadata or () if k == "authorization"]):
            return MISSING_TOKEN
        value = values[0]
        raw = value.encode("utf-8", "replace") if isinstance(value, str) else value
        scheme, _, credential = raw.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not credential.strip():
            return MISSING_TOKEN
        credential = credential.strip()
        matched = False
        for token in self._tokens:  # every token compared: the time does not tell which matched
            matched |= hmac.compare_digest(credential, token)
        return None if matched else INVALID_TOKEN


@dataclass(frozen=True)
class ServerSecurity:
    """Credentials for add_secure_port (None: plaintext) and the token check (None: no token)."""

    credentials: grpc.ServerCredentials | None = None
    auth: TokenAuth | None = None
    description: str = "plaintext"
    certificate: Certificate | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerSecurity:
        """Reads the certificate, key and token files; SecurityConfigError names a bad one."""
        tls = server_credentials(settings)
        credentials, certificate = (None, None) if tls is None else tls
        tokens = load_tokens(settings)
        parts = ["plaintext" if credentials is None else "mTLS (client certificates required)"
                 if settings.tls_client_ca is not None else "TLS"]
        if tokens:
            parts.append(f"bearer token ({len(tokens)} accepted; health open)")
        return cls(credentials=credentials, auth=TokenAuth(tokens) if tokens else None,
                   description=", ".join(parts), certificate=certificate)
