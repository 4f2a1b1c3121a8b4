"""The client's own codec of the hand-off messages, against the generated stubs."""

import pytest

from epm_api import handoff_pb2 as hpb
from epm_client import wire
from epm_client.types import Identity, LayoutEntry, enclave_to_proto

IDENTITY = Identity(mrenclave=bytes(range(32)), mrsigner=b"\xff" * 32,
                    attributes=0x4, xfrm=(1 << 64) - 1, size=1 << 27,
                    backend="sim")
LAYOUT = [LayoutEntry(0x7F0000000000, 4096),
          LayoutEntry(0x7F0000001000, (80 << 20) - 4096, execute=True),
          LayoutEntry(1, 2, read=False, write=False, share=False, private=True)]


def test_check_out_request_parses_as_the_stubs_build_it():
    got = hpb.HandoffRequest.FromString(wire.check_out_request("sk-1", IDENTITY))
    assert got == hpb.HandoffRequest(check_out=hpb.CheckOut(
        subtype="sk-1", identity=IDENTITY.to_proto()))


def test_check_in_request_parses_as_the_stubs_build_it():
    got = hpb.HandoffRequest.FromString(
        wire.check_in_request("sk-1", LAYOUT, IDENTITY))
    assert got == hpb.HandoffRequest(check_in=hpb.CheckIn(
        subtype="sk-1", enclave=enclave_to_proto(LAYOUT, IDENTITY)))


def test_save_final_request_parses_as_the_stubs_build_it():
    got = hpb.HandoffRequest.FromString(wire.save_final_request("abc"))
    assert got == hpb.HandoffRequest(save_final=hpb.SaveFinal(id="abc"))


def test_empty_save_final_still_names_its_request():
    got = hpb.HandoffRequest.FromString(wire.save_final_request(""))
    assert got.WhichOneof("request") == "save_final"


def test_check_out_reply_decodes_layout_and_identity():
    reply = hpb.HandoffReply(code=0, id="e1", enclave=enclave_to_proto(
        LAYOUT, IDENTITY, state="leased"))
    got = wire.parse_reply(reply.SerializeToString())
    assert (got.code, got.id, got.message) == (0, "e1", "")
    assert got.enclave.layout == LAYOUT
    assert got.enclave.identity == IDENTITY
    assert got.enclave.state == "leased"


def test_empty_reply_has_no_enclave():
    got = wire.parse_reply(hpb.HandoffReply(code=0).SerializeToString())
    assert got == wire.Reply(0, "", "", None)


@pytest.mark.parametrize("code", [5, 9, -1, 2**31 - 1])
def test_refusal_decodes_code_and_message(code):
    data = hpb.HandoffReply(code=code, message="no such é").SerializeToString()
    got = wire.parse_reply(data)
    assert (got.code, got.message) == (code, "no such é")


def test_unknown_fields_are_skipped():
    data = (hpb.HandoffReply(id="x").SerializeToString()
            + b"\x48\x01"            # field 9, varint
            + b"\x51" + bytes(8)     # field 10, 64-bit
            + b"\x5d" + bytes(4))    # field 11, 32-bit
    assert wire.parse_reply(data).id == "x"


@pytest.mark.parametrize("data", [b"\x22\x05ab", b"\x08", b"\x08" + b"\xff" * 11,
                                  b"\x1a\x02\xff\xfe", b"\x00\x01", b"\x0b"])
def test_malformed_reply_is_a_wire_error(data):
    with pytest.raises(wire.WireError):
        wire.parse_reply(data)


@pytest.mark.parametrize("hold", [False, True])
def test_check_out_request_with_hold_parses_as_the_stubs_build_it(hold):
    got = hpb.HandoffRequest.FromString(
        wire.check_out_request("sk-1", IDENTITY, hold=hold))
    assert got == hpb.HandoffRequest(check_out=hpb.CheckOut(
        subtype="sk-1", identity=IDENTITY.to_proto(), hold=hold))


@pytest.mark.parametrize("discard", [False, True])
def test_save_final_request_with_discard_parses_as_the_stubs_build_it(discard):
    got = hpb.HandoffRequest.FromString(
        wire.save_final_request("abc", discard=discard))
    assert got == hpb.HandoffRequest(
        save_final=hpb.SaveFinal(id="abc", discard=discard))


@pytest.mark.parametrize("available", [False, True])
def test_check_in_request_with_available_parses_as_the_stubs_build_it(available):
    got = hpb.HandoffRequest.FromString(
        wire.check_in_request("sk-1", LAYOUT, IDENTITY, available=available))
    assert got == hpb.HandoffRequest(check_in=hpb.CheckIn(
        subtype="sk-1", enclave=enclave_to_proto(LAYOUT, IDENTITY),
        available=available))
