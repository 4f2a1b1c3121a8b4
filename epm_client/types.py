"""Plain values shared by the client, the skeleton and epmctl.

They are named tuples rather than dataclasses: the PAL imports them in every
container it starts, and importing dataclasses costs about 12 ms there (it
pulls in inspect, ast and tokenize). ``_replace`` makes a changed copy.
"""

import collections
import mmap

ENCLAVE_POOL = "enclave-cache-pool"
ENCLAVE_TYPE_URL = "type.googleapis.com/v1alpha1.Enclave"


class Identity(collections.namedtuple(
        "Identity", "mrenclave mrsigner attributes xfrm size backend")):
    """What makes two enclaves interchangeable for a container."""

    __slots__ = ()

    def to_proto(self):
        pb = _stubs()
        return pb.EnclaveIdentity(
            mrenclave=self.mrenclave, mrsigner=self.mrsigner,
            attributes=self.attributes, xfrm=self.xfrm, size=self.size,
            backend=self.backend)

    @classmethod
    def from_proto(cls, msg):
        return cls(mrenclave=bytes(msg.mrenclave), mrsigner=bytes(msg.mrsigner),
                   attributes=msg.attributes, xfrm=msg.xfrm, size=msg.size,
                   backend=msg.backend)


class LayoutEntry(collections.namedtuple(
        "LayoutEntry", "addr size read write execute share private",
        defaults=(True, True, False, True, False))):
    """One range of the enclave: where it is mapped and with what protection."""

    __slots__ = ()

    @property
    def prot(self):
        """The PROT_* bits for mmap."""
        return ((mmap.PROT_READ if self.read else 0)
                | (mmap.PROT_WRITE if self.write else 0)
                | (mmap.PROT_EXEC if self.execute else 0))

    @property
    def flags(self):
        """The MAP_SHARED or MAP_PRIVATE bit for mmap."""
        return mmap.MAP_PRIVATE if self.private else mmap.MAP_SHARED

    def to_proto(self):
        pb = _stubs()
        return pb.Enclavelayout(addr=self.addr, size=self.size, prot=pb.EnclavePerms(
            read=self.read, write=self.write, execute=self.execute,
            share=self.share, private=self.private))

    @classmethod
    def from_proto(cls, msg):
        p = msg.prot
        return cls(addr=msg.addr, size=msg.size, read=p.read, write=p.write,
                   execute=p.execute, share=p.share, private=p.private)


def enclave_to_proto(layout, identity, fd=-1, state=""):
    """An ``Enclave`` message for a layout and identity."""
    pb = _stubs()
    return pb.Enclave(fd=fd, nr=len(layout),
                      layout=[entry.to_proto() for entry in layout],
                      identity=identity.to_proto() if identity else None,
                      state=state)


def _stubs():
    # The protobuf runtime is imported only by what needs messages: the
    # PAL's launch path encodes its few messages itself (epm_client.wire).
    from epm_api import v1alpha1_pb2
    return v1alpha1_pb2
