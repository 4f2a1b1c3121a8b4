"""At start, make the bundle caches' records and their directories agree.

A daemon killed during a save leaves a staged copy in ``root/.tmp``, or (if
it died between the rename and the commit) a cache directory with no
record; an operator may have removed a cache's data by hand. A cache whose
data is a symlink (an older daemon saved a symlinked ``sourcePath`` as the
link itself) is dropped too: loading it would put that link at the target. Each repair is
logged, and the list of them returned, so that nothing vanishes silently.
"""

import os
import stat

import structlog

from epm_server import safecopy
from epm_server.bundle import BUNDLE_TYPES, DATA, TMP_DIR, opened_dir

log = structlog.get_logger(__name__)


def reconcile(root, records):
    """Drop records without data (or with a symlink for data), data without
    records, and staged copies.

    Returns a list of (what, path) pairs, one per repair.
    """
    repairs = []
    os.makedirs(os.path.join(root, TMP_DIR), mode=0o700, exist_ok=True)
    with opened_dir(os.path.join(root, TMP_DIR)) as tmp:
        for name in sorted(os.listdir(tmp)):
            safecopy.remove_tree(tmp, name)
            repairs.append(("unfinished_save_removed", f"{TMP_DIR}/{name}"))

    kept = {}
    # Parents before children: a shorter path is never a descendant.
    for record in sorted(records.list(), key=lambda r: r.path.count("/")):
        parent = (record.parent_type, record.parent_id)
        data = safecopy.lstat_at(None, os.path.join(root, record.path, DATA))
        if record.parent_id and parent not in kept:
            what = "record_without_parent_dropped"
        elif data is None:
            what = "record_without_data_dropped"
        elif not (stat.S_ISDIR(data.st_mode) or stat.S_ISREG(data.st_mode)):
            # Saved by a daemon that copied a symlinked sourcePath as a link.
            what = "record_with_symlink_data_dropped"
        else:
            kept[(record.type, record.id)] = record
            continue
        records.delete(record.type, record.id)
        repairs.append((what, record.path))

    expected = {r.path for r in kept.values()}
    _prune(root, "", expected, repairs)
    for what, path in repairs:
        log.warning("bundle_cache_repaired", repair=what, path=path)
    log.info("bundle_caches_reconciled", caches=len(kept), repairs=len(repairs))
    return repairs


def _prune(root, relative, expected, repairs):
    """Remove cache directories under ``relative`` that no record names."""
    base = os.path.join(root, relative) if relative else root
    for pool_type in BUNDLE_TYPES:
        type_dir = os.path.join(base, pool_type)
        if not os.path.isdir(type_dir) or os.path.islink(type_dir):
            continue
        with opened_dir(type_dir) as fd:
            for name in sorted(os.listdir(fd)):
                path = f"{relative}/{pool_type}/{name}".lstrip("/")
                if path in expected:
                    _prune(root, path, expected, repairs)
                else:
                    safecopy.remove_tree(fd, name)
                    repairs.append(("data_without_record_removed", path))

