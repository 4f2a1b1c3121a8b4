// Command epm-go-client times the published clients' path to epm from Go.
//
// The published clients (rune and its PALs) are Go, and the reference
// figures for that path were taken Go client to Go daemon; benchmarks/run.py
// times the same path from Python. This client does, for N rounds on one
// warm gRPC channel:
//
//   - a check-in: SaveCache with an Enclave (its layout) packed in
//     Cache.options, connect to <socket dir>/<ID> and send one byte \0 with
//     the enclave fd in SCM_RIGHTS, then SaveFinalCache, retried while the
//     daemon answers FAILED_PRECONDITION (it has not read the fd yet);
//   - a check-out: listen on <socket dir>/<ID>, GetCache, accept the
//     daemon's connection, receive the fd and map every layout entry at its
//     address, then unmap it (after the clock stops).
//
// The enclave is a sealed memfd, as the sim backend makes them. It prints
// one JSON line of medians and 99th percentiles in microseconds, with a
// Healthz round trip on the same channel for scale. Build with
// `make go-client`; the generated gRPC code lives in build/, not here.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"time"
	"unsafe"

	"github.com/golang/protobuf/proto"
	anypb "github.com/golang/protobuf/ptypes/any"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "epmbench/epm_api"
)

const (
	poolType = "enclave-cache-pool"
	// The type URL the published clients pack their Enclave under; the
	// daemon refuses options of any other type.
	enclaveTypeURL = "type.googleapis.com/v1alpha1.Enclave"
	// Size and layout of run.py's synthetic enclaves (SMALL, SMALL_LAYOUT):
	// a TCS page, then the rest read-write-execute, both shared.
	enclaveSize = 1 << 16
	enclaveBase = 0x200000000000
	pageSize    = 4096
	// Between two SaveFinalCache attempts while the daemon reads the fd:
	// the same pause as run.py's.
	finalRetry = 100 * time.Microsecond
)

type layoutEntry struct {
	addr, size                           uint64
	read, write, execute, share, private bool
}

var smallLayout = []layoutEntry{
	{addr: enclaveBase, size: pageSize, read: true, write: true, share: true},
	{addr: enclaveBase + pageSize, size: enclaveSize - pageSize, read: true,
		write: true, execute: true, share: true},
}

type client struct {
	rpc     pb.EnclavePoolManagerClient
	dir     string
	subtype string
	timeout time.Duration
}

func main() {
	socket := flag.String("socket", "/var/run/epm/epm.sock", "the daemon's gRPC socket")
	dir := flag.String("dir", "", "where the per-ID sockets go (default: the "+
		"gRPC socket's directory)")
	rounds := flag.Int("rounds", 100, "check-in/check-out rounds, and Healthz calls")
	subtype := flag.String("subtype", "bench-legacy-go-1.0",
		"the pool subtype; one of its own, so that no other client's enclave "+
			"is checked out")
	timeout := flag.Duration("timeout", 5*time.Second, "bound on each call and each "+
		"socket operation")
	flag.Parse()
	if *rounds < 1 || *rounds > 1000000 {
		fail("-rounds must be between 1 and 1000000, not %d", *rounds)
	}
	if *timeout < time.Second || *timeout > 5*time.Second {
		fail("-timeout must be between 1s and 5s, not %s", *timeout)
	}
	if *dir == "" {
		*dir = filepath.Dir(*socket)
	}

	conn := dial(*socket, *timeout)
	defer conn.Close()
	c := &client{rpc: pb.NewEnclavePoolManagerClient(conn), dir: *dir,
		subtype: *subtype, timeout: *timeout}

	// The first call on a channel pays for HTTP/2 settings and the first
	// stream; the figures are those of a warm channel.
	if _, err := c.healthz(); err != nil {
		fail("Healthz: %v", err)
	}
	fd := newMemfd()
	checkOut, checkIn := make([]float64, 0, *rounds), make([]float64, 0, *rounds)
	for i := 0; i < *rounds; i++ {
		t0 := time.Now()
		if err := c.checkIn(fd); err != nil {
			fail("round %d: check-in: %v", i, err)
		}
		checkIn = append(checkIn, us(time.Since(t0)))
		// The daemon holds the enclave now; keeping our copy would let the
		// next check-in send the same memory twice.
		unix.Close(fd)
		t1 := time.Now()
		got, layout, err := c.checkOut()
		if err != nil {
			fail("round %d: check-out: %v", i, err)
		}
		mapped, err := mapLayout(got, layout)
		if err != nil {
			fail("round %d: check-out: %v", i, err)
		}
		checkOut = append(checkOut, us(time.Since(t1)))
		unmap(mapped)
		if err := checkMemfd(got); err != nil {
			fail("round %d: check-out: %v", i, err)
		}
		fd = got
	}
	unix.Close(fd)

	calls := make([]float64, 0, *rounds)
	for i := 0; i < *rounds; i++ {
		d, err := c.healthz()
		if err != nil {
			fail("Healthz %d: %v", i, err)
		}
		calls = append(calls, us(d))
	}

	out, _ := json.Marshal(map[string]float64{
		"checkout_us_p50":  median(checkOut),
		"checkout_us_p99":  p99(checkOut),
		"checkin_us_p50":   median(checkIn),
		"checkin_us_p99":   p99(checkIn),
		"grpc_call_us_p50": median(calls),
	})
	fmt.Println(string(out))
}

// dial opens one channel and waits until it is connected, so that a daemon
// that is not there fails here, within the timeout, not in the first round.
func dial(socket string, timeout time.Duration) *grpc.ClientConn {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// This grpc-go (Debian's 1.33) has no unix: resolver: the target is
	// passed through to a dialer of our own.
	dialer := func(ctx context.Context, addr string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", addr)
	}
	// FailOnNonTempDialError: a missing socket or a refused connection is
	// reported as such, not as the deadline it would otherwise retry until.
	conn, err := grpc.DialContext(ctx, "passthrough:///"+socket, grpc.WithInsecure(),
		grpc.WithContextDialer(dialer), grpc.WithBlock(),
		grpc.FailOnNonTempDialError(true))
	if err != nil {
		fail("cannot connect to %s: %v", socket, err)
	}
	return conn
}

func (c *client) healthz() (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	t := time.Now()
	_, err := c.rpc.Healthz(ctx, &pb.HealthzRequest{})
	return time.Since(t), err
}

func (c *client) checkIn(fd int) error {
	id := newID()
	value, err := proto.Marshal(&pb.Enclave{Nr: int64(len(smallLayout)),
		Layout: layoutProto(smallLayout)})
	if err != nil {
		return err
	}
	cache := &pb.Cache{Type: poolType, SubType: c.subtype, ID: id,
		Options: &anypb.Any{TypeUrl: enclaveTypeURL, Value: value}}
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	_, err = c.rpc.SaveCache(ctx, &pb.SaveCacheRequest{Cache: cache})
	cancel()
	if err != nil {
		return fmt.Errorf("SaveCache: %w", err)
	}
	if err := c.sendFd(filepath.Join(c.dir, id), fd); err != nil {
		return err
	}
	// The daemon takes the fd on a thread of its own; until it has, the
	// entry is pending and SaveFinalCache is refused. The published client
	// calls it much later (at pal_destroy); here the wait is in the figure.
	final := &pb.SaveCacheRequest{Cache: &pb.Cache{Type: poolType,
		SubType: c.subtype, ID: id}}
	deadline := time.Now().Add(c.timeout)
	for {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		_, err := c.rpc.SaveFinalCache(ctx, final)
		cancel()
		if err == nil {
			return nil
		}
		if status.Code(err) != codes.FailedPrecondition || time.Now().After(deadline) {
			return fmt.Errorf("SaveFinalCache: %w", err)
		}
		time.Sleep(finalRetry)
	}
}

func (c *client) sendFd(path string, fd int) error {
	d := net.Dialer{Timeout: c.timeout}
	conn, err := d.Dial("unix", path)
	if err != nil {
		return err
	}
	defer conn.Close()
	uc := conn.(*net.UnixConn)
	if err := uc.SetDeadline(time.Now().Add(c.timeout)); err != nil {
		return err
	}
	n, oobn, err := uc.WriteMsgUnix([]byte{0}, unix.UnixRights(fd), nil)
	if err != nil {
		return fmt.Errorf("sending the fd to %s: %w", path, err)
	}
	if n != 1 || oobn == 0 {
		return fmt.Errorf("sending the fd to %s: short write", path)
	}
	return nil
}

type reply struct {
	resp *pb.GetCacheResponse
	err  error
}

// checkOut returns the enclave fd the daemon sent and the layout it named.
func (c *client) checkOut() (int, []*pb.Enclavelayout, error) {
	id := newID()
	path := filepath.Join(c.dir, id)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return -1, nil, err
	}
	// The receiver unlinks the path; Close does, as ListenUnix bound it.
	defer ln.Close()
	// GetCache runs beside the accept: the daemon connects and sends the fd
	// while the call is in flight, and may answer before or after we read.
	if err := ln.SetDeadline(time.Now().Add(c.timeout)); err != nil {
		return -1, nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	replies := make(chan reply, 1)
	go func() {
		resp, err := c.rpc.GetCache(ctx, &pb.GetCacheRequest{Type: poolType,
			SubType: c.subtype, ID: id})
		if err != nil || resp.GetCache() == nil {
			// No fd is coming: end the accept now, not at its deadline.
			ln.SetDeadline(time.Now())
		}
		replies <- reply{resp, err}
	}()
	fd, recvErr := c.receiveFd(ln)
	r := <-replies // bounded by ctx
	if r.err == nil && r.resp.GetCache() == nil {
		recvErr = errors.New("GetCache: no cache in the reply (an empty pool?)")
	}
	if r.err != nil || recvErr != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		if r.err != nil {
			return -1, nil, fmt.Errorf("GetCache: %w", r.err)
		}
		return -1, nil, recvErr
	}
	options := r.resp.GetCache().GetOptions()
	if options.GetTypeUrl() != enclaveTypeURL {
		unix.Close(fd)
		return -1, nil, fmt.Errorf("GetCache: options of type %q", options.GetTypeUrl())
	}
	var enclave pb.Enclave
	if err := proto.Unmarshal(options.GetValue(), &enclave); err != nil {
		unix.Close(fd)
		return -1, nil, fmt.Errorf("GetCache: options: %w", err)
	}
	return fd, enclave.GetLayout(), nil
}

// receiveFd accepts the daemon's connection (by the listener's deadline) and
// receives the one fd it sends.
func (c *client) receiveFd(ln *net.UnixListener) (int, error) {
	conn, err := ln.AcceptUnix()
	if err != nil {
		return -1, fmt.Errorf("waiting for the daemon: %w", err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(c.timeout)); err != nil {
		return -1, err
	}
	buf := make([]byte, 1)
	// Room for two fds, so that a second one is seen (and refused).
	oob := make([]byte, unix.CmsgSpace(2*4))
	n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return -1, fmt.Errorf("receiving the fd: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return -1, fmt.Errorf("receiving the fd: %w", err)
	}
	var fds []int
	for i := range msgs {
		got, err := unix.ParseUnixRights(&msgs[i])
		if err == nil {
			fds = append(fds, got...)
		}
	}
	if n != 1 || buf[0] != 0 || len(fds) != 1 || flags&unix.MSG_CTRUNC != 0 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return -1, fmt.Errorf("expected one byte \\0 with one fd, got %d bytes "+
			"with %d fds", n, len(fds))
	}
	// Close-on-exec already: Go's ReadMsgUnix passes MSG_CMSG_CLOEXEC on Linux.
	return fds[0], nil
}

type mapping struct{ addr, size uint64 }

// touched keeps the read of the mapped TCS page from being optimized away.
var touched byte

// mapLayout maps each entry at its address, as the PAL does on check-out.
// MAP_FIXED_NOREPLACE rather than MAP_FIXED: the range must be free in this
// process, and a plain MAP_FIXED would silently replace whatever the Go
// runtime had there. On a kernel before 4.17 the address is a hint only, so
// the result is checked.
func mapLayout(fd int, layout []*pb.Enclavelayout) ([]mapping, error) {
	if len(layout) == 0 {
		return nil, errors.New("empty layout")
	}
	// The first entry (the TCS page) is at the enclave's base: offsets in
	// the fd count from it.
	base := layout[0].GetAddr()
	var done []mapping
	for _, e := range layout {
		p := e.GetProt()
		prot, flags := 0, unix.MAP_FIXED_NOREPLACE
		if p.GetRead() {
			prot |= unix.PROT_READ
		}
		if p.GetWrite() {
			prot |= unix.PROT_WRITE
		}
		if p.GetExecute() {
			prot |= unix.PROT_EXEC
		}
		if p.GetPrivate() {
			flags |= unix.MAP_PRIVATE
		} else {
			flags |= unix.MAP_SHARED
		}
		if e.GetAddr() < base {
			unmap(done)
			return nil, fmt.Errorf("layout entry %#x is below the base %#x",
				e.GetAddr(), base)
		}
		got, _, errno := unix.Syscall6(unix.SYS_MMAP, uintptr(e.GetAddr()),
			uintptr(e.GetSize()), uintptr(prot), uintptr(flags), uintptr(fd),
			uintptr(e.GetAddr()-base))
		if errno != 0 {
			unmap(done)
			return nil, fmt.Errorf("mmap %#x+%#x: %v", e.GetAddr(), e.GetSize(), errno)
		}
		if uint64(got) != e.GetAddr() {
			unix.Syscall(unix.SYS_MUNMAP, got, uintptr(e.GetSize()), 0)
			unmap(done)
			return nil, fmt.Errorf("mmap %#x+%#x: the range is in use", e.GetAddr(),
				e.GetSize())
		}
		done = append(done, mapping{e.GetAddr(), e.GetSize()})
	}
	// Touch the TCS page, as the PAL reads it after mapping: the mapping
	// must be real memory of the enclave, not only address space. (go vet
	// warns of this conversion; the memory is ours, outside Go's heap.)
	touched = *(*byte)(unsafe.Pointer(uintptr(base)))
	return done, nil
}

func unmap(ms []mapping) {
	for _, m := range ms {
		if _, _, errno := unix.Syscall(unix.SYS_MUNMAP, uintptr(m.addr),
			uintptr(m.size), 0); errno != 0 {
			fail("munmap %#x: %v", m.addr, errno)
		}
	}
}

// newMemfd makes an enclave fd as the sim backend does: a memfd of the
// enclave's size, sealed so that its size can never change (the daemon
// refuses one without F_SEAL_SHRINK|F_SEAL_GROW).
func newMemfd() int {
	fd, err := unix.MemfdCreate("epm-sim-enclave",
		unix.MFD_ALLOW_SEALING|unix.MFD_CLOEXEC)
	if err != nil {
		fail("memfd_create: %v", err)
	}
	if err := unix.Ftruncate(fd, enclaveSize); err != nil {
		fail("ftruncate: %v", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS,
		unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		fail("F_ADD_SEALS: %v", err)
	}
	return fd
}

// checkMemfd checks, off the clock, that the fd checked out is an enclave
// of this client's kind: a sealed memfd of the size it checked in.
func checkMemfd(fd int) error {
	link, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return err
	}
	if len(link) < 7 || link[:7] != "/memfd:" {
		return fmt.Errorf("got %s, not a memfd", link)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Size != enclaveSize {
		return fmt.Errorf("got a memfd of %d bytes, not %d", st.Size, enclaveSize)
	}
	return nil
}

func layoutProto(layout []layoutEntry) []*pb.Enclavelayout {
	out := make([]*pb.Enclavelayout, len(layout))
	for i, e := range layout {
		out[i] = &pb.Enclavelayout{Addr: e.addr, Size: e.size, Prot: &pb.EnclavePerms{
			Read: e.read, Write: e.write, Execute: e.execute, Share: e.share,
			Private: e.private}}
	}
	return out
}

// newID is a cache ID as the published clients make them: 32 hex digits,
// random, so that no two requests share a socket path.
func newID() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		fail("random ID: %v", err)
	}
	return hex.EncodeToString(b)
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

// median and p99 are computed as run.py computes them, so that the two
// clients' figures compare.
func median(xs []float64) float64 {
	s := sorted(xs)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func p99(xs []float64) float64 {
	s := sorted(xs)
	i := int(float64(len(s)) * 0.99)
	if i > len(s)-1 {
		i = len(s) - 1
	}
	return s[i]
}

func sorted(xs []float64) []float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "epm-go-client: "+format+"\n", args...)
	os.Exit(1)
}
