"""The wire API keeps the published v1alpha1 names and field numbers."""

import pytest

from epm_api import v1alpha1_pb2 as pb

PUBLISHED_FIELDS = {
    "Cache": {1: "type", 2: "subType", 3: "ID", 4: "savePath", 5: "parent",
              6: "size", 7: "created", 8: "options"},
    "GetCacheRequest": {1: "type", 2: "subType", 3: "ID"},
    "GetCacheResponse": {1: "cache"},
    "PickCacheRequest": {1: "type", 2: "subType", 3: "filters"},
    "PickCacheResponse": {1: "caches"},
    "SaveCacheRequest": {1: "cache", 2: "sourcePath"},
    "SaveCacheResponse": {1: "ok"},
    "ListCacheRequest": {1: "type", 2: "subType", 3: "lastCacheID", 4: "limit"},
    "ListCacheResponse": {1: "caches"},
    "DeleteCacheRequest": {1: "type", 2: "subType", 3: "ID"},
    "DeleteCacheResponse": {1: "ok"},
    "LoadCacheRequest": {1: "type", 2: "subType", 3: "ID", 4: "targetPath"},
    "LoadCacheResponse": {1: "ok"},
    "HealthzRequest": {1: "type"},
    "HealthzResponse": {1: "ok"},
    "Enclave": {1: "fd", 2: "nr", 3: "layout"},
    "Enclavelayout": {1: "addr", 2: "size", 3: "prot"},
    "EnclavePerms": {1: "read", 2: "write", 3: "execute", 4: "share", 5: "private"},
}

PUBLISHED_TYPES = {
    ("Cache", "size"): "int64", ("Cache", "created"): "int64",
    ("Cache", "options"): "google.protobuf.Any",
    ("ListCacheRequest", "limit"): "int32",
    ("Enclave", "fd"): "int64", ("Enclave", "nr"): "int64",
    ("Enclavelayout", "addr"): "uint64", ("Enclavelayout", "size"): "uint64",
}

METHODS = {
    "GetCache": ("GetCacheRequest", "GetCacheResponse"),
    "PickCache": ("PickCacheRequest", "PickCacheResponse"),
    "SaveCache": ("SaveCacheRequest", "SaveCacheResponse"),
    "SaveFinalCache": ("SaveCacheRequest", "SaveCacheResponse"),
    "ListCache": ("ListCacheRequest", "ListCacheResponse"),
    "DeleteCache": ("DeleteCacheRequest", "DeleteCacheResponse"),
    "LoadCache": ("LoadCacheRequest", "LoadCacheResponse"),
    "Healthz": ("HealthzRequest", "HealthzResponse"),
}

_TYPE_NAMES = {3: "int64", 4: "uint64", 5: "int32"}


def test_package_is_v1alpha1():
    assert pb.DESCRIPTOR.package == "v1alpha1"


@pytest.mark.parametrize("message", sorted(PUBLISHED_FIELDS))
def test_published_field_numbers_and_names(message):
    fields = pb.DESCRIPTOR.message_types_by_name[message].fields_by_number
    for number, name in PUBLISHED_FIELDS[message].items():
        assert fields[number].name == name, f"{message} field {number}"


@pytest.mark.parametrize("message,field", sorted(PUBLISHED_TYPES))
def test_published_field_types(message, field):
    desc = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name[field]
    expected = PUBLISHED_TYPES[(message, field)]
    actual = desc.message_type.full_name if desc.message_type else \
        _TYPE_NAMES[desc.type]
    assert actual == expected


def test_enclave_type_url_matches_published_clients():
    assert pb.Enclave.DESCRIPTOR.full_name == "v1alpha1.Enclave"


def test_service_has_the_eight_published_methods():
    service = pb.DESCRIPTOR.services_by_name["EnclavePoolManager"]
    assert service.full_name == "v1alpha1.EnclavePoolManager"
    got = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert got == METHODS


def test_fields_we_added_use_new_numbers():
    enclave = pb.Enclave.DESCRIPTOR.fields_by_number
    assert enclave[4].name == "identity" and enclave[5].name == "state"
