"""A client that behaves as the published Go epm client does (DESIGN section 3).

Every call is preceded by Healthz, opens its own connection and has a 1 s
deadline. Run as a script so that check-in and check-out happen in other
processes than the test's:

    legacy_client.py check-in GRPC_SOCKET ID SUBTYPE CONTENT_HEX
    legacy_client.py save-final GRPC_SOCKET ID SUBTYPE
    legacy_client.py check-out GRPC_SOCKET ID SUBTYPE [LATE_SECONDS]

A check-out prints the cache ID it got and the hex of the mapped memory.
Exit code 3 means the call failed; its status code is on stderr.
"""

import array
import ctypes
import fcntl
import os
import socket
import sys
import threading

import grpc

from epm_api import v1alpha1_pb2 as pb
from epm_api import v1alpha1_pb2_grpc as pb_grpc

POOL = "enclave-cache-pool"
DEADLINE = 1.0
SIZE = 8192
# Far from where CPython's heap and libraries land.
BASE = 0x3_0000_0000
_MAP_SHARED = 0x01
_MAP_FIXED_NOREPLACE = 0x100000
_PROT = {"read": 0x1, "write": 0x2, "execute": 0x4}


def call(grpc_socket, method, request):
    """Healthz, then ``method``, each on a new connection with a 1 s deadline."""
    for name, req in (("Healthz", pb.HealthzRequest(type=POOL)), (method, request)):
        with grpc.insecure_channel(f"unix:{grpc_socket}") as channel:
            stub = pb_grpc.EnclavePoolManagerStub(channel)
            response = getattr(stub, name)(req, timeout=DEADLINE)
    return response


def layout():
    return pb.Enclave(nr=1, layout=[pb.Enclavelayout(
        addr=BASE, size=SIZE, prot=pb.EnclavePerms(read=True, write=True,
                                                   share=True))])


def check_in(grpc_socket, cache_id, subtype, content):
    fd = os.memfd_create("enclave", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, SIZE)
    os.pwrite(fd, content, 0)
    fcntl.fcntl(fd, 1033, 0x2 | 0x4)  # F_ADD_SEALS: SHRINK | GROW
    cache = pb.Cache(type=POOL, subType=subtype, ID=cache_id)
    cache.options.Pack(layout())
    call(grpc_socket, "SaveCache", pb.SaveCacheRequest(cache=cache))
    path = os.path.join(os.path.dirname(grpc_socket), cache_id)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(path)
        sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", [fd]).tobytes())])


def save_final(grpc_socket, cache_id, subtype):
    call(grpc_socket, "SaveFinalCache", pb.SaveCacheRequest(
        cache=pb.Cache(type=POOL, subType=subtype, ID=cache_id)))


def check_out(grpc_socket, cache_id, subtype, late=0.0):
    """Listen on <dir>/<ID> (``late`` seconds after sending GetCache)."""
    path = os.path.join(os.path.dirname(grpc_socket), cache_id)
    request = pb.GetCacheRequest(type=POOL, subType=subtype, ID=cache_id)
    result = {}

    def get():
        try:
            result["response"] = call(grpc_socket, "GetCache", request)
        except grpc.RpcError as e:
            result["error"] = e

    listener = None
    if not late:
        listener = _listen(path)
    caller = threading.Thread(target=get)
    caller.start()
    if late:
        threading.Event().wait(late)
        listener = _listen(path)
    try:
        conn = _accept(listener, caller)
    finally:
        os.unlink(path)
        listener.close()
    caller.join(5)
    if "error" in result:
        raise result["error"]
    if conn is None:
        print("none")
        return
    with conn:
        data, ancdata, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(4))
    fd = array.array("i", ancdata[0][2])[0]
    assert data == b"\0"
    enclave = pb.Enclave()
    assert result["response"].cache.options.Unpack(enclave)
    print(result["response"].cache.ID, _map(fd, enclave).hex())


def _accept(listener, caller):
    """The daemon's connection, or None once GetCache answered without one.

    The daemon sends before it answers, so after the answer one more try
    finds any connection already queued.
    """
    listener.settimeout(0.05)
    for _ in range(100):
        done = not caller.is_alive()
        try:
            return listener.accept()[0]
        except TimeoutError:
            if done:
                return None
    return None


def _listen(path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    return listener


def _map(fd, enclave):
    """Map each layout entry at its address, as the published client does."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int, ctypes.c_long]
    first = None
    for item in enclave.layout:
        prot = sum(bit for name, bit in _PROT.items() if getattr(item.prot, name))
        addr = libc.mmap(item.addr, item.size, prot,
                         _MAP_SHARED | _MAP_FIXED_NOREPLACE, fd, 0)
        if addr != item.addr:
            raise OSError(ctypes.get_errno(), f"mmap at {item.addr:#x} failed")
        first = first or addr
    return ctypes.string_at(first, 64).rstrip(b"\0")


def main(argv):
    action, grpc_socket, cache_id, subtype, *rest = argv
    try:
        if action == "check-in":
            check_in(grpc_socket, cache_id, subtype, bytes.fromhex(rest[0]))
        elif action == "save-final":
            save_final(grpc_socket, cache_id, subtype)
        else:
            check_out(grpc_socket, cache_id, subtype, float(rest[0]) if rest else 0)
    except grpc.RpcError as e:
        print(e.code().name, e.details(), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
