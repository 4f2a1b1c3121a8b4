"""The daemon's configuration: ``/etc/epm/config.toml`` read with tomllib.

Keys follow the published daemon (``root``, ``db_path``, ``db_timeout``,
``[grpc] address``, ``uid``, ``gid``, ``max_recv_message_size``,
``max_send_message_size``); the published file is containerd-shaped, so the
last four are accepted at the top level and inside ``[grpc]``.
``[handoff]``, ``[legacy]``, ``[pool]``, ``[bundle]``, ``[metrics]`` and
``[[prewarm]]`` are ours. Every key
is checked; an error names it.
"""

import dataclasses
import ipaddress
import math
import os
import tomllib

from epm_server.errors import ConfigError

DEFAULT_PATH = "/etc/epm/config.toml"
HANDOFF_SOCKET_NAME = "epm-handoff.sock"


@dataclasses.dataclass(frozen=True)
class PrewarmSpec:
    """One ``[[prewarm]]`` table: an image to keep ``count`` enclaves of."""

    image: str
    subtype: str
    backend: str = "sim"
    count: int = 0
    recycle: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated daemon settings; times are in seconds."""

    root: str = "/var/local/epm"
    db_path: str = "/var/local/epm/epm.db"
    db_timeout: float = 10.0
    uid: int | None = None
    gid: int | None = None
    max_recv_message_size: int = 16 * 1024 * 1024
    max_send_message_size: int = 16 * 1024 * 1024
    grpc_address: str = "/var/run/epm/epm.sock"
    grpc_max_connections: int = 256
    grpc_handshake_timeout: float = 5.0
    handoff_address: str | None = None
    allowed_uids: tuple = ()
    allowed_gids: tuple = ()
    timeout: float = 5.0
    idle_timeout: float = 60.0
    max_connections: int = 64
    max_connections_per_uid: int = 16
    max_total: int = 256
    max_per_identity: int = 32
    legacy_accept_timeout: float = 10.0
    legacy_max_pending: int = 16
    # Empty: no client may name a source or target path until the operator
    # says where bundles live; the daemon runs as root.
    allowed_roots: tuple = ()
    # (host, port) of the Prometheus endpoint; None serves no metrics.
    metrics_address: tuple | None = None
    metrics_allow_remote: bool = False
    prewarm: tuple = ()

    @property
    def socket_dir(self):
        """The directory of the gRPC socket, where legacy hand-offs happen."""
        return os.path.dirname(self.grpc_address) or "."

    @property
    def handoff_path(self):
        """The hand-off socket: configured, or beside the gRPC socket."""
        return self.handoff_address or os.path.join(
            self.socket_dir, HANDOFF_SOCKET_NAME)


# uid_t and gid_t are 32 bits; (uid_t)-1 means "unchanged" to chown(2).
MAX_ID = 2 ** 32 - 2
# gRPC message sizes are C ints.
MAX_MESSAGE_SIZE = 2 ** 31 - 1


def _string(key, value):
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if not value:
        raise ConfigError(f"{key}: expected a non-empty string")
    if "\0" in value:
        raise ConfigError(f"{key}: contains a NUL character")
    return value


def _path(key, value):
    value = _string(key, value)
    if not os.path.isabs(value):
        raise ConfigError(f"{key}: expected an absolute path, got {value!r}")
    return value


def _id(key, value):
    # bool is an int in Python; `uid = true` is a mistake, not uid 1.
    if (isinstance(value, bool) or not isinstance(value, int)
            or not 0 <= value <= MAX_ID):
        raise ConfigError(f"{key}: expected an integer from 0 to {MAX_ID}, "
                          f"got {value!r}")
    return value


def _positive_int(key, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    return value


def _message_size(key, value):
    if (isinstance(value, bool) or not isinstance(value, int)
            or not 1 <= value <= MAX_MESSAGE_SIZE):
        raise ConfigError(f"{key}: expected a size from 1 to {MAX_MESSAGE_SIZE} "
                          f"bytes, got {value!r}")
    return value


def _seconds(key, value):
    # nan passes every comparison test as false, and inf never ends a wait.
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{key}: expected a finite positive number of seconds, "
                          f"got {value!r}")
    return float(value)


def _bool(key, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _host_port(key, value):
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port); port 0 is any."""
    value = _string(key, value)
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key}: expected host:port, got {value!r}")
    return host, int(port)


def is_loopback(host):
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _paths(key, value):
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of absolute paths, got {value!r}")
    paths = tuple(_path(f"{key}[{i}]", v) for i, v in enumerate(value))
    for i, path in enumerate(paths):
        if os.path.realpath(path) == "/":
            raise ConfigError(f"{key}[{i}]: / would let clients name any file")
    return paths


def _ids(key, value):
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of integers, got {value!r}")
    return tuple(_id(f"{key}[{i}]", v) for i, v in enumerate(value))


# Table key -> (Config field, parser). "" is the top level.
_GRPC_SHARED = {
    "uid": ("uid", _id),
    "gid": ("gid", _id),
    "max_recv_message_size": ("max_recv_message_size", _message_size),
    "max_send_message_size": ("max_send_message_size", _message_size),
}
_SCHEMA = {
    "": {
        "root": ("root", _path),
        "db_path": ("db_path", _path),
        "db_timeout": ("db_timeout", _seconds),
        **_GRPC_SHARED,
    },
    "grpc": {
        "address": ("grpc_address", _path),
        "max_connections": ("grpc_max_connections", _positive_int),
        "handshake_timeout": ("grpc_handshake_timeout", _seconds),
        **_GRPC_SHARED,
    },
    "handoff": {
        "address": ("handoff_address", _path),
        "allowed_uids": ("allowed_uids", _ids),
        "allowed_gids": ("allowed_gids", _ids),
        "timeout": ("timeout", _seconds),
        "idle_timeout": ("idle_timeout", _seconds),
        "max_connections": ("max_connections", _positive_int),
        "max_connections_per_uid": ("max_connections_per_uid", _positive_int),
    },
    "pool": {
        "max_total": ("max_total", _positive_int),
        "max_per_identity": ("max_per_identity", _positive_int),
    },
    "legacy": {
        "accept_timeout": ("legacy_accept_timeout", _seconds),
        "max_pending": ("legacy_max_pending", _positive_int),
    },
    "bundle": {"allowed_roots": ("allowed_roots", _paths)},
    "metrics": {
        "address": ("metrics_address", _host_port),
        "allow_remote": ("metrics_allow_remote", _bool),
    },
}


def parse(data):
    """Build a Config from a parsed TOML document.

    Raises ConfigError naming the first unknown key or bad value.
    """
    values = {}
    for name, value in data.items():
        if name == "prewarm":
            values["prewarm"] = _prewarm(value)
        elif name in _SCHEMA and name != "":
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a table, got {value!r}")
            _parse_table(name, value, values)
        elif name in _SCHEMA[""]:
            _parse_key("", name, value, values)
        else:
            raise ConfigError(f"{name}: unknown key")
    cfg = Config(**values)
    if (cfg.metrics_address is not None and not cfg.metrics_allow_remote
            and not is_loopback(cfg.metrics_address[0])):
        raise ConfigError(f"metrics.address: {cfg.metrics_address[0]} is not a "
                          "loopback address; set metrics.allow_remote = true to "
                          "serve metrics to other hosts")
    if os.path.normpath(cfg.handoff_path) == os.path.normpath(cfg.grpc_address):
        raise ConfigError(f"handoff.address: {cfg.handoff_path} is the gRPC "
                          "socket's address too")
    _check_socket_path("grpc.address", cfg.grpc_address)
    if cfg.handoff_address is not None:
        _check_socket_path("handoff.address", cfg.handoff_address)
    else:
        _check_socket_path("grpc.address", cfg.handoff_path,
                           "the hand-off socket beside it")
    return cfg


# sockaddr_un.sun_path is 108 bytes on Linux, the terminating NUL included
# (unix(7)); bind(2) refuses a longer path.
MAX_SOCKET_PATH = 107


def _check_socket_path(key, path, what="the path"):
    """Refuse a socket path that bind(2) would refuse, before anything is made."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(f"{key}: {what} is {size} bytes long; a Unix socket "
                          f"path is at most {MAX_SOCKET_PATH} bytes")


# The most a [[prewarm]] count may ask for; the pool's limits still apply.
MAX_PREWARM = 4096
BACKENDS = ("sim", "sgx")


def _prewarm(value):
    """The ``[[prewarm]]`` array of tables -> a tuple of PrewarmSpec."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError("prewarm: expected an array of tables ([[prewarm]])")
    specs = []
    for i, table in enumerate(value):
        key = f"prewarm[{i}]"
        unknown = sorted(set(table) - {"image", "subtype", "backend", "count",
                                       "recycle"})
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: unknown key")
        for required in ("image", "subtype"):
            if required not in table:
                raise ConfigError(f"{key}.{required}: missing")
        image = _path(f"{key}.image", table["image"])
        subtype = _string(f"{key}.subtype", table["subtype"])
        if len(subtype) > 128 or not subtype.isprintable():
            raise ConfigError(f"{key}.subtype: expected 1 to 128 printable "
                              f"characters, got {subtype!r}")
        backend = table.get("backend", "sim")
        if backend not in BACKENDS:
            raise ConfigError(f"{key}.backend: expected one of "
                              f"{', '.join(BACKENDS)}, got {backend!r}")
        count = table.get("count", 0)
        if (isinstance(count, bool) or not isinstance(count, int)
                or not 0 <= count <= MAX_PREWARM):
            raise ConfigError(f"{key}.count: expected an integer from 0 to "
                              f"{MAX_PREWARM}, got {count!r}")
        recycle = _bool(f"{key}.recycle", table.get("recycle", False))
        if any(s.subtype == subtype for s in specs):
            raise ConfigError(f"{key}.subtype: {subtype!r} is pre-warmed twice")
        specs.append(PrewarmSpec(image=image, subtype=subtype, backend=backend,
                                 count=count, recycle=recycle))
    return tuple(specs)


def _parse_table(table, data, values):
    for name, value in data.items():
        if name not in _SCHEMA[table]:
            raise ConfigError(f"{table}.{name}: unknown key")
        _parse_key(table, name, value, values)


def _parse_key(table, name, value, values):
    key = f"{table}.{name}" if table else name
    field, parser = _SCHEMA[table][name]
    if field in values:
        raise ConfigError(f"{key}: set twice (top level and [grpc])")
    values[field] = parser(key, value)


def load(path=None):
    """Read the config file at ``path``, or the default one.

    A missing default file means defaults; a missing explicit file is an
    error. Raises ConfigError for an unreadable file, bad TOML or a bad key.
    """
    explicit = path is not None
    path = path or DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        return Config()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte {e.start})") from None
    try:
        return parse(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
