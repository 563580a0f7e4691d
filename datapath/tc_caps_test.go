package datapath

import (
	"errors"
	"log/slog"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// withoutSysAdmin runs fn on a thread whose effective capabilities lack CAP_SYS_ADMIN,
// as the DaemonSet's pods run (capabilities are per thread), and restores it after.
func withoutSysAdmin(t *testing.T, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		t.Fatal(err)
	}
	saved := data
	data[0].Effective &^= 1 << unix.CAP_SYS_ADMIN
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := unix.Capset(&hdr, &saved[0]); err != nil {
			t.Fatal(err)
		}
	}()
	fn()
}

// A process restarted after a crash finds the filter its predecessor left (filters
// outlive their process). Without CAP_SYS_ADMIN it cannot open that filter's program
// to read its name, and must still know the filter for shardlb's, or it refuses to
// start: in tc mode every restart after a crash would crash-loop.
func TestTCFilterKnownWithoutSysAdmin(t *testing.T) {
	nsPath := attachNS(t)
	cfg := Config{Interfaces: []string{"t0"}, NetNS: nsPath, AttachMode: AttachTC,
		ConntrackSize: 1024, MaxServices: 64, MaxEndpoints: 256, RingSlots: 1 << 14}
	d, err := New(cfg, slog.New(slog.NewTextHandler(t.Output(), nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	other := newCounter(t)
	other.attach(t, nsPath, "t0", tcPriority, 7, "other")
	h := hooksOf(t, nsPath, "t0")
	mine := h.ourFilter()
	if mine == nil {
		t.Fatalf("%s: no shardlb filter", h)
	}
	if !ours(mine) {
		t.Fatal("shardlb's own filter is not recognised with every capability")
	}
	withoutSysAdmin(t, func() {
		if p, err := ebpf.NewProgramFromID(ebpf.ProgramID(mine.Id)); !errors.Is(err, unix.EPERM) {
			if p != nil {
				p.Close()
			}
			t.Fatalf("opening a program by ID without CAP_SYS_ADMIN: %v, want EPERM", err)
		}
		if !ours(mine) {
			t.Error("without CAP_SYS_ADMIN shardlb's filter is not recognised as shardlb's")
		}
		for _, f := range h.filters {
			if b, ok := f.(*netlink.BpfFilter); ok && b.Name == "other" && ours(b) {
				t.Error("without CAP_SYS_ADMIN another party's filter is taken for shardlb's")
			}
		}
	})
}
