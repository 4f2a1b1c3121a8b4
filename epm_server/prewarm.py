"""Pre-warmed pools: enclaves built from registered images ahead of demand.

Each ``[[prewarm]]`` table of the config names an image directory
(``encl.bin`` and ``encl.ss``), a subtype, a backend and a target count. A
few builder threads (one per CPU, at most ``MAX_BUILDERS``) keep the number
of available enclaves of that identity at the target; a check-out wakes them
to refill. Targets change at run time through the admin service.

The skeleton does the building (DESIGN section 2): its backends return an
initialized enclave whose fd the pool then owns.

Each image is read and checked at start (``load_verified``: its SIGSTRUCT
must verify and match the image's measurement), and the daemon does not
start without it. Builds reuse that reading; after a failed build the image
is read and checked again, so a file repaired in place is picked up, but an
image whose measurement changed since the start is refused: the pool's
recycling rules were set for the identity the daemon started with.
"""

import collections
import os
import threading
import time

import structlog

from epm_server import metrics
from epm_server.enclave import Identity, LayoutEntry
from epm_server.errors import (EpmError, FailedPrecondition, InvalidArgument,
                               NotFound, shown)
from epm_server.pool import State

log = structlog.get_logger(__name__)

MAX_BUILDERS = 2
# A failed build is retried after this long: a broken image or a host
# without the device must not spin a CPU.
_RETRY_S = 5.0
MAX_TARGET = 4096


def load_verified(spec):
    """Read ``spec``'s image and check its SIGSTRUCT as EINIT would.

    Returns (EnclaveImage, Identity). Raises SkeletonError naming the file,
    or why the SIGSTRUCT does not launch the image (its signature does not
    verify, its MRENCLAVE is not the image's measurement, ...).
    """
    # Imported here: a daemon without [[prewarm]] never loads the skeleton.
    from skeleton.backends.sim import einit
    from skeleton.image import load_image
    from skeleton.measure import measure
    image = load_image(spec.image)
    sig = image.sigstruct
    # The sim backend's EINIT checks are hardware's, and need no device:
    # they catch a bad image at start whichever backend builds it. The
    # host's own limits (XCR0, the device) are left to the builds.
    einit(image, measure(image.data, image.geometry), sig.attributes, sig.xfrm,
          sig.miscselect)
    return image, _identity(image.identity(spec.backend))


def _identity(ident):
    return Identity(mrenclave=bytes(ident.mrenclave), mrsigner=bytes(ident.mrsigner),
                    attributes=ident.attributes, xfrm=ident.xfrm, size=ident.size,
                    backend=ident.backend)


# What ``Prewarmer.targets`` reports of one pre-warmed pool. ``failures``
# counts the builds that failed since the last one that worked (0: the last
# worked); ``last_error`` and ``last_error_at`` (unix seconds) describe the
# latest failure, even after a later build worked.
PrewarmStatus = collections.namedtuple(
    "PrewarmStatus", "spec target available building failures last_error "
    "last_error_at")


class _Target:
    """One registered image and how many of its enclaves to keep."""

    def __init__(self, spec, image=None, identity=None):
        self.spec = spec
        self.count = spec.count
        self.building = 0
        self.image = image
        self.identity = identity
        # The measurement the daemon started with; a re-read image must keep it.
        self.started_with = identity
        self.failed_at = None
        self.failures = 0
        self.last_error = ""
        self.last_error_at = 0


class Prewarmer:
    """Keeps each registered image's available enclaves at its target count."""

    def __init__(self, pool, specs, builders=None, images=None):
        """``images`` maps a subtype to the (image, identity) that
        ``load_verified`` returned at start; others are read at their first
        build."""
        self._pool = pool
        images = images or {}
        self._targets = {spec.subtype: _Target(spec, *images.get(spec.subtype,
                                                                 (None, None)))
                         for spec in specs}
        for subtype in self._targets:
            metrics.add_subtype(subtype)
        self._cond = threading.Condition()
        self._stopping = False
        count = builders or min(os.cpu_count() or 1, MAX_BUILDERS)
        self._threads = [threading.Thread(target=self._run, name=f"prewarm-{i}",
                                          daemon=True) for i in range(count)]

    def start(self):
        if self._targets:
            for thread in self._threads:
                thread.start()

    def stop(self):
        """Stop building; a build in progress finishes and is pooled or closed."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join()

    def wake(self):
        """Something left the pool: look at the targets again."""
        with self._cond:
            self._cond.notify_all()

    def targets(self):
        """A PrewarmStatus per pre-warmed subtype."""
        with self._cond:
            found = [(t.spec, t.count, t.building, t.failures, t.last_error,
                      t.last_error_at) for t in self._targets.values()]
        return [PrewarmStatus(spec, count, self._available(spec.subtype),
                              building, failures, error, error_at)
                for spec, count, building, failures, error, error_at in found]

    def set_target(self, subtype, count):
        """Keep ``count`` enclaves of ``subtype``. Raises NotFound, InvalidArgument.

        Lowering a target builds no more; enclaves already pooled stay until
        checked out or flushed.
        """
        if not 0 <= count <= MAX_TARGET:
            raise InvalidArgument(f"count: expected 0 to {MAX_TARGET}, got {count}")
        with self._cond:
            target = self._targets.get(subtype)
            if target is None:
                raise NotFound(f"subtype {shown(subtype, quoted=True)} has no "
                               "[[prewarm]] image in the config")
            target.count = count
            target.failed_at = None
            self._cond.notify_all()
        log.info("prewarm_target_set", subtype=subtype, count=count)

    def _available(self, subtype):
        return len(self._pool.entries(subtype=subtype, states={State.AVAILABLE}))

    def _run(self):
        while True:
            with self._cond:
                target = self._next_job()
                while target is None and not self._stopping:
                    # Woken by check-outs; the timeout retries failed builds.
                    self._cond.wait(1.0)
                    target = self._next_job()
                if self._stopping:
                    return
                target.building += 1
            try:
                self._build(target)
            finally:
                with self._cond:
                    target.building -= 1

    def _next_job(self):
        """A target short of enclaves, counting builds in flight; or None.

        Called with the condition's lock held.
        """
        now = time.monotonic()
        for target in self._targets.values():
            if target.failed_at is not None and now - target.failed_at < _RETRY_S:
                continue
            if self._available(target.spec.subtype) + target.building < target.count:
                return target
        return None

    def _build(self, target):
        spec = target.spec
        start = time.perf_counter()
        try:
            enclave = self._build_enclave(target)
        except Exception as e:
            metrics.build_failed(spec.subtype)
            log.warning("prewarm_build_failed", subtype=spec.subtype,
                        image=spec.image, reason=str(e))
            with self._cond:
                self._failed(target, str(e))
                # Read the image again next time: it may have been repaired.
                target.image = None
            return
        took = time.perf_counter() - start
        metrics.build_duration(spec.subtype, spec.backend, took)
        try:
            fd = os.dup(enclave.fd)
        finally:
            enclave.close()
        layout = tuple(LayoutEntry(addr=e.addr, size=e.size, read=e.read,
                                   write=e.write, execute=e.execute,
                                   share=e.share, private=e.private)
                       for e in enclave.layout)
        try:
            entry_id = self._pool.check_in(spec.subtype, target.identity, layout,
                                           fd, owner=None, origin="prewarm")
            self._pool.save_final(entry_id)
        except EpmError as e:
            os.close(fd)
            log.info("prewarm_not_pooled", subtype=spec.subtype, reason=str(e))
            with self._cond:
                self._failed(target, f"built but not pooled: {e}")
            return
        with self._cond:
            target.failures = 0
        log.info("enclave_prewarmed", subtype=spec.subtype, id=entry_id,
                 backend=spec.backend, took_ms=round(took * 1000, 2))

    @staticmethod
    def _failed(target, reason):
        """Record a failure of ``target``; called with the lock held."""
        target.failed_at = time.monotonic()
        target.failures += 1
        target.last_error = reason
        target.last_error_at = int(time.time())

    def _build_enclave(self, target):
        # Imported here: a daemon without [[prewarm]] never loads the
        # skeleton and its cffi module.
        from skeleton.backends import get_backend
        spec = target.spec
        if target.image is None:
            image, identity = load_verified(spec)
            was = target.started_with
            if was is not None and (identity.mrenclave, identity.mrsigner) != (
                    was.mrenclave, was.mrsigner):
                raise FailedPrecondition(
                    f"{spec.image} changed since the daemon started (MRENCLAVE "
                    f"{was.mrenclave.hex()[:16]} -> {identity.mrenclave.hex()[:16]}"
                    f", MRSIGNER {was.mrsigner.hex()[:16]} -> "
                    f"{identity.mrsigner.hex()[:16]}); restart epm to pre-warm it")
            target.image, target.identity = image, identity
            if target.started_with is None:
                target.started_with = identity
        enclave = get_backend(spec.backend).build(target.image)
        # The backend may narrow attributes and XFRM to the host's; the
        # pooled identity is what the enclave really has.
        target.identity = _identity(enclave.identity)
        return enclave
