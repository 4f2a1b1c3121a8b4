"""The hand-off messages in the protobuf wire format, without the protobuf runtime.

The PAL checks enclaves out in a process that starts for every container,
and importing the protobuf runtime with the generated stubs costs about
38 ms there: more than the whole launch from the pool. The hand-off
messages (``proto/epm_api/handoff.proto``) are few and small, so the client
encodes its requests and decodes the daemon's replies here, by the rules of
https://protobuf.dev/programming-guides/encoding/. ``tests/test_wire.py``
checks both directions against the generated stubs; a field added to the
protos must be added here too, or the client ignores it.
"""

import collections

from epm_client.types import Identity, LayoutEntry

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# HandoffReply, decoded: ``enclave`` is None when the reply carries none.
Reply = collections.namedtuple("Reply", "code message id enclave")
# An Enclave message: ``identity`` is None when it carries none.
Enclave = collections.namedtuple("Enclave", "layout identity state")


class WireError(ValueError):
    """Bytes that are not a message of the expected type."""


def check_out_request(subtype, identity, hold=False):
    """A serialized HandoffRequest{check_out: {subtype, identity, hold}}."""
    body = (_string(1, subtype) + _message(2, identity_bytes(identity))
            + _uint(3, hold))
    return _message(1, body)


def check_in_request(subtype, layout, identity, available=False):
    """A serialized HandoffRequest{check_in: {subtype, enclave, available}}."""
    body = (_string(1, subtype) + _message(2, enclave_bytes(layout, identity))
            + _uint(3, available))
    return _message(2, body)


def save_final_request(pool_id, discard=False):
    """A serialized HandoffRequest{save_final: {id, discard}}."""
    return _message(3, _string(1, pool_id) + _uint(2, discard))


def identity_bytes(identity):
    """A serialized v1alpha1.EnclaveIdentity."""
    return (_bytes(1, identity.mrenclave) + _bytes(2, identity.mrsigner)
            + _uint(3, identity.attributes) + _uint(4, identity.xfrm)
            + _uint(5, identity.size) + _string(6, identity.backend))


def enclave_bytes(layout, identity, fd=-1):
    """A serialized v1alpha1.Enclave, as ``types.enclave_to_proto`` builds it."""
    parts = [_uint(1, fd), _uint(2, len(layout))]
    for entry in layout:
        prot = (_uint(1, entry.read) + _uint(2, entry.write)
                + _uint(3, entry.execute) + _uint(4, entry.share)
                + _uint(5, entry.private))
        parts.append(_message(3, _uint(1, entry.addr) + _uint(2, entry.size)
                              + _message(3, prot)))
    if identity is not None:
        parts.append(_message(4, identity_bytes(identity)))
    return b"".join(parts)


def parse_reply(data):
    """Decode a HandoffReply. Raises WireError.

    The enclave of a reply is decoded once per distinct encoding: a client
    checks out the same identity and layout again and again.
    """
    code, message, pool_id, enclave = 0, "", "", None
    for field, kind, value in _fields(data):
        if field == 1 and kind == _VARINT:
            code = _int32(value)
        elif field == 2 and kind == _LEN:
            message = _text(value)
        elif field == 3 and kind == _LEN:
            pool_id = _text(value)
        elif field == 4 and kind == _LEN:
            enclave = _cached_enclave(bytes(value))
    return Reply(code, message, pool_id, enclave)


_decoded = {}


def _cached_enclave(data):
    got = _decoded.get(data)
    if got is None:
        got = parse_enclave(data)
        if len(_decoded) >= 64:
            _decoded.clear()
        _decoded[data] = got
    # A fresh list each time: callers own the layout they are given.
    return Enclave(list(got.layout), got.identity, got.state)


def parse_enclave(data):
    """Decode a v1alpha1.Enclave's layout, identity and state. Raises WireError."""
    layout, identity, state = [], None, ""
    for field, kind, value in _fields(data):
        if field == 3 and kind == _LEN:
            layout.append(_layout_entry(value))
        elif field == 4 and kind == _LEN:
            identity = _identity(value)
        elif field == 5 and kind == _LEN:
            state = _text(value)
    return Enclave(layout, identity, state)


def _layout_entry(data):
    addr = size = 0
    prot = [False] * 5
    for field, kind, value in _fields(data):
        if field == 1 and kind == _VARINT:
            addr = value
        elif field == 2 and kind == _VARINT:
            size = value
        elif field == 3 and kind == _LEN:
            for bit, bit_kind, flag in _fields(value):
                if 1 <= bit <= 5 and bit_kind == _VARINT:
                    prot[bit - 1] = flag != 0
    read, write, execute, share, private = prot
    return LayoutEntry(addr, size, read=read, write=write, execute=execute,
                       share=share, private=private)


def _identity(data):
    values = {"mrenclave": b"", "mrsigner": b"", "attributes": 0, "xfrm": 0,
              "size": 0, "backend": ""}
    for field, kind, value in _fields(data):
        if field == 1 and kind == _LEN:
            values["mrenclave"] = bytes(value)
        elif field == 2 and kind == _LEN:
            values["mrsigner"] = bytes(value)
        elif 3 <= field <= 5 and kind == _VARINT:
            values[("attributes", "xfrm", "size")[field - 3]] = value
        elif field == 6 and kind == _LEN:
            values["backend"] = _text(value)
    return Identity(**values)


# -- encoding ------------------------------------------------------------------
# proto3 leaves out scalar fields that hold their default; a message field is
# written whenever it is set, even empty, because its presence is meaningful
# (the oneof of HandoffRequest, EnclaveLayout.prot).

def _varint(n):
    if n < 0:
        n += 1 << 64  # int64 and int32 negatives: ten bytes, two's complement
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _uint(field, n):
    return _varint(field << 3 | _VARINT) + _varint(int(n)) if n else b""


def _bytes(field, data):
    return _varint(field << 3 | _LEN) + _varint(len(data)) + data if data else b""


def _string(field, text):
    return _bytes(field, text.encode())


def _message(field, body):
    return _varint(field << 3 | _LEN) + _varint(len(body)) + body


# -- decoding ------------------------------------------------------------------

def _fields(data):
    """Yield (field number, wire type, value) for each field of a message."""
    data = memoryview(data)
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _read_varint(data, pos)
        field, kind = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        if kind == _VARINT:
            value, pos = _read_varint(data, pos)
        elif kind == _LEN:
            length, pos = _read_varint(data, pos)
            if pos + length > end:
                raise WireError(f"field {field} runs past the message's end")
            value, pos = data[pos:pos + length], pos + length
        elif kind in (_I64, _I32):
            width = 8 if kind == _I64 else 4
            if pos + width > end:
                raise WireError(f"field {field} runs past the message's end")
            value, pos = int.from_bytes(data[pos:pos + width], "little"), pos + width
        else:
            raise WireError(f"field {field} has wire type {kind}")
        yield field, kind, value


def _read_varint(data, pos):
    result = shift = 0
    end = len(data)
    while pos < end and shift < 70:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & ((1 << 64) - 1), pos
        shift += 7
    raise WireError("truncated or overlong varint")


def _int32(value):
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _text(value):
    try:
        return bytes(value).decode()
    except UnicodeDecodeError as e:
        raise WireError(f"a string field is not UTF-8: {e}") from None
