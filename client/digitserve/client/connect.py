"""Whether a channel reaches its server, learnt from gRPC's connectivity state: a client that has
never reached its server fails at once with one line saying why (``ConnectError``), instead of
waiting out its deadline; it waits only when asked to.

gRPC reports a failed connection attempt as the channel state ``TRANSIENT_FAILURE`` within
milliseconds, but not why. The reason is in the ``UNAVAILABLE`` status of a call that does not
wait for the connection (``wait_for_ready=False``); a call to a method outside the client's retry
policy (``client.RETRY_SERVICE_CONFIG``) gets it at once, where a retried one would take the
policy's backoff (~1.5 s) to report the same thing.
"""

from __future__ import annotations

import re
import threading

import grpc

from digitserve.client.errors import ConnectError

# A method no server has: called only while the channel is in TRANSIENT_FAILURE, where gRPC fails
# it without sending anything. Its service is outside the retry policy, so it fails at once.
PROBE_METHOD = "/digitserve.client.Connectivity/Probe"
PROBE_TIMEOUT = 1.0

_REFUSED = "connection refused (is mnist-serve running?)"
# What grpc core says of a port that answered its HTTP/2 preface with an HTTP/1 response (an
# aiohttp or other web server: mnist-serve's own --http-port, most likely).
HTTP1_DETAILS = "Trying to connect an http1.x server"
HTTP1_REASON = ("it answers HTTP/1, not gRPC: it looks like the server's --http-port; use the gRPC "
                "port (--port, default 50051)")


def failure_reason(details: str) -> str:
    """The reason in gRPC's UNAVAILABLE details of a failed connection, in a user's words:
    ``connections to all backends failing; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to
    connect to remote host: Connection refused`` -> ``connection refused (is mnist-serve
    running?)``; an HTTP/1 server's answer names the likely mix-up of ports; details it does
    not recognise are returned as they are."""
    if "Connection refused" in details:
        return _REFUSED
    if HTTP1_DETAILS in details:
        return HTTP1_REASON
    match = re.search(r"lookup failed for \S+?: (.+?)\]?$", details)
    if match:
        return f"the name does not resolve ({match.group(1)})"
    # "...; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: <reason>"
    match = re.search(r"last error: [A-Z_]+: (?:(?:ipv4|ipv6|unix|dns):\S+: )?"
                      r"(?:Failed to connect to remote host: )?(.+)$", details)
    if match:
        reason = match.group(1).strip()
        return reason[:1].lower() + reason[1:]
    return details or "the connection failed"


# grpc's connectivity polling thread watches a channel in 0.2 s steps (grpc/_channel.py,
# _poll_connectivity); a little more than one step.
POLL_LINGER = 0.3
_READY, _FAILED = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE


class Connectivity:
    """Follows one channel's connectivity state (``channel.subscribe``) from the first call on."""

    def __init__(self, channel: grpc.Channel, target: str) -> None:
        self._channel, self._target = channel, target
        self._changed = threading.Condition()
        self._state: grpc.ChannelConnectivity | None = None
        self._subscribed = False
        self.connected_once = False  # READY was seen: from then on calls wait for reconnects

    def _update(self, state: grpc.ChannelConnectivity) -> None:
        with self._changed:
            self._state = state
            self.connected_once |= state is _READY
            self._changed.notify_all()

    def close(self) -> float:
        """Stops following the channel. Returns for how many seconds grpc's polling thread may
        still watch it: it notices the unsubscription only when its current watch (0.2 s) ends,
        and a channel closed before then makes that thread die with "Cannot monitor channel
        state: Channel closed!" on stderr (seen once in a full test run)."""
        with self._changed:
            subscribed, self._subscribed = self._subscribed, False
        if not subscribed:
            return 0.0
        self._channel.unsubscribe(self._update)
        return POLL_LINGER

    def _wait(self, states: tuple[grpc.ChannelConnectivity, ...], timeout: float) -> bool:
        with self._changed:
            subscribe, self._subscribed = not self._subscribed, True
        if subscribe:
            self._channel.subscribe(self._update, try_to_connect=True)
        with self._changed:
            return self._changed.wait_for(lambda: self._state in states, max(0.0, timeout))

    def check(self, timeout: float) -> None:
        """Before a call of a client that has not reached its server yet: connects, and returns
        once the channel is READY; raises ConnectError at once when the attempt failed, or when
        nothing answered within ``timeout`` seconds."""
        if not self._wait((_READY, _FAILED), timeout):
            raise ConnectError(self._target, "no answer", grpc.StatusCode.DEADLINE_EXCEEDED, timeout)
        error = self.failure()
        if error is not None:
            raise error

    def wait_ready(self, timeout: float) -> None:
        """Waits up to ``timeout`` seconds for the channel to connect (gRPC reconnects with
        backoff meanwhile); raises ConnectError naming the last failure if it did not."""
        if not self._wait((_READY,), timeout):
            error = self.failure()
            raise ConnectError(self._target, "no answer" if error is None else error.reason,
                               grpc.StatusCode.DEADLINE_EXCEEDED, timeout)

    def failure(self) -> ConnectError | None:
        """Why the channel is not connected, while it is in TRANSIENT_FAILURE (else None): the
        status of a probe call that gRPC fails without sending it."""
        if self._state is not _FAILED:
            return None
        try:
            self._channel.unary_unary(PROBE_METHOD)(b"", timeout=PROBE_TIMEOUT, wait_for_ready=False)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                return ConnectError(self._target, failure_reason(exc.details() or ""))
        return None  # connected meanwhile: the server answered (UNIMPLEMENTED)
