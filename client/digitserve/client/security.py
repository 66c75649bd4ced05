"""Client-side security: TLS / mTLS channel credentials and the bearer token sent on every call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

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


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]  # grpc is untyped
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
):
    """Adds ``authorization: Bearer <token>`` to every call (the client's methods are unary, and
    Evaluate streams its requests only). gRPC's own
    ``access_token_call_credentials`` does this too but only over TLS; this interceptor is for a
    plaintext channel (loopback, or a mesh sidecar that adds TLS)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def secure_channel(
    target: str,
    options: list[tuple[str, Any]],
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
) -> grpc.Channel:
    """A channel to ``target``: TLS when ``credentials`` are given, the token on every call when
    ``token`` is (as call credentials over TLS, by the interceptor over plaintext)."""
    if credentials is not None:
        if token is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token)
            )
        return grpc.secure_channel(target, credentials, options=options)
    channel = grpc.insecure_channel(target, options=options)
    if token is not None:
        channel = grpc.intercept_channel(channel, BearerTokenInterceptor(token))
    return channel
