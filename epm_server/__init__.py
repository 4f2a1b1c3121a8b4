"""The epm daemon.

``main`` is the entry point (console script ``epm``). The core is plain
Python: ``pool`` (entries and their states), ``enclave`` and ``fdcheck``
(what may enter the pool), ``handoff`` (our socket), ``legacy`` (published
clients' per-ID sockets), ``reaper`` (held enclaves of dead owners),
``bundle`` (directory caches, with ``records`` in sqlite3, ``safecopy`` for
client-named paths and ``reconcile`` at start), ``ids`` (allowed cache IDs).
``service`` is the thin gRPC adapter; ``errors`` maps failures to codes.
"""
