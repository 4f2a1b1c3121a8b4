"""Prometheus metrics: what the daemon counts, and the opt-in HTTP endpoint.

Counters and histograms live in one registry of this module; the code where
an event happens calls the small functions below (a label lookup and an
add, about a microsecond). Pool sizes are not counted as they change: a
collector reads the pool when Prometheus scrapes. Nothing is served unless
``[metrics] address`` is set.

Subtype labels are bounded. A check-out names whatever subtype its peer
likes, and a series per name would let any allowed peer grow the daemon's
memory, ``/metrics`` and ``epmctl stats`` by one series a request. So a
subtype gets series of its own only once it has had a pool: an enclave of
it entered the pool, or a ``[[prewarm]]`` table names it; check-outs and
failed hand-offs of any other subtype count under ``OTHER_SUBTYPE``. At
most ``MAX_SUBTYPES`` subtypes get their own series: a peer that checks in
enclaves under ever new subtypes fills them, and later subtypes count under
``OTHER_SUBTYPE`` too.
"""

import threading

import prometheus_client
from prometheus_client.core import GaugeMetricFamily

REGISTRY = prometheus_client.CollectorRegistry(auto_describe=True)

# Check-outs and hand-offs take tens of microseconds to a few milliseconds;
# RPCs up to the 2 s a legacy hand-off may wait for its listener.
_FAST_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
                 25e-3, 50e-3, 100e-3, 250e-3, 1.0, 2.5)
# A sim build of 8 to 128 MiB takes 20 ms to a second; hardware is slower.
_BUILD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CHECKOUTS = prometheus_client.Counter(
    "epm_checkouts", "Check-outs by subtype: hit (an enclave was leased) or "
    "miss (none available).", ["subtype", "result"], registry=REGISTRY)
FAILED_HANDOFFS = prometheus_client.Counter(
    "epm_failed_handoffs", "Check-outs whose hand-off failed: the reply "
    "was not sent (the enclave went back to the pool), or was not seen read "
    "(the enclave may have left with it: closed, or held by its client).",
    ["subtype"], registry=REGISTRY)
REFUSALS = prometheus_client.Counter(
    "epm_refusals", "Requests refused, by reason (the error's status name).",
    ["reason"], registry=REGISTRY)
RPC_DURATION = prometheus_client.Histogram(
    "epm_rpc_duration_seconds", "gRPC calls by method, from the call's arrival "
    "to its answer.", ["method"], buckets=_FAST_BUCKETS, registry=REGISTRY)
HANDOFF_DURATION = prometheus_client.Histogram(
    "epm_handoff_duration_seconds", "Requests on the hand-off socket, by "
    "operation, from the frame read to the reply sent.", ["operation"],
    buckets=_FAST_BUCKETS, registry=REGISTRY)
BUILD_DURATION = prometheus_client.Histogram(
    "epm_build_duration_seconds", "Pre-warm builds of one enclave, by subtype "
    "and backend.", ["subtype", "backend"], buckets=_BUILD_BUCKETS,
    registry=REGISTRY)
BUILD_FAILURES = prometheus_client.Counter(
    "epm_build_failures", "Pre-warm builds that failed.", ["subtype"],
    registry=REGISTRY)

# The label of check-outs of subtypes without series of their own. A real
# subtype of this name is counted together with them.
OTHER_SUBTYPE = "(other)"
# As many subtypes as the default pool ([pool] max_total) holds at once.
MAX_SUBTYPES = 256
_subtypes = set()
_subtypes_lock = threading.Lock()

# Error class name -> the reason label; the same words as gRPC status names.
_REASONS = {
    "InvalidArgument": "invalid_argument",
    "NotFound": "not_found",
    "AlreadyExists": "already_exists",
    "PermissionDenied": "permission_denied",
    "ResourceExhausted": "resource_exhausted",
    "FailedPrecondition": "failed_precondition",
    "Unavailable": "unavailable",
}


def add_subtype(subtype):
    """Give ``subtype`` series of its own from now on, while fewer than
    ``MAX_SUBTYPES`` have them; return whether it has them."""
    if subtype in _subtypes:
        return True
    with _subtypes_lock:
        if len(_subtypes) < MAX_SUBTYPES:
            _subtypes.add(subtype)
    return subtype in _subtypes


def follow(pool):
    """Give each subtype that enters ``pool`` series of its own."""
    pool.on_transition(_observe)


def _observe(before, after):
    # Called under the pool's lock: a set lookup, and rarely an add.
    if before is None:
        add_subtype(after.subtype)


def _label(subtype):
    return subtype if subtype in _subtypes else OTHER_SUBTYPE


def checkout(subtype, hit):
    """Count one check-out of ``subtype``: ``hit`` when an enclave was leased.

    A miss of a subtype that never had a pool counts under OTHER_SUBTYPE.
    """
    if hit:
        # A leased enclave was in the pool: its subtype has had one.
        add_subtype(subtype)
    CHECKOUTS.labels(_label(subtype), "hit" if hit else "miss").inc()


def failed_handoff(subtype):
    """Count one hand-off that failed (reply not sent, or not seen read)."""
    add_subtype(subtype)
    FAILED_HANDOFFS.labels(_label(subtype)).inc()


def refusal(error):
    """Count one request refused with ``error`` (an EpmError)."""
    REFUSALS.labels(_REASONS.get(type(error).__name__, "internal")).inc()


# The same reasons by status number, for refusals that carry only a code.
_REASONS_BY_CODE = {3: "invalid_argument", 5: "not_found", 6: "already_exists",
                    7: "permission_denied", 8: "resource_exhausted",
                    9: "failed_precondition", 14: "unavailable"}


def refusal_code(code):
    """Count one request refused with status number ``code``."""
    REFUSALS.labels(_REASONS_BY_CODE.get(code, "internal")).inc()


def handoff_duration(operation, seconds):
    """Record one hand-off request (check_out, check_in, save_final)."""
    HANDOFF_DURATION.labels(operation).observe(seconds)


def rpc_duration(method, seconds):
    """Record one gRPC call of ``method`` (its full path)."""
    RPC_DURATION.labels(method).observe(seconds)


def build_duration(subtype, backend, seconds):
    """Record one pre-warm build."""
    BUILD_DURATION.labels(subtype, backend).observe(seconds)


def build_failed(subtype):
    """Count one pre-warm build that failed."""
    BUILD_FAILURES.labels(subtype).inc()


def checkout_counts():
    """subtype -> {"hit": n, "miss": n, "failed": n} since the daemon started.

    Subtypes without series of their own are summed under OTHER_SUBTYPE.
    """
    counts = {}
    for family, label in ((CHECKOUTS, None), (FAILED_HANDOFFS, "failed")):
        for metric in family.collect():
            for sample in metric.samples:
                if not sample.name.endswith("_total"):
                    continue
                key = label or sample.labels["result"]
                by = counts.setdefault(sample.labels["subtype"], {})
                by[key] = by.get(key, 0) + int(sample.value)
    return counts


class PoolCollector:
    """Pool sizes by subtype and state, read from the pool at scrape time."""

    def __init__(self, pool):
        self._pool = pool

    def describe(self):
        return [GaugeMetricFamily("epm_pool_enclaves", "", labels=["subtype",
                                                                   "state"])]

    def collect(self):
        family = GaugeMetricFamily(
            "epm_pool_enclaves", "Enclaves in the pool by subtype and state.",
            labels=["subtype", "state"])
        counts = {}
        for entry in self._pool.entries():
            key = (entry.subtype, entry.state.value)
            counts[key] = counts.get(key, 0) + 1
        for (subtype, state), count in sorted(counts.items()):
            family.add_metric([subtype, state], count)
        yield family


class Endpoint:
    """The HTTP server Prometheus scrapes, on its own thread."""

    def __init__(self, host, port, pool):
        self._collector = PoolCollector(pool)
        REGISTRY.register(self._collector)
        try:
            self._server, self._thread = prometheus_client.start_http_server(
                port, addr=host, registry=REGISTRY)
        except BaseException:
            REGISTRY.unregister(self._collector)
            raise
        self.port = self._server.server_address[1]

    def stop(self):
        REGISTRY.unregister(self._collector)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
