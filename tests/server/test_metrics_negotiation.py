"""/metrics on the HTTP port (--http-port) answers as the metrics port (--metrics-port) does: the
same format for the same ``Accept`` (OpenMetrics or Prometheus text), the same compression for the
same ``Accept-Encoding`` (gzip), the same ``name[]`` filter; each body parsed by prometheus-client's
own parser for its format."""

from __future__ import annotations

import gzip
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from tests.servers import ServerThread

OPENMETRICS = "application/openmetrics-text"

# (Accept, Accept-Encoding) -> what both ports must answer: the Content-Type's media type and the
# Content-Encoding (None: not compressed).
CASES = [
    (None, None, "text/plain", None),
    (None, "gzip", "text/plain", "gzip"),
    (None, "deflate, gzip;q=0.5", "text/plain", "gzip"),
    (None, "identity", "text/plain", None),
    (f"{OPENMETRICS}; version=1.0.0", None, OPENMETRICS, None),
    (f"{OPENMETRICS}; version=1.0.0; q=0.9, text/plain; q=0.5", "gzip", OPENMETRICS, "gzip"),
    (OPENMETRICS, None, OPENMETRICS, None),  # no version: OpenMetrics 1.0.0
    ("text/plain; version=0.0.4", None, "text/plain", None),
    ("application/json", None, "text/plain", None),  # nothing the client library offers: text
]


def get(url: str, accept: str | None, encoding: str | None) -> tuple[str, str | None, str]:
    """Content-Type, Content-Encoding and the (inflated) body of a GET with these headers."""
    headers = {k: v for k, v in (("Accept", accept), ("Accept-Encoding", encoding)) if v is not None}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as answer:
        body = answer.read()
        content_type, content_encoding = answer.headers["Content-Type"], answer.headers["Content-Encoding"]
    if content_encoding == "gzip":
        body = gzip.decompress(body)
    return content_type, content_encoding, body.decode()


def families(content_type: str, text: str) -> set[str]:
    """The families in a body, read by the parser of its format (which raises on a malformed one)."""
    parse = parse_openmetrics if content_type.startswith(OPENMETRICS) else parse_prometheus
    return {family.name for family in parse(text)}


@pytest.fixture
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    return start_server(http_port=0, metrics_port=0)


@pytest.mark.parametrize(("accept", "encoding", "media_type", "compressed"), CASES)
def test_both_ports_negotiate_the_same_format_and_compression(
    server: ServerThread, accept: str | None, encoding: str | None, media_type: str, compressed: str | None
) -> None:
    answers = {}
    for name, port in (("metrics port", server.app.metrics_port), ("HTTP port", server.app.http_port)):
        content_type, content_encoding, text = get(f"http://127.0.0.1:{port}/metrics", accept, encoding)
        assert content_type.split(";")[0] == media_type, (name, content_type)
        assert content_encoding == compressed, (name, content_encoding)
        if media_type == OPENMETRICS:
            assert text.endswith("# EOF\n"), name
        answers[name] = content_type, families(content_type, text)
    (ours, our_families), (theirs, their_families) = answers["HTTP port"], answers["metrics port"]
    assert ours == theirs
    # the same registry: every family of one is in the other (values move between the two scrapes)
    assert our_families == their_families
    assert {"grpc_server_handled", "grpc_server_started", "http_server_requests"} <= our_families


def test_both_ports_filter_by_name(server: ServerThread) -> None:
    """prometheus-client's ``name[]`` parameter: only the families asked for."""
    query = "?name[]=grpc_server_started_total&name[]=digitserve_low_confidence_threshold"
    for port in (server.app.metrics_port, server.app.http_port):
        content_type, _, text = get(f"http://127.0.0.1:{port}/metrics{query}", None, "gzip")
        assert families(content_type, text) == {"grpc_server_started", "digitserve_low_confidence_threshold"}
