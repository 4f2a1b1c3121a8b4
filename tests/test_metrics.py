"""The Prometheus endpoint: opt-in, loopback, and what a scrape shows."""

import os
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from epm_api import framing
from epm_client import Client, errors
from epm_server import config
from epm_server.errors import ConfigError
from test_client import identity, pooled

SUBTYPE = "skeleton-0.0.0"


def scrape(daemon):
    [started] = daemon.events("metrics_started")
    url = f"http://127.0.0.1:{started['port']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_scrape_counts_pool_check_outs_refusals_and_rpcs(make_daemon):
    daemon = make_daemon('[metrics]\naddress = "127.0.0.1:0"\n')
    with Client(daemon.grpc_socket) as client:
        pooled(client, b"a")
        pooled(client, b"b")
        pooled(client, b"c", subtype="other")
        checked_out = client.check_out(SUBTYPE, identity())
        missed = client.check_out("empty", identity())
        with pytest.raises(errors.EpmError):
            client.delete("no-such-id")
        client.list()

    samples = scrape(daemon)

    assert checked_out is not None and missed is None
    assert value(samples, "epm_pool_enclaves", subtype=SUBTYPE,
                 state="available") == 1
    assert value(samples, "epm_pool_enclaves", subtype="other",
                 state="available") == 1
    assert value(samples, "epm_checkouts_total", subtype=SUBTYPE,
                 result="hit") == 1
    assert value(samples, "epm_checkouts_total", subtype="(other)",
                 result="miss") == 1
    assert value(samples, "epm_refusals_total", reason="not_found") == 1
    count = value(samples, "epm_rpc_duration_seconds_count",
                  method="/v1alpha1.EnclavePoolManager/ListCache")
    assert count >= 1


def test_metrics_are_off_by_default(daemon):
    assert daemon.events("metrics_started") == []


def test_a_remote_address_needs_allow_remote():
    with pytest.raises(ConfigError, match="metrics.address: 0.0.0.0 is not a "
                                          "loopback address"):
        config.parse({"metrics": {"address": "0.0.0.0:9464"}})
    cfg = config.parse({"metrics": {"address": "0.0.0.0:9464",
                                    "allow_remote": True}})
    assert cfg.metrics_address == ("0.0.0.0", 9464)
    assert config.parse({"metrics": {"address": "[::1]:1"}}).metrics_address == (
        "::1", 1)


@pytest.mark.parametrize("address", ["9464", "host:", ":9464", "h:70000", 5])
def test_a_bad_metrics_address_is_named(address):
    with pytest.raises(ConfigError, match="metrics.address"):
        config.parse({"metrics": {"address": address}})


def test_refusals_by_code_use_the_same_reasons():
    from epm_server import metrics
    from epm_server.errors import ResourceExhausted
    before = metrics.REFUSALS.labels("resource_exhausted")._value.get()
    metrics.refusal(ResourceExhausted("full"))
    metrics.refusal_code(8)
    assert metrics.REFUSALS.labels("resource_exhausted")._value.get() == before + 2


def test_scrape_shows_handoff_latency_and_refusals(make_daemon):
    daemon = make_daemon('[metrics]\naddress = "127.0.0.1:0"\n')
    with Client(daemon.grpc_socket) as client:
        pooled(client, b"a")
        got = client.check_out(SUBTYPE, identity(), hold=True)
        client.save_final(got.pool_id)
        with pytest.raises(errors.NotFound):
            client.save_final("no-such-id")
        os.close(got.fd)
    # A frame that is no HandoffRequest: refused with code 3.
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.connect(str(daemon.handoff_socket))
    bad.sendall(framing.HEADER.pack(3) + b"\xff\xff\xff")
    assert framing.recv_frame(bad, time.monotonic() + 5) is not None
    bad.close()

    samples = scrape(daemon)

    for operation, count in (("check_out", 1), ("check_in", 1),
                             ("save_final", 3)):
        assert value(samples, "epm_handoff_duration_seconds_count",
                     operation=operation) == count
    assert value(samples, "epm_refusals_total", reason="not_found") == 1
    assert value(samples, "epm_refusals_total", reason="invalid_argument") == 1
    assert value(samples, "epm_failed_handoffs_total", subtype=SUBTYPE) == 0


def test_misses_of_many_subtypes_leave_the_series_bounded(make_daemon):
    """A subtype that never had a pool gets no series: misses of 300 new
    subtypes are counted under "(other)", in /metrics and in stats."""
    from epm_client.admin import AdminClient
    daemon = make_daemon('[metrics]\naddress = "127.0.0.1:0"\n')
    with Client(daemon.grpc_socket) as client:
        pooled(client, b"a")
        for i in range(300):
            assert client.check_out(f"new-{i}", identity()) is None
        assert client.check_out(SUBTYPE, identity(b"\x99" * 32)) is None

    samples = scrape(daemon)
    with AdminClient(daemon.grpc_socket) as admin:
        stats = admin.stats()

    subtypes = {dict(labels).get("subtype") for (name, labels) in samples
                if name == "epm_checkouts_total"}
    assert subtypes == {SUBTYPE, "(other)"}
    assert value(samples, "epm_checkouts_total", subtype="(other)",
                 result="miss") == 300
    assert value(samples, "epm_checkouts_total", subtype=SUBTYPE,
                 result="miss") == 1
    assert sorted(s.subtype for s in stats.subtypes) == ["(other)", SUBTYPE]


def test_named_subtype_series_are_capped():
    """Past MAX_SUBTYPES, even subtypes that had a pool count as "(other)"."""
    from epm_server import metrics
    for i in range(metrics.MAX_SUBTYPES + 50):
        metrics.checkout(f"capped-{i}", hit=True)
    assert len(metrics.checkout_counts()) <= metrics.MAX_SUBTYPES + 1
    assert metrics.checkout_counts()["(other)"]["hit"] >= 50
