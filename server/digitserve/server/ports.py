"""The ports ``mnist-serve`` listens on: why one cannot be bound, as one line naming its flag
(``--port 51100: 127.0.0.1:51100 is in use (another mnist-serve?); choose another --port``), and
the ``--workers`` pool's shared port, reserved so the pool never joins someone else's."""

from __future__ import annotations

import errno
import re
import socket


class ListenError(Exception):
    """A port the flags name cannot be listened on; the message is the one line to show (exit 2)."""


def listen_error(flag: str, host: str, port: int, cause: OSError | None, *, flag_value: int | None = None,
                 whose: str = "") -> ListenError:
    """The one line for ``host:port`` (given by ``flag``, whose value is ``flag_value`` when it
    differs: a worker's metrics port; ``whose`` port it is) that ``cause`` kept from binding."""
    value = port if flag_value is None else flag_value
    where = f"{host}:{port}" + (f" ({whose})" if whose else "")
    choose = f"choose another {flag}"
    code = getattr(cause, "errno", None)
    if isinstance(cause, socket.gaierror):
        return ListenError(f"--host {host}: cannot resolve it ({cause.strerror}); give an address "
                           "of this machine, such as 127.0.0.1 or 0.0.0.0")
    if code == errno.EADDRINUSE:
        return ListenError(f"{flag} {value}: {where} is in use (another mnist-serve?); {choose}")
    if code in (errno.EACCES, errno.EPERM):
        return ListenError(f"{flag} {value}: listening on {where} is not permitted (ports below 1024 "
                           f"need privileges); {choose}")
    if code == errno.EADDRNOTAVAIL:
        return ListenError(f"--host {host}: not an address of this machine, so {flag} {value} cannot "
                           "listen there; give one of its addresses, such as 127.0.0.1 or 0.0.0.0")
    reason = "unknown reason" if cause is None else (cause.strerror or str(cause))
    return ListenError(f"{flag} {value}: cannot listen on {where} ({reason}); {choose}")


def probe(host: str, port: int) -> OSError | None:
    """Why ``host:port`` cannot be bound now (with SO_REUSEADDR, as grpc binds), or None: explains
    a failure grpc reported without its reason."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return error
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen()
        except OSError as error:
            return error
    return None


_GRPC_BIND_REASON = re.compile(r"Error in bind for address '[^']*': ([^()]+)\)")


def grpc_bind_error(flag: str, host: str, port: int, native: list[str]) -> ListenError:
    """The one line for a port grpc could not bind: the probe's reason, else the one in grpc core's
    ``native`` log lines."""
    if (cause := probe(host, port)) is None:
        reasons = [m.group(1).strip() for line in native if (m := _GRPC_BIND_REASON.search(line))]
        detail = reasons[0] if reasons else (native[0] if native else "grpc bound no address")
        return ListenError(f"{flag} {port}: cannot listen on {host}:{port} ({detail}); choose another {flag}")
    return listen_error(flag, host, port, cause)


def reserve_shared_port(host: str, port: int, flag: str = "--port") -> socket.socket:
    """The ``--workers`` pool's port (``flag``): a socket bound, not listening, held while the workers
    bind it with SO_REUSEPORT. It is bound before SO_REUSEPORT is set, so a port another process
    listens on (another pool included) is refused (ListenError) instead of silently shared."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise listen_error(flag, host, port, error) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, never a listener
        sock.bind(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # the workers may join it now
    except OSError as error:
        sock.close()
        raise listen_error(flag, host, port, error) from None
    return sock


def check_worker_metrics_ports(host: str, first: int, workers: int) -> None:
    """Before the pool starts: worker i's metrics port ``first + i`` must be free (ListenError names
    the first that is not); a check only, each worker binds its own."""
    if first <= 0:
        return  # off (-1), or a free port each (0)
    for index in range(workers):
        if (cause := probe(host, first + index)) is not None:
            raise metrics_port_error(host, first, index, cause)


def metrics_port_error(host: str, first: int, index: int, cause: OSError) -> ListenError:
    """The line for worker ``index``'s metrics port (``first + index``; ``--metrics-port`` is ``first``)."""
    if index == 0 or first <= 0:
        return listen_error("--metrics-port", host, first, cause)
    return listen_error("--metrics-port", host, first + index, cause, flag_value=first,
                        whose=f"worker {index}'s, --metrics-port + {index}")

