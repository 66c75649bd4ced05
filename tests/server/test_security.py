"""Security: TLS, mTLS and bearer tokens, each showing the wrong peer refused and the right one
served; health open to probes; message-size limits on both sides; nothing loads untrusted data
unsafely (tampered model files are refused, no unrestricted unpickling anywhere)."""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import json
import logging
import re
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from digitserve.client.cli import main as client_main
from digitserve.client.client import DigitClient, encode_images
from digitserve.client.errors import CallError
from digitserve.client.security import ClientSecurityError, read_token, tls_credentials
from digitserve.repository import MODEL_FILE, CorruptVersionError, ModelRepository
from digitserve.server.app import serve
from digitserve.server.security import (
    INVALID_TOKEN,
    MISSING_TOKEN,
    SecurityConfigError,
    ServerSecurity,
    TokenAuth,
)
from digitserve.server.settings import Settings, load_settings
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.servers import ServerProcess, ServerThread
from tests.support import REPO_ROOT, FakeModel

D = 784
TOKEN = "s3cr3t-t0ken_for.tests~1"


# --- a throwaway PKI -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Pki:
    """Two independent CAs: ``ca`` signs the server and the trusted client; ``rogue_ca`` signs a
    server and a client that nobody trusts."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_server_cert: Path
    rogue_server_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, *,
    server: bool = False, client: bool = False,
    valid: tuple[datetime.timedelta, datetime.timedelta] | None = None,
    names: tuple[str, ...] = ("localhost", "127.0.0.1"),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate valid from 5 minutes ago for a day (``valid``: from now+a to now+b); a
    server's names (``names``: DNS names and IP addresses) go into its subject alternative names."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start, end = valid or (datetime.timedelta(minutes=-5), datetime.timedelta(days=1))
    issuer_name, issuer_key = (_name(subject), key) if issuer is None else (issuer[0].subject, issuer[1])
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(issuer_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + start)
        .not_valid_after(now + end)
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
    if server:
        import ipaddress

        def general_name(name: str) -> x509.GeneralName:
            try:
                return x509.IPAddress(ipaddress.ip_address(name))
            except ValueError:
                return x509.DNSName(name)

        builder = builder.add_extension(x509.SubjectAlternativeName(
            [general_name(name) for name in names]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                        critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(directory: Path, stem: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey | None = None) -> tuple[Path, Path | None]:
    cert_path = directory / f"{stem}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return cert_path, None
    key_path = directory / f"{stem}.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    paths: dict[str, Path] = {}
    for prefix in ("", "rogue_"):
        ca = _issue(f"{prefix}test CA", None)
        paths[f"{prefix}ca"] = _write(root, f"{prefix}ca", ca[0])[0]
        for role in ("server", "client"):
            cert, key = _write(root, f"{prefix}{role}", *_issue(
                f"{prefix}{role}", ca, server=role == "server", client=role == "client"))
            assert key is not None
            paths[f"{prefix}{role}_cert"], paths[f"{prefix}{role}_key"] = cert, key
    return Pki(**paths)


# --- helpers -------------------------------------------------------------------------------------

@pytest.fixture
def start_fake(start_server: Callable[..., ServerThread]) -> Callable[..., ServerThread]:
    """Servers of the fake model, on purpose: these tests count its calls (a refused peer never
    reaches the model) and compare answers with its own, known without a model."""
    return functools.partial(start_server, FakeModel)


def images_u8(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, D), dtype=np.uint8)


def expected_probs(images: np.ndarray) -> np.ndarray:
    return FakeModel().predict(images.astype(np.float32) / np.float32(255))


def predict_code(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    """The status of one Predict (no wait_for_ready: a refused handshake is UNAVAILABLE at once)."""
    stub = pb_grpc.DigitServiceStub(channel)
    try:
        stub.Predict(pb.PredictRequest(images=encode_images(images_u8(1))), timeout=10, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def refused(call: Callable[[], object]) -> grpc.RpcError | CallError:
    """The error of a refused call: grpc's from a stub, the client's from a DigitClient."""
    with pytest.raises((grpc.RpcError, CallError)) as info:
        call()
    return info.value


def health(channel: grpc.Channel, service: str = "") -> str:
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def assert_served(client: DigitClient) -> None:
    images = images_u8(3, seed=4)
    result = client.predict(images)
    np.testing.assert_array_equal(result.probabilities, expected_probs(images))
    assert client.health() == "SERVING"


# --- TLS -----------------------------------------------------------------------------------------

def test_tls_serves_tls_clients_and_refuses_plaintext_and_untrusted_servers(
    start_fake: Callable[..., ServerThread], pki: Pki
) -> None:
    server = start_fake(tls_cert=pki.server_cert, tls_key=pki.server_key)
    with grpc.insecure_channel(server.target) as plaintext:
        assert predict_code(plaintext) == grpc.StatusCode.UNAVAILABLE
        assert refused(lambda: health(plaintext)).code() == grpc.StatusCode.UNAVAILABLE
    # A client that does not trust the server's CA refuses the server.
    with grpc.secure_channel(server.target, tls_credentials(pki.rogue_ca)) as distrustful:
        assert predict_code(distrustful) == grpc.StatusCode.UNAVAILABLE
    with DigitClient(server.target, credentials=tls_credentials(pki.ca), timeout=10) as client:
        assert_served(client)
    # The same client refuses a server whose certificate another CA signed (no man in the middle).
    rogue = start_fake(tls_cert=pki.rogue_server_cert, tls_key=pki.rogue_server_key)
    with grpc.secure_channel(rogue.target, tls_credentials(pki.ca)) as channel:
        assert predict_code(channel) == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate_from_the_client_ca(
    start_fake: Callable[..., ServerThread], pki: Pki
) -> None:
    server = start_fake(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    model = server.model
    assert isinstance(model, FakeModel)
    calls_before = len(model.calls)
    for credentials in (
        tls_credentials(pki.ca),  # no client certificate
        tls_credentials(pki.ca, pki.rogue_client_cert, pki.rogue_client_key),  # untrusted issuer
    ):
        with grpc.secure_channel(server.target, credentials) as channel:
            assert predict_code(channel) == grpc.StatusCode.UNAVAILABLE
            assert refused(lambda: health(channel)).code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(server.target) as plaintext:
        assert predict_code(plaintext) == grpc.StatusCode.UNAVAILABLE
    assert len(model.calls) == calls_before  # refused peers never reached the model
    credentials = tls_credentials(pki.ca, pki.client_cert, pki.client_key)
    with DigitClient(server.target, credentials=credentials, timeout=10) as client:
        assert_served(client)


# --- bearer token --------------------------------------------------------------------------------

def test_token_required_on_every_method_but_health(start_fake: Callable[..., ServerThread]) -> None:
    server = start_fake(auth_token=TOKEN)
    model = server.model
    assert isinstance(model, FakeModel)
    calls_before = len(model.calls)
    request = pb.PredictRequest(images=encode_images(images_u8(1)))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)
        for metadata, message in (
            ((), MISSING_TOKEN),
            ((("authorization", "Bearer wrong-token"),), INVALID_TOKEN),
            ((("authorization", f"Bearer {TOKEN}x"),), INVALID_TOKEN),
            ((("authorization", f"Bearer {TOKEN[:-1]}"),), INVALID_TOKEN),
            ((("authorization", f"Basic {TOKEN}"),), MISSING_TOKEN),
            ((("authorization", TOKEN),), MISSING_TOKEN),
            ((("authorization", "Bearer "),), MISSING_TOKEN),
            ((("x-token", TOKEN),), MISSING_TOKEN),
        ):
            for call in (
                lambda md=metadata: stub.Predict(request, timeout=10, metadata=md),
                lambda md=metadata: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=md),
                lambda md=metadata: stub.Evaluate(iter([pb.EvaluateRequest(
                    images=request.images, labels=[1])]), timeout=10, metadata=md),
            ):
                error = refused(call)
                assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)
        # Reflection needs the token too (a stream-stream method).
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        assert refused(lambda: next(reflect)).code() == grpc.StatusCode.UNAUTHENTICATED
        # Health is open: probes carry no token (Check, and the Watch stream).
        assert health(channel) == "SERVING"
        assert health(channel, "digitserve.v1.DigitService") == "SERVING"
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        assert len(model.calls) == calls_before  # refused calls never reached the model

        # The right token, by hand: every method, reflection included.
        good = (("authorization", f"Bearer {TOKEN}"),)
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=good).model_name == "fake"
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=good)
        assert "digitserve.v1.DigitService" in {
            s.name for s in next(reflect).list_services_response.service}
    # ... and by DigitClient, which adds it to every call over plaintext with an interceptor.
    with DigitClient(server.target, token=TOKEN, timeout=10) as client:
        assert_served(client)
        evaluation = client.evaluate(images_u8(5), np.arange(5))
        assert evaluation.count == 5
        assert client.model_info()["name"] == "fake"
    with DigitClient(server.target, token="not-it", timeout=10) as client:
        error = refused(lambda: client.predict(images_u8(1)))
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN)
        assert client.health() == "SERVING"


def test_token_file_over_tls_accepts_each_listed_token(
    start_fake: Callable[..., ServerThread], pki: Pki, tmp_path: Path
) -> None:
    """Several tokens (one per line) let clients move to a new token before the old one goes;
    over TLS the client sends the token as gRPC call credentials."""
    token_file = tmp_path / "tokens"
    token_file.write_text("old-token\n\n  new-token  \n")
    server = start_fake(tls_cert=pki.server_cert, tls_key=pki.server_key, auth_token_file=token_file)
    for token in ("old-token", "new-token"):
        with DigitClient(server.target, credentials=tls_credentials(pki.ca), token=token,
                         timeout=10) as client:
            assert_served(client)
    with DigitClient(server.target, credentials=tls_credentials(pki.ca), token="other-token",
                     timeout=10) as client:
        error = refused(lambda: client.predict(images_u8(1)))
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN)
    with DigitClient(server.target, credentials=tls_credentials(pki.ca), timeout=10) as client:
        error = refused(lambda: client.predict(images_u8(1)))
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)
        assert client.health() == "SERVING"


def test_token_check_compares_whole_tokens() -> None:
    interceptor = TokenAuth([b"abc", b"def"])
    assert interceptor.check([("authorization", "Bearer abc")]) is None
    assert interceptor.check([("authorization", "bearer def")]) is None  # the scheme is case-blind
    assert interceptor.check([("authorization", "Bearer abcd")]) == INVALID_TOKEN
    assert interceptor.check([("authorization", "Bearer ab")]) == INVALID_TOKEN
    assert interceptor.check([("authorization", "Bearer abc def")]) == INVALID_TOKEN
    assert interceptor.check([("authorization", "Bearer ünï")]) == INVALID_TOKEN
    assert interceptor.check([]) == MISSING_TOKEN
    assert interceptor.check(None) == MISSING_TOKEN
    with pytest.raises(ValueError):
        TokenAuth([])


# --- configuration -------------------------------------------------------------------------------

def test_security_settings_from_flags_and_environment(tmp_path: Path) -> None:
    env = {"MNIST_MODEL_REPO": str(tmp_path), "MNIST_TLS_CERT": "/c.pem", "MNIST_TLS_KEY": "/k.pem",
           "MNIST_TLS_CLIENT_CA": "/ca.pem", "MNIST_AUTH_TOKEN": TOKEN}
    settings = load_settings([], env)
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca) == (
        Path("/c.pem"), Path("/k.pem"), Path("/ca.pem"))
    assert settings.auth_token == TOKEN and settings.auth_token_file is None
    assert TOKEN not in repr(settings)  # settings may be logged; the secret never is
    from_file = load_settings(["--auth-token-file", "/run/secrets/token", "--tls-cert", "a",
                               "--tls-key", "b"], {"MNIST_MODEL_REPO": str(tmp_path)})
    assert from_file.auth_token_file == Path("/run/secrets/token") and from_file.auth_token is None
    assert from_file.tls_client_ca is None
    plain = load_settings([], {"MNIST_MODEL_REPO": str(tmp_path)})
    assert ServerSecurity.from_settings(plain) == ServerSecurity()  # defaults: plaintext, no token


@pytest.mark.parametrize(("overrides", "message"), [
    ({"tls_cert": Path("c")}, "--tls-cert and --tls-key go together"),
    ({"tls_key": Path("k")}, "--tls-cert and --tls-key go together"),
    ({"tls_client_ca": Path("ca")}, "--tls-client-ca needs --tls-cert and --tls-key"),
    ({"auth_token": "x", "auth_token_file": Path("t")},
     "set MNIST_AUTH_TOKEN or --auth-token-file, not both"),
    ({"auth_token": " "}, "MNIST_AUTH_TOKEN is set but empty"),
])
def test_bad_security_settings_are_refused(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        replace(Settings(model_repo=tmp_path), **overrides)


def test_token_is_never_a_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A flag would show the secret in `ps` and /proc/PID/cmdline; nor may ``--auth-token`` pass
    as an abbreviation of --auth-token-file (the "file name" would then be logged)."""
    with pytest.raises(SystemExit) as exit_info:
        load_settings(["--model-repo", str(tmp_path), "--auth-token", TOKEN], {})
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --auth-token" in capsys.readouterr().err


SECRET_HINT = ("; the bearer token is never a flag (it would show in `ps`): set MNIST_AUTH_TOKEN or "
               "--auth-token-file")


@pytest.mark.parametrize(("args", "message"), [
    (["--auth-token", TOKEN],
     "unrecognized arguments: --auth-token and 1 value (not shown: values may be secrets)" + SECRET_HINT),
    ([f"--auth-token={TOKEN}"],
     "unrecognized arguments: --auth-token and 1 value (not shown: values may be secrets)" + SECRET_HINT),
    (["--auth-token", f"--{TOKEN}"],  # a token that looks like a flag is still a value
     "unrecognized arguments: --auth-token and 1 value (not shown: values may be secrets)" + SECRET_HINT),
    ([TOKEN], "unrecognized arguments: 1 value (not shown: values may be secrets)"),
    (["--frobnicate", TOKEN, "--auth-token", TOKEN],
     "unrecognized arguments: --frobnicate --auth-token and 2 values (not shown: values may be secrets)"
     + SECRET_HINT),
], ids=["flag-value", "flag=value", "value-like-a-flag", "stray-value", "mixed"])
def test_usage_errors_never_print_the_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    args: list[str], message: str,
) -> None:
    """argparse echoes the words it did not take; mnist-serve names the flags and counts the rest."""
    from digitserve.server.cli import main as serve_main

    monkeypatch.delenv("MNIST_AUTH_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        serve_main(["--model-repo", str(tmp_path), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert TOKEN not in err
    assert err.splitlines()[-1] == f"mnist-serve: error: {message}"


def test_settings_never_show_the_token(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The settings' repr and str, their range-check errors, and the start-up log of a server
    that cannot start: none holds the token."""
    settings = load_settings(["--model-repo", str(tmp_path)], {"MNIST_AUTH_TOKEN": TOKEN})
    assert settings.auth_token == TOKEN
    assert TOKEN not in repr(settings) and TOKEN not in str(settings)
    with pytest.raises(ValueError) as info:
        load_settings(["--model-repo", str(tmp_path), "--port", "-1"], {"MNIST_AUTH_TOKEN": TOKEN})
    assert TOKEN not in str(info.value)
    caplog.set_level(logging.DEBUG)
    bad = replace(settings, port=0, tls_cert=tmp_path / "absent.crt", tls_key=tmp_path / "absent.key")
    assert asyncio.run(serve(bad)) == 1
    assert caplog.records and all(TOKEN not in r.getMessage() for r in caplog.records)
    assert TOKEN not in capsys.readouterr().err


def test_unusable_security_files_stop_the_server_with_one_line(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    spaced = tmp_path / "spaced-token"
    spaced.write_text("two words\n")
    empty = tmp_path / "empty-token"
    empty.write_text("\n \n")
    base = Settings(model_repo=tmp_path, port=0)
    for overrides, message in (
        ({"tls_cert": tmp_path / "absent.crt", "tls_key": pki.server_key},
         f"TLS certificate {tmp_path / 'absent.crt'}: cannot read (No such file or directory)"),
        ({"tls_cert": pki.server_cert, "tls_key": not_pem},
         f"TLS key {not_pem}: not a PEM file (no '-----BEGIN' line)"),
        ({"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": tmp_path},
         f"TLS client CA {tmp_path}: cannot read (Is a directory)"),
        ({"auth_token_file": tmp_path / "absent"},
         f"token file {tmp_path / 'absent'}: cannot read (No such file or directory)"),
        ({"auth_token_file": empty}, f"token file {empty}: holds no token"),
        ({"auth_token_file": spaced}, f"token file {spaced}: token 1 is not a bearer token"),
        ({"auth_token": "tab\there"}, "MNIST_AUTH_TOKEN: token 1 is not a bearer token"),
    ):
        settings = replace(base, **overrides)
        with pytest.raises(SecurityConfigError) as info:
            ServerSecurity.from_settings(settings)
        assert str(info.value).startswith(message), str(info.value)
        assert "two words" not in str(info.value) and "tab\there" not in str(info.value)
    # serve() turns it into one log line and exit code 1, before binding anything.
    caplog.set_level(logging.ERROR)
    bad = replace(base, tls_cert=tmp_path / "absent.crt", tls_key=pki.server_key)
    assert asyncio.run(serve(bad)) == 1
    assert [r.getMessage() for r in caplog.records if r.name == "digitserve.server.app"] == [
        f"cannot start: TLS certificate {tmp_path / 'absent.crt'}: cannot read (No such file or directory)"]


# --- certificates at start-up ---------------------------------------------------------------------

DAY = datetime.timedelta(days=1)


def _utc(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines()]  # every line JSON: nothing else printed


def test_unusable_certificates_stop_the_server_with_one_line(
    spawn: type[ServerProcess], pki: Pki, tmp_path: Path
) -> None:
    """An expired or not yet valid certificate, a key of another certificate, a certificate that is
    not one, an encrypted key: the real server process logs one line (no traceback) and exits 1,
    before binding."""
    ca = _issue("certificates CA", None)
    expired, expired_key = _issue("server", ca, server=True, valid=(-10 * DAY, -DAY))
    future, future_key = _issue("server", ca, server=True, valid=(DAY, 10 * DAY))
    expired_cert, expired_key_path = _write(tmp_path, "expired", expired, expired_key)
    future_cert, future_key_path = _write(tmp_path, "future", future, future_key)
    locked_key = tmp_path / "locked.key"
    server_key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    locked_key.write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cases = [
        (expired_cert, expired_key_path,
         f"TLS certificate {expired_cert}: expired at {_utc(expired.not_valid_after_utc)} (now "),
        (future_cert, future_key_path,
         f"TLS certificate {future_cert}: not valid before {_utc(future.not_valid_before_utc)} (now "),
        (pki.server_cert, pki.client_key,
         f"TLS key {pki.client_key} is not the key of TLS certificate {pki.server_cert} (their public "
         "keys differ); give the key the certificate was issued for"),
        (garbage, pki.server_key, f"TLS certificate {garbage}: not a readable PEM certificate chain"),
        (pki.server_cert, locked_key,
         f"TLS key {locked_key}: encrypted; grpc needs an unencrypted key (e.g. `openssl pkey -in KEY "
         "-out PLAIN`), readable only by the server"),
    ]
    servers = [spawn("--model-repo", str(tmp_path), "--host", "127.0.0.1", "--tls-cert", str(cert),
                     "--tls-key", str(key)) for cert, key, _ in cases]
    # With --workers the parent checks once: still one line, not one per worker.
    servers.append(spawn("--model-repo", str(tmp_path), "--host", "127.0.0.1", "--workers", "2",
                         "--tls-cert", str(expired_cert), "--tls-key", str(expired_key_path)))
    cases.append(cases[0])
    for server, (_, _, message) in zip(servers, cases, strict=True):
        assert server.wait(60) == 1, server.log
        lines = _json_lines(server.log)
        assert len(lines) == 1, server.log
        assert (lines[0]["level"], lines[0]["logger"]) == ("ERROR", "digitserve.server.app")
        assert lines[0]["message"].startswith(f"cannot start: {message}"), lines[0]["message"]
        assert "Traceback" not in server.log and "exception" not in lines[0]
        print(f"\nexit 1: {lines[0]['message']}")
    for line, suffix in ((servers[0].log, "); renew it"),
                         (servers[1].log, "); check the clock, or use a certificate valid now")):
        assert _json_lines(line)[0]["message"].endswith(suffix)


def test_certificate_expiring_soon_or_for_another_host_warns_and_is_exported(
    spawn: type[ServerProcess], pki: Pki, tiny_repo: Path, tmp_path: Path
) -> None:
    """The server starts and serves, after one warning for each problem; the expiry is a metric."""
    ca = _issue("certificates CA", None)
    cert, key = _issue("server", ca, server=True, valid=(-DAY, 2 * DAY), names=("other.example",))
    cert_path, key_path = _write(tmp_path, "soon", cert, key)
    assert key_path is not None
    server = spawn("--model-repo", str(tiny_repo), "--model-name", "tiny", "--host", "127.0.0.1",
                   "--tls-cert", str(cert_path), "--tls-key", str(key_path), "--metrics-port", "0")
    target = server.target()
    deadline = time.monotonic() + 60
    while "serving model tiny" not in server.log:
        assert server.proc.poll() is None and time.monotonic() < deadline, server.log
        time.sleep(0.05)
    warnings = [line["message"] for line in _json_lines(server.log) if line["level"] == "WARNING"]
    expires = cert.not_valid_after_utc
    assert len(warnings) == 2, warnings
    assert re.fullmatch(
        re.escape(f"TLS certificate {cert_path} expires at {_utc(expires)}, in ") + r"[12]\.\d"
        + re.escape(" days (--tls-expiry-warning-days 14); renew it"), warnings[0]), warnings[0]
    assert warnings[1] == (f"TLS certificate {cert_path} is for other.example, not --host 127.0.0.1: "
                           "clients that connect to 127.0.0.1 will refuse it")
    metrics_port = int(re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", server.log)[1])  # type: ignore[index]
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    gauge = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert gauge["digitserve_tls_certificate_expiry_timestamp_seconds"] == expires.timestamp()
    # It serves, to a client that asks for the name the certificate has.
    options = [("grpc.ssl_target_name_override", "other.example")]
    ca_path = _write(tmp_path, "ca", ca[0])[0]
    with DigitClient(target, credentials=tls_credentials(ca_path), timeout=10, options=options) as client:
        assert client.health() == "SERVING"
    print(f"\nwarnings: {warnings}; expiry metric {expires.timestamp():.0f}")


@pytest.mark.parametrize(("host", "names", "warned"), [
    ("127.0.0.1", ("localhost", "127.0.0.1"), False),
    ("localhost", ("localhost", "127.0.0.1"), False),
    ("LOCALHOST.", ("localhost",), False),
    ("0.0.0.0", ("other.example",), False),  # every interface: no name to check
    ("[::]", ("other.example",), False),
    ("[::1]", ("::1",), False),
    ("::1", ("127.0.0.1",), True),
    ("api.example.com", ("*.example.com",), False),
    ("a.api.example.com", ("*.example.com",), True),  # a wildcard covers one label
    ("example.com", ("*.example.com",), True),
    ("10.0.0.1", ("localhost",), True),
])
def test_certificate_names_are_checked_against_the_host(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    host: str, names: tuple[str, ...], warned: bool,
) -> None:
    ca = _issue("certificates CA", None)
    cert_path, key_path = _write(tmp_path, "named", *_issue("server", ca, server=True, names=names))
    caplog.set_level(logging.WARNING)
    security = ServerSecurity.from_settings(
        Settings(model_repo=tmp_path, host=host, tls_cert=cert_path, tls_key=key_path))
    assert security.certificate is not None and security.certificate.names == names
    messages = [r.getMessage() for r in caplog.records if " is for " in r.getMessage()]
    bare = host.strip("[]")
    assert messages == ([f"TLS certificate {cert_path} is for {', '.join(names)}, not --host {bare}: "
                         f"clients that connect to {bare} will refuse it"] if warned else [])


def test_expiry_warning_days_setting(pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The certificate of the module's PKI expires in a day: a warning at 14 days, none at 0."""
    caplog.set_level(logging.WARNING)
    base = Settings(model_repo=tmp_path, tls_cert=pki.server_cert, tls_key=pki.server_key)
    ServerSecurity.from_settings(replace(base, tls_expiry_warning_days=0))
    assert caplog.records == []
    ServerSecurity.from_settings(base)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        f"TLS certificate {pki.server_cert} expires at " + _utc(
            x509.load_pem_x509_certificate(pki.server_cert.read_bytes()).not_valid_after_utc)]
    assert load_settings([], {"MNIST_MODEL_REPO": str(tmp_path), "MNIST_TLS_EXPIRY_WARNING_DAYS": "30"}
                         ).tls_expiry_warning_days == 30
    with pytest.raises(ValueError, match=re.escape("tls expiry warning days -1.0 is not in [0, 3650]")):
        replace(base, tls_expiry_warning_days=-1.0)


# --- the client CLI ------------------------------------------------------------------------------

def test_client_cli_flags_for_tls_mtls_and_token(
    start_fake: Callable[..., ServerThread], pki: Pki, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = start_fake(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca,
                        auth_token=TOKEN)
    mtls = ["--target", server.target, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
            "--tls-key", str(pki.client_key)]
    assert client_main([*mtls, "--token-file", str(token_file), "info", "--json"]) == 0
    assert '"name": "fake"' in capsys.readouterr().out
    # Health needs no token (but still the client certificate).
    assert client_main([*mtls, "health"]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert client_main([*mtls, "info"]) == 1
    assert capsys.readouterr().err == (
        f"mnist-client: error: {server.target}: UNAUTHENTICATED: {MISSING_TOKEN}\n")
    assert client_main(["--target", server.target, "--tls-cert", str(pki.client_cert), "info"]) == 1
    assert "needs both --tls-cert and --tls-key" in capsys.readouterr().err
    # The same from the environment.
    for name, value in (("MNIST_TLS_CA", pki.ca), ("MNIST_CLIENT_CERT", pki.client_cert),
                        ("MNIST_CLIENT_KEY", pki.client_key), ("MNIST_TOKEN_FILE", token_file)):
        monkeypatch.setenv(name, str(value))
    assert client_main(["--target", server.target, "info"]) == 0
    capsys.readouterr()
    # Files that cannot be used are one line, exit 1.
    assert client_main([*mtls, "--token-file", str(tmp_path / "absent"), "info"]) == 1
    assert capsys.readouterr().err == (
        f"mnist-client: error: token file {tmp_path / 'absent'}: cannot read (No such file or directory)\n")


def test_read_token_takes_the_first_line(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n  abc  \nsecond\n")
    assert read_token(path) == "abc"
    path.write_text("\n")
    with pytest.raises(ClientSecurityError, match="holds no token"):
        read_token(path)


# --- message-size limits -------------------------------------------------------------------------

def many_classes() -> FakeModel:
    """A fake on purpose: 4,000 classes make a reply of a few images larger than a message limit."""
    return FakeModel(input_shape=(8, 8), labels=tuple(f"c{i}" for i in range(4000)))


def test_message_size_limits_hold_for_replies_and_stream_messages(
    start_server: Callable[..., ServerThread]
) -> None:
    """test_server covers an oversized Predict request. Here: a reply larger than the server's send
    limit, a reply larger than the client's receive limit, and an oversized Evaluate message."""
    small = start_server(loader=many_classes, max_message_bytes=64 * 1024)
    images = images_u8(10)[:, :64]  # 10 × 64 bytes in, 10 × 4000 probabilities (~200 KB) out
    with DigitClient(small.target, timeout=10) as client:
        error = refused(lambda: client.predict(images))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert client.predict(images[:1]).probabilities.shape == (1, 4000)  # ~20 KB fits
    big = start_server(loader=many_classes)  # 16 MiB on the server
    with DigitClient(big.target, timeout=10,
                     options=[("grpc.max_receive_message_length", 64 * 1024)]) as client:
        error = refused(lambda: client.predict(images))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "larger than max" in error.details()
        assert client.predict(images[:1]).probabilities.shape == (1, 4000)
    limited = start_server(max_message_bytes=64 * 1024)  # the tiny model from its repository
    with DigitClient(limited.target, timeout=10) as client:
        error = refused(lambda: client.evaluate(images_u8(100), np.zeros(100), batch_size=100))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert client.evaluate(images_u8(100), np.zeros(100), batch_size=50).count == 100


# --- untrusted data ------------------------------------------------------------------------------

@pytest.fixture
def published_copy(tiny_repo: Path, tmp_path: Path) -> Iterator[Path]:
    source = ModelRepository(tiny_repo).version_dir("tiny", 1)
    copy = tmp_path / "tiny" / "1"
    shutil.copytree(source, copy)
    yield copy


def test_tampered_model_file_is_refused_before_keras_opens_it(published_copy: Path) -> None:
    from digitserve.inference import KerasModel

    assert KerasModel.load(published_copy).spec.version == 1  # the untouched copy loads
    model_file = published_copy / MODEL_FILE
    data = bytearray(model_file.read_bytes())
    for offset in (len(data) // 3, len(data) // 2):  # flip bytes after publishing
        data[offset] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError) as info:
        KerasModel.load(published_copy)
    recorded = json.loads((published_copy / "metadata.json").read_text())["files"][MODEL_FILE]
    assert str(info.value) == (
        f"{model_file}: sha256 is {hashlib.sha256(data).hexdigest()}, metadata.json says "
        f"{recorded['sha256']}; the file changed after publishing: republish the version")


UNSAFE_LOADS = [
    (re.compile(r"\bpickle\.loads?\("), "plain unpickling"),
    (re.compile(r"\bpickle\.Unpickler\("), "an unrestricted unpickler"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy with pickles"),
    (re.compile(r"\bnp\.load\((?![^)]*allow_pickle=False)"), "np.load without allow_pickle=False"),
    (re.compile(r"\bload_model\((?![^)]*safe_mode=True)"), "Keras load_model without safe_mode=True"),
    (re.compile(r"\byaml\.(?:unsafe_)?load\("), "yaml.load"),
    (re.compile(r"\b(?:eval|exec)\("), "eval/exec"),
    (re.compile(r"\bmarshal\.loads?\("), "marshal"),
]


def test_no_code_loads_untrusted_data_unsafely() -> None:
    sources = [p for d in ("server", "trainer", "client", "core", "protos")
               for p in sorted((REPO_ROOT / d).rglob("*.py")) if "_pb2" not in p.name]
    assert len(sources) > 20
    found = []
    for path in sources:
        text = path.read_text()
        for pattern, why in UNSAFE_LOADS:  # on the whole text: a call may span lines
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(REPO_ROOT)}:{line}: {why}")
    assert not found, found


def test_the_http_port_speaks_tls_and_requires_client_certificates_like_grpc(
    start_fake: Callable[..., ServerThread], pki: Pki
) -> None:
    import http.client
    import json
    import ssl

    server = start_fake(http_port=0, tls_cert=pki.server_cert, tls_key=pki.server_key,
                        tls_client_ca=pki.ca)
    port = server.app.http_port
    assert port

    def ready(context: ssl.SSLContext | None) -> int:
        connection = (http.client.HTTPConnection("127.0.0.1", port, timeout=10) if context is None
                      else http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context))
        try:
            connection.request("GET", "/v2/health/ready")
            response = connection.getresponse()
            assert json.loads(response.read()) == {"ready": True}
            return response.status
        finally:
            connection.close()

    trusting = ssl.create_default_context(cafile=str(pki.ca))
    for context in (None, trusting):  # plaintext; TLS without a client certificate
        with pytest.raises((OSError, http.client.HTTPException)):
            ready(context)
    trusting.load_cert_chain(pki.client_cert, pki.client_key)
    assert ready(trusting) == 200
