"""Transport security and caller authentication: TLS / mTLS server credentials and a bearer-token
check (applied by server/calls.py) that leaves the health service open to probes."""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from server.settings import Settings

logger = logging.getLogger(__name__)

# Methods callable without a token: load balancers and kubelet probes cannot send one. Reflection
# is not among them: it lists the API, which a caller without a token has no use for.
OPEN_METHOD_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)
MISSING_TOKEN = "missing bearer token; send the metadata 'authorization: Bearer <token>'"
INVALID_TOKEN = "invalid bearer token"
# RFC 6750 b64token: what may follow "Bearer " in an authorization header.
_TOKEN_SYNTAX = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class SecurityConfigError(Exception):
    """Raised at start-up when a certificate, key or token cannot be read or is unusable; the
    server then exits 1 with this one line (it is never reported to callers)."""


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


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (None without them); with --tls-client-ca the
    server requires a client certificate signed by that CA (mTLS)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert = _read_pem(settings.tls_cert, "TLS certificate")
    key = _read_pem(settings.tls_key, "TLS key")
    client_ca = (
        None if settings.tls_client_ca is None else _read_pem(settings.tls_client_ca, "TLS client CA")
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def load_tokens(settings: Settings) -> list[bytes]:
    """The accepted bearer tokens: MNIST_AUTH_TOKEN, or one per non-blank line of
    --auth-token-file (several let clients move to a new token before the old one is dropped).
    Empty when neither is set: no token is required."""
    if settings.auth_token is not None:
        lines, source = [settings.auth_token], "MNIST_AUTH_TOKEN"
    elif settings.auth_token_file is not None:
        data = _read(settings.auth_token_file, "token file")
        try:
            lines, source = data.decode("ascii").splitlines(), f"token file {settings.auth_token_file}"
        except UnicodeDecodeError:
            raise SecurityConfigError(
                f"token file {settings.auth_token_file}: not ASCII text"
            ) from None
    else:
        return []
    tokens = [line.strip() for line in lines if line.strip()]
    if not tokens:
        raise SecurityConfigError(f"{source}: holds no token")
    for number, token in enumerate(tokens, 1):
        if not _TOKEN_SYNTAX.fullmatch(token):
            # Never echo the token itself.
            raise SecurityConfigError(
                f"{source}: token {number} is not a bearer token (letters, digits and -._~+/ only; "
                "e.g. `openssl rand -hex 32`)"
            )
    return [token.encode("ascii") for token in tokens]


class TokenAuth:
    """Lets a call through only with ``authorization: Bearer <token>`` naming an accepted token
    (compared in constant time); server/calls.py answers others UNAUTHENTICATED before the method
    runs. Methods under ``open_prefixes`` (health) need no token."""

    def __init__(self, tokens: Sequence[bytes], open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES) -> None:
        if not tokens:
            raise ValueError("TokenAuth needs at least one token")
        self._tokens = list(tokens)
        self._open = tuple(open_prefixes)

    def is_open(self, method: str) -> bool:
        return method.startswith(self._open)

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """None if the metadata carries an accepted token, else the UNAUTHENTICATED message."""
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
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
    """What App needs: credentials for add_secure_port (None: plaintext) and the token check
    (None: calls need no token)."""

    credentials: grpc.ServerCredentials | None = None
    auth: TokenAuth | None = None
    description: str = "plaintext"

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerSecurity:
        """Reads the certificate, key and token files; SecurityConfigError names a bad one."""
        credentials = server_credentials(settings)
        tokens = load_tokens(settings)
        parts = [
            "plaintext" if credentials is None
            else "mTLS (client certificates required)" if settings.tls_client_ca is not None
            else "TLS"
        ]
        if tokens:
            parts.append(f"bearer token ({len(tokens)} accepted; health open)")
        return cls(
            credentials=credentials,
            auth=TokenAuth(tokens) if tokens else None,
            description=", ".join(parts),
        )
