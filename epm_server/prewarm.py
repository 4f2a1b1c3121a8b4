"""Pre-warmed pools: enclaves built from registered images ahead of demand.

Each ``[[prewarm]]`` table of the config names an image directory
(``encl.bin`` and ``encl.ss``), a subtype, a backend and a target count. A
few builder threads (one per CPU, at most ``MAX_BUILDERS``) keep the number
of available enclaves of that identity at the target; a check-out wakes them
to refill. Targets change at run time through the admin service.

The skeleton does the building (DESIGN section 2): its backends return an
initialized enclave whose fd the pool then owns.
"""

import os
import threading
import time

import structlog

from epm_server import metrics
from epm_server.enclave import Identity, LayoutEntry
from epm_server.errors import EpmError, InvalidArgument, NotFound, shown
from epm_server.pool import State

log = structlog.get_logger(__name__)

MAX_BUILDERS = 2
# A failed build is retried after this long: a broken image or a host
# without the device must not spin a CPU.
_RETRY_S = 5.0
MAX_TARGET = 4096


class _Target:
    """One registered image and how many of its enclaves to keep."""

    def __init__(self, spec):
        self.spec = spec
        self.count = spec.count
        self.building = 0
        self.image = None
        self.identity = None
        self.failed_at = None


class Prewarmer:
    """Keeps each registered image's available enclaves at its target count."""

    def __init__(self, pool, specs, builders=None):
        self._pool = pool
        self._targets = {spec.subtype: _Target(spec) for spec in specs}
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
        """A list of (spec, target count, available, building) per subtype."""
        with self._cond:
            found = [(t.spec, t.count, t.building) for t in self._targets.values()]
        return [(spec, count, self._available(spec.subtype), building)
                for spec, count, building in found]

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
                target.failed_at = time.monotonic()
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
                target.failed_at = time.monotonic()
            return
        log.info("enclave_prewarmed", subtype=spec.subtype, id=entry_id,
                 backend=spec.backend, took_ms=round(took * 1000, 2))

    def _build_enclave(self, target):
        # Imported here: a daemon without [[prewarm]] never loads the
        # skeleton and its cffi module.
        from skeleton.backends import get_backend
        from skeleton.image import load_image
        spec = target.spec
        if target.image is None:
            image = load_image(spec.image)
            ident = image.identity(spec.backend)
            target.image = image
            target.identity = Identity(
                mrenclave=bytes(ident.mrenclave), mrsigner=bytes(ident.mrsigner),
                attributes=ident.attributes, xfrm=ident.xfrm, size=ident.size,
                backend=ident.backend)
        enclave = get_backend(spec.backend).build(target.image)
        # The backend may narrow attributes and XFRM to the host's; the
        # pooled identity is what the enclave really has.
        ident = enclave.identity
        target.identity = Identity(
            mrenclave=bytes(ident.mrenclave), mrsigner=bytes(ident.mrsigner),
            attributes=ident.attributes, xfrm=ident.xfrm, size=ident.size,
            backend=ident.backend)
        return enclave
