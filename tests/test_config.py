"""The config file: defaults, every key checked, errors that name the key."""

import pytest

from epm_server import config
from epm_server.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_missing_default_file_means_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    cfg = config.load()
    assert cfg.grpc_address == "/var/run/epm/epm.sock"
    assert cfg.handoff_path == "/var/run/epm/epm-handoff.sock"
    assert cfg.root == "/var/local/epm"
    assert (cfg.timeout, cfg.idle_timeout) == (5.0, 60.0)
    assert cfg.uid is None and cfg.gid is None
    assert cfg.allowed_roots == () and cfg.legacy_accept_timeout == 10.0
    assert (cfg.max_connections, cfg.max_connections_per_uid) == (64, 16)
    assert cfg.legacy_max_pending == 16


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(str(tmp_path / "absent.toml"))


def test_all_keys_are_read(tmp_path):
    cfg = config.load(write(tmp_path, """
root = "/srv/epm"
db_path = "/srv/epm/epm.db"
db_timeout = 3
uid = 1000
gid = 1001
max_recv_message_size = 1024
[grpc]
address = "/run/x/epm.sock"
max_send_message_size = 2048
max_connections = 100
handshake_timeout = 2
[handoff]
address = "/run/y/h.sock"
allowed_uids = [5, 6]
allowed_gids = [7]
timeout = 0.5
idle_timeout = 9
max_connections = 32
max_connections_per_uid = 4
[pool]
max_total = 10
max_per_identity = 2
[legacy]
accept_timeout = 2.5
max_pending = 3
[bundle]
allowed_roots = ["/srv/bundles", "/run/rune"]
"""))
    assert cfg.root == "/srv/epm" and cfg.db_timeout == 3.0
    assert (cfg.uid, cfg.gid) == (1000, 1001)
    assert (cfg.max_recv_message_size, cfg.max_send_message_size) == (1024, 2048)
    assert cfg.socket_dir == "/run/x"
    assert cfg.handoff_path == "/run/y/h.sock"
    assert cfg.allowed_uids == (5, 6) and cfg.allowed_gids == (7,)
    assert (cfg.timeout, cfg.idle_timeout) == (0.5, 9.0)
    assert (cfg.max_total, cfg.max_per_identity) == (10, 2)
    assert cfg.legacy_accept_timeout == 2.5 and cfg.legacy_max_pending == 3
    assert (cfg.max_connections, cfg.max_connections_per_uid) == (32, 4)
    assert (cfg.grpc_max_connections, cfg.grpc_handshake_timeout) == (100, 2.0)
    assert cfg.allowed_roots == ("/srv/bundles", "/run/rune")


def test_handoff_socket_defaults_beside_grpc_socket(tmp_path):
    cfg = config.load(write(tmp_path, '[grpc]\naddress = "/tmp/a/epm.sock"\n'))
    assert cfg.handoff_path == "/tmp/a/epm-handoff.sock"


@pytest.mark.parametrize("text, message", [
    ("[grpc]\naddress = 3\n", "grpc.address: expected a string, got 3"),
    ("colour = 1\n", "colour: unknown key"),
    ("[grpc]\nport = 1\n", "grpc.port: unknown key"),
    ("[pool]\nmax_total = 0\n", "pool.max_total: expected a positive integer"),
    ("uid = true\n", "uid: expected an integer from 0 to 4294967294"),
    ("[handoff]\ntimeout = -1\n", "handoff.timeout: expected a finite positive"),
    ("[handoff]\nallowed_uids = [1, \"x\"]\n", "handoff.allowed_uids[1]"),
    ("grpc = 1\n", "grpc: expected a table"),
    ("root = \"relative\"\n", "root: expected an absolute path"),
    ("uid = 1\n[grpc]\nuid = 2\n", "grpc.uid: set twice"),
    ("[grpc\n", "invalid TOML"),
    ("[bundle]\nallowed_roots = \"/srv\"\n", "bundle.allowed_roots: expected a list"),
    ("[bundle]\nallowed_roots = [\"rel\"]\n", "bundle.allowed_roots[0]: expected"),
    ("[bundle]\nallowed_roots = [\"/\"]\n", "bundle.allowed_roots[0]: / would"),
    ("[legacy]\naccept_timeout = 0\n", "legacy.accept_timeout: expected a finite"),
    ("[handoff]\ntimeout = nan\n", "handoff.timeout: expected a finite positive"),
    ("[handoff]\nidle_timeout = inf\n", "handoff.idle_timeout: expected a finite"),
    ("db_timeout = -inf\n", "db_timeout: expected a finite positive"),
    ("[legacy]\naccept_timeout = nan\n", "legacy.accept_timeout: expected a finite"),
    ("uid = 99999999999\n", "uid: expected an integer from 0 to 4294967294"),
    ("[grpc]\ngid = 4294967295\n", "grpc.gid: expected an integer from 0 to"),
    ("gid = -1\n", "gid: expected an integer from 0 to 4294967294"),
    ("max_recv_message_size = 99999999999\n",
     "max_recv_message_size: expected a size from 1 to 2147483647"),
    ("[grpc]\nmax_send_message_size = 0\n", "grpc.max_send_message_size: expected"),
    ("[handoff]\nmax_connections = 0\n", "handoff.max_connections: expected a pos"),
    ("[grpc]\nmax_connections = 0\n", "grpc.max_connections: expected a pos"),
    ("[grpc]\nhandshake_timeout = -1\n", "grpc.handshake_timeout: "),
    ("[handoff]\nmax_connections_per_uid = -2\n",
     "handoff.max_connections_per_uid: expected a positive integer"),
    ("[legacy]\nmax_pending = 0\n", "legacy.max_pending: expected a positive"),
    ("root = \"/a\\u0000b\"\n", "root: contains a NUL character"),
    ('[grpc]\naddress = "/run/e/epm.sock"\n[handoff]\naddress = "/run/e/epm.sock"\n',
     "handoff.address: /run/e/epm.sock is the gRPC socket's address too"),
    ('[grpc]\naddress = "/run/e/h.sock"\n[handoff]\naddress = "/run/e/./h.sock"\n',
     "handoff.address: .* is the gRPC socket's address too"),
])
def test_bad_value_is_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        config.load(write(tmp_path, text))


def test_non_utf8_file_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_bytes(b'root = "/srv/\xff"\n')
    with pytest.raises(ConfigError, match=f"{path}: not UTF-8"):
        config.load(str(path))


def test_unreadable_file_is_one_error_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"cannot read config file {tmp_path}"):
        config.load(str(tmp_path))


@pytest.mark.parametrize("table, key, path, what", [
    ("grpc", "grpc.address", "/" + "a" * 100 + "/epm.sock", "the path"),
    ("handoff", "handoff.address", "/" + "h" * 110, "the path"),
    # 104 bytes fit, but epm-handoff.sock beside them does not.
    ("grpc", "grpc.address", "/" + "g" * 94 + "/epm.sock",
     "the hand-off socket beside it"),
])
def test_a_socket_path_too_long_for_bind_is_named(table, key, path, what):
    """sun_path holds 107 bytes and a NUL: refused at load, naming the key."""
    with pytest.raises(ConfigError, match=f"^{key}: {what} is [0-9]+ bytes long; "
                       "a Unix socket path is at most 107 bytes$"):
        config.parse({table: {"address": path}})


def test_a_socket_path_of_107_bytes_is_accepted():
    path = "/" + "a" * 89 + "/epm.sock"
    assert len(path) == 99
    handoff = "/" + "b" * 106
    cfg = config.parse({"grpc": {"address": path},
                        "handoff": {"address": handoff}})
    assert cfg.handoff_path == handoff
