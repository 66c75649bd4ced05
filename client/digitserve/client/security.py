"""Client-side security: TLS / mTLS channel credentials and the bearer token sent on every call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from digitserve.client.errors import DigitServeError


class ClientSecurityError(DigitServeError):
    """Raised when a CA, certificate, key or token file cannot be read or is unusable."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ClientSecurityError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None


def read_token(path: Path) -> str:
    """The first non-blank line of a token file, stripped (the file may end in a newline)."""
    try:
        text = _read(path, "token file").decode("ascii")
    except UnicodeDecodeError:
        raise ClientSecurityError(f"token file {path}: not ASCII text") from None
    token = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not token:
        raise ClientSecurityError(f"token file {path}: holds no token")
    return token


def tls_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials: the server's certificate is checked against ``ca`` (the system
    roots when None); ``cert`` and ``key`` present a client certificate (mTLS)."""
    if (cert is None) != (key is None):
        raise ClientSecurityError("a client certificate needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else _read(ca, "TLS CA"),
        private_key=None if key is None else _read(key, "TLS key"),
        certificate_chain=None if cert is None else _read(cert, "TLS certificate"),
    )


def secure_channel(target: str, options: list[tuple[str, Any]],
                   credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel to ``target``: TLS when ``credentials`` are given, else plaintext."""
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries a bearer token (none without one): DigitClient sends it
    with every call, over TLS or plaintext (loopback, or a mesh sidecar that adds TLS); gRPC's
    own ``access_token_call_credentials`` would send it over TLS only."""
    return () if token is None else (("authorization", f"Bearer {token}"),)
