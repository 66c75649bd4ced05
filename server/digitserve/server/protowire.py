"""Protobuf's wire format (https://protobuf.dev/programming-guides/encoding/) written by hand:
the varints and length-delimited fields from which server.wire writes Predict's answer and
server.oipcodec ModelInfer's, each where building the message field by field costs more."""

from __future__ import annotations

_ONE_BYTE = [bytes((b,)) for b in range(0x80)]  # the varints of one byte


def varint(value: int) -> bytes:
    """``value`` (non-negative) as a varint: 7 bits a byte, least significant first."""
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
    """Field ``field`` (below 16: its tag is one byte) of wire type 2 holding ``payload``."""
    return bytes([field << 3 | 2]) + varint(len(payload)) + payload
