"""Who may reach the daemon: directory and socket modes, owners, peer policy.

Tests run as root here; a forked child drops to another uid to be refused.
"""

import errno
import os
import socket
import time

import pytest

from epm_api import framing
from epm_api import handoff_pb2 as hpb
from test_handoff import identity

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root to own files and drop uids")

GROUP = 4321
NO_ACCESS = 200  # connect() refused by the file system
CLOSED = 201


def check_out_as(daemon, uid, gid, groups):
    """Fork, become ``uid``/``gid``/``groups``, ask for a check-out.

    Returns the reply's code, NO_ACCESS, or CLOSED.
    """
    # pytest's temporary directories are root's alone: the child reaches the
    # run directory through a descriptor opened before it drops privileges.
    run_dir = os.open(daemon.run_dir, os.O_PATH)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 255
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(f"/proc/self/fd/{run_dir}/epm-handoff.sock")
            except PermissionError:
                code = NO_ACCESS
            else:
                request = hpb.HandoffRequest(check_out=hpb.CheckOut(
                    subtype="skeleton-0.0.0", identity=identity()))
                try:
                    framing.send_frame(sock, request.SerializeToString(),
                                       time.monotonic() + 5)
                except OSError as e:
                    if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                        raise
                frame = framing.recv_frame(sock, time.monotonic() + 5)
                code = CLOSED if frame is None else \
                    hpb.HandoffReply.FromString(frame[0]).code
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    os.close(run_dir)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    return got[0]


def test_runtime_dir_and_sockets_belong_to_the_configured_owner(make_daemon):
    daemon = make_daemon(f"uid = 65534\ngid = {GROUP}\n")

    for path, mode in ((daemon.run_dir, 0o1770), (daemon.grpc_socket, 0o660),
                       (daemon.handoff_socket, 0o660)):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (65534, GROUP), path
        assert st.st_mode & 0o7777 == mode, path


def test_member_of_the_configured_group_is_served(make_daemon):
    daemon = make_daemon(f"gid = {GROUP}\n")
    assert check_out_as(daemon, 1234, GROUP, []) == 0


def test_others_cannot_even_reach_the_socket(make_daemon):
    daemon = make_daemon(f"gid = {GROUP}\n")
    assert check_out_as(daemon, 1235, 1235, []) == NO_ACCESS


def test_listed_uid_is_served_and_unlisted_uid_refused(make_daemon):
    """Both pass the file system (a supplementary group); the policy decides."""
    daemon = make_daemon(f"gid = {GROUP}\n[handoff]\nallowed_uids = [1234]\n")

    assert check_out_as(daemon, 1234, 999, [GROUP]) == 0
    assert check_out_as(daemon, 1236, 999, [GROUP]) == 7
    assert "handoff_peer_refused" in daemon.log.read_text()


def test_listed_gid_is_served(make_daemon):
    daemon = make_daemon(f"gid = {GROUP}\n[handoff]\nallowed_gids = [777]\n")
    assert check_out_as(daemon, 1237, 777, [GROUP]) == 0
