package perf

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/shardlb/shardlb/internal/testenv"
)

// The sink drops the flood at the backend's ingress and counts it: the cheapest
// receiver, the same in every variant, so the differences are the load balancer's.
const sinkRules = `table netdev sink {
	counter rx { }
	chain b0 { type filter hook ingress device "b0" priority 0; policy accept; udp dport 9000 counter name "rx" drop; }
	chain b1 { type filter hook ingress device "b1" priority 0; policy accept; udp dport 9000 counter name "rx" drop; }
}
`

func (tp *topology) installSink(t testing.TB) {
	t.Helper()
	nftApply(t, tp.backend, sinkRules)
}

// sinkPackets returns the flood packets the backend received since the last call.
func (tp *topology) sinkPackets(t testing.TB) uint64 {
	t.Helper()
	out := tp.backend.Run(t, "nft", "-j", "reset", "counter", "netdev", "sink", "rx")
	var doc struct {
		Nftables []struct {
			Counter *struct {
				Packets uint64 `json:"packets"`
			} `json:"counter"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("nft reset counter: %v: %s", err, out)
	}
	for _, o := range doc.Nftables {
		if o.Counter != nil {
			return o.Counter.Packets
		}
	}
	t.Fatalf("nft reset counter: no counter in %s", out)
	return 0
}

func nftApply(t testing.TB, ns testenv.NetNS, rules string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "rules.nft")
	if err := os.WriteFile(f, []byte(rules), 0o644); err != nil {
		t.Fatal(err)
	}
	ns.Run(t, "nft", "-f", f)
}

// frameLen is the shortest Ethernet frame: 60 bytes, 64 on the wire with the FCS.
const frameLen = 60

// udpFrames builds one minimum-size UDP frame per flow (source ports sport0,
// sport0+1, ...), with valid IPv4 and UDP checksums because checksum offload is off.
func udpFrames(src, dst net.HardwareAddr, saddr, daddr netip.Addr, dport uint16, flows int) [][]byte {
	const sport0 = 10000
	frames := make([][]byte, flows)
	for i := range frames {
		f := make([]byte, frameLen)
		copy(f[0:6], dst)
		copy(f[6:12], src)
		binary.BigEndian.PutUint16(f[12:], 0x0800)
		ip := f[14:34]
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(frameLen-14))
		binary.BigEndian.PutUint16(ip[4:], uint16(i))
		ip[8] = 64
		ip[9] = unix.IPPROTO_UDP
		s4, d4 := saddr.As4(), daddr.As4()
		copy(ip[12:16], s4[:])
		copy(ip[16:20], d4[:])
		binary.BigEndian.PutUint16(ip[10:], ^fold(sum(ip)))
		udp := f[34:]
		binary.BigEndian.PutUint16(udp[0:], uint16(sport0+i))
		binary.BigEndian.PutUint16(udp[2:], dport)
		binary.BigEndian.PutUint16(udp[4:], uint16(len(udp)))
		copy(udp[8:], "shardlb-perf-flood")
		pseudo := make([]byte, 0, 12)
		pseudo = append(pseudo, s4[:]...)
		pseudo = append(pseudo, d4[:]...)
		pseudo = append(pseudo, 0, unix.IPPROTO_UDP, 0, byte(len(udp)))
		c := ^fold(sum(pseudo) + sum(udp))
		if c == 0 {
			c = 0xffff
		}
		binary.BigEndian.PutUint16(udp[6:], c)
		frames[i] = f
	}
	return frames
}

func sum(b []byte) uint32 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	return s
}

func fold(s uint32) uint16 {
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

// floodCPU is the CPU that sends the flood. A veth hands each frame to its peer's
// backlog on the sending CPU, so the whole path (sender, LB hop, sink) runs there, in
// the sender's context or in that CPU's ksoftirqd.
func floodCPU() int { return runtime.NumCPU() - 1 }

// floodResult is one flood as the sending side saw it.
type floodResult struct {
	sent    uint64
	elapsed time.Duration
	// cpu is the scheduler's exact run time of the sending thread (which runs the
	// softirqs its sends raise) plus the flood CPU's ksoftirqd: only this work,
	// whatever else the machine runs, unlike tick-sampled /proc/stat.
	cpu time.Duration
	// statBusy is the flood CPU's non-idle time from /proc/stat (10 ms ticks, and
	// it includes other processes): a cross-check.
	statBusy time.Duration
}

// mmsghdr is struct mmsghdr for sendmmsg(2).
type mmsghdr struct {
	hdr unix.Msghdr
	len uint32
	_   [4]byte
}

// flood sends count frames (cycling through frames) out of ifname in the namespace,
// from an AF_PACKET socket pinned to floodCPU, stopping early after limit.
func flood(nsName, ifname string, frames [][]byte, count uint64, limit time.Duration) (floodResult, error) {
	var res floodResult
	err := inNetNS(nsName, func() error {
		cpu := floodCPU()
		var set unix.CPUSet
		set.Set(cpu)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			return fmt.Errorf("pin to cpu %d: %w", cpu, err)
		}
		ifc, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		// Protocol 0: the socket only sends, so it costs nothing on receive.
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		defer unix.Close(fd)
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: ifc.Index}); err != nil {
			return fmt.Errorf("bind %s: %w", ifname, err)
		}
		// The qdisc is the same in every variant; skipping it makes the sender cheaper
		// and the load balancer's share of the total larger.
		_ = unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_QDISC_BYPASS, 1)

		iovs := make([]unix.Iovec, len(frames))
		msgs := make([]mmsghdr, len(frames))
		for i, f := range frames {
			iovs[i].Base = &f[0]
			iovs[i].SetLen(len(f))
			msgs[i].hdr.Iov = &iovs[i]
			msgs[i].hdr.SetIovlen(1)
		}
		softirqd, err := ksoftirqd(cpu)
		if err != nil {
			return err
		}
		thread0, err := schedRuntime("/proc/thread-self/schedstat")
		if err != nil {
			return err
		}
		soft0, err := schedRuntime(softirqd)
		if err != nil {
			return err
		}
		stat0, err := cpuBusy(cpu)
		if err != nil {
			return err
		}
		start := time.Now()
		deadline := start.Add(limit)
		for calls := 1; res.sent < count; calls++ {
			batch := min(uint64(len(msgs)), count-res.sent)
			n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&msgs[0])), uintptr(batch), 0, 0, 0)
			switch errno {
			case 0:
				res.sent += uint64(n)
			case unix.ENOBUFS, unix.EAGAIN, unix.EINTR:
			default:
				return fmt.Errorf("sendmmsg on %s: %w", ifname, errno)
			}
			if calls%64 == 0 && time.Now().After(deadline) {
				break
			}
		}
		res.elapsed = time.Since(start)
		runtime.KeepAlive(frames)
		runtime.KeepAlive(iovs)
		// Let ksoftirqd drain what the last sends queued before reading its clock.
		time.Sleep(20 * time.Millisecond)
		thread1, err := schedRuntime("/proc/thread-self/schedstat")
		if err != nil {
			return err
		}
		soft1, err := schedRuntime(softirqd)
		if err != nil {
			return err
		}
		stat1, err := cpuBusy(cpu)
		if err != nil {
			return err
		}
		res.cpu = (thread1 - thread0) + (soft1 - soft0)
		res.statBusy = stat1 - stat0
		return nil
	})
	return res, err
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// ksoftirqd returns the schedstat path of the CPU's softirq thread.
func ksoftirqd(cpu int) (string, error) {
	want := fmt.Sprintf("ksoftirqd/%d", cpu)
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		return "", err
	}
	for _, d := range dirs {
		if _, err := strconv.Atoi(d.Name()); err != nil {
			continue
		}
		comm, err := os.ReadFile(filepath.Join("/proc", d.Name(), "comm"))
		if err == nil && strings.TrimSpace(string(comm)) == want {
			return filepath.Join("/proc", d.Name(), "schedstat"), nil
		}
	}
	return "", fmt.Errorf("no %s thread", want)
}

// schedRuntime reads the first field of a schedstat file: nanoseconds on a CPU.
func schedRuntime(path string) (time.Duration, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0, fmt.Errorf("%s: empty", path)
	}
	ns, err := strconv.ParseInt(f[0], 10, 64)
	return time.Duration(ns), err
}

// cpuBusy returns the CPU's user, nice, system, irq and softirq time from /proc/stat.
func cpuBusy(cpu int) (time.Duration, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	prefix := fmt.Sprintf("cpu%d ", cpu)
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		f := strings.Fields(line)
		var ticks int64
		for _, i := range []int{1, 2, 3, 6, 7} { // user nice system irq softirq
			v, err := strconv.ParseInt(f[i], 10, 64)
			if err != nil {
				return 0, err
			}
			ticks += v
		}
		// USER_HZ is 100 on Linux whatever the kernel's HZ.
		return time.Duration(ticks) * 10 * time.Millisecond, nil
	}
	return 0, fmt.Errorf("/proc/stat: no cpu%d", cpu)
}

func (v variant) ifname() string {
	if v.direct {
		return "c1"
	}
	return "c0"
}

// frames returns the flood for the variant: 64 flows of minimum-size UDP to v.dst.
func (tp *topology) frames(v variant) [][]byte {
	const flows = 64
	if v.direct {
		return udpFrames(tp.c1MAC, tp.directMAC, directLocal, v.dst, udpPort, flows)
	}
	return udpFrames(tp.clientMAC, tp.lbFrontMAC, clientAddr, v.dst, udpPort, flows)
}
