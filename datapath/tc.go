package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The program's filter on a clsact qdisc's ingress. Lower priorities run first; the
// package doc says why 2. The name and handle tell shardlb's filter from others at the
// same priority.
const (
	tcPriority   = 2
	tcHandle     = 0x5b1b
	tcFilterName = "shardlb"
	tcProgName   = "lb_ingress" // the program's name as the kernel knows it
)

// tcFilter is the program's bpf filter on one interface, and what removing it needs.
type tcFilter struct {
	ifname   string
	ifindex  int
	priority uint16
	handle   uint32
	// createdQdisc: the clsact qdisc was added for this filter, and goes when the
	// filter goes unless another filter uses it by then.
	createdQdisc bool
}

func (f tcFilter) attrs() netlink.FilterAttrs {
	return netlink.FilterAttrs{
		LinkIndex: f.ifindex,
		Parent:    netlink.HANDLE_MIN_INGRESS,
		Handle:    f.handle,
		Priority:  f.priority,
		Protocol:  unix.ETH_P_ALL,
	}
}

// attachTC puts the program in the interface's ingress filter at shardlb's priority and
// handle. A filter of an earlier shardlb there gets the new program in place (a netlink
// replace, which swaps the program atomically: packets meet either program, never
// none); otherwise the filter is added, after a clsact qdisc when the interface has
// none. A filter there that is not shardlb's is left alone and New fails. prev is what
// the pin path recorded of this interface, nil if nothing. It runs in the interface's
// network namespace.
func (d *Datapath) attachTC(name string, ifindex int, prev *tcFilter) (tcFilter, error) {
	f := tcFilter{ifname: name, ifindex: ifindex, priority: tcPriority, handle: tcHandle}
	lk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return f, fmt.Errorf("attach tc filter to %s: %w", name, err)
	}
	created, err := ensureClsact(lk)
	if err != nil {
		return f, fmt.Errorf("attach tc filter to %s: %w", name, err)
	}
	f.createdQdisc = created || (prev != nil && prev.ifindex == ifindex && prev.createdQdisc)
	filters, err := netlink.FilterList(lk, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		return f, fmt.Errorf("attach tc filter to %s: list filters: %w", name, err)
	}
	var old *netlink.BpfFilter
	var before []string
	for _, x := range filters {
		a := x.Attrs()
		switch {
		case a.Priority < tcPriority:
			before = append(before, describeFilter(x))
		case a.Priority != tcPriority:
		case !bpfForAll(x):
			// One priority holds filters of one kind and protocol: the kernel would refuse
			// ours with a less helpful message.
			return f, fmt.Errorf("attach tc filter to %s: ingress priority %d holds a %s, and shardlb's filter needs that priority (a bpf filter for every protocol)",
				name, tcPriority, describeFilter(x))
		case a.Handle == tcHandle:
			b := x.(*netlink.BpfFilter)
			if !ours(b) {
				return f, fmt.Errorf("attach tc filter to %s: ingress priority %d handle %#x holds a %s, which is not shardlb's: not replacing it",
					name, tcPriority, tcHandle, describeFilter(x))
			}
			old = b
		}
	}
	nf := &netlink.BpfFilter{FilterAttrs: f.attrs(), Fd: d.objs.LbIngress.FD(), Name: tcFilterName, DirectAction: true}
	where := []any{"interface", name, "hook", hookTC, "priority", tcPriority, "handle", fmt.Sprintf("%#x", tcHandle)}
	if old != nil {
		if err := netlink.FilterReplace(nf); err != nil {
			return f, fmt.Errorf("replace program in the tc filter of %s: %w", name, err)
		}
		d.log.Info("datapath program replaced in place", append(where, "previousProgram", old.Id)...)
	} else {
		if err := netlink.FilterAdd(nf); err != nil {
			return f, fmt.Errorf("attach tc filter to %s: %w", name, err)
		}
		d.log.Info("datapath attached", append(where, "clsactAdded", created)...)
	}
	if len(before) > 0 {
		d.log.Warn("tc filters run before the datapath's: they must hand VIP traffic and endpoint replies on (TC_ACT_UNSPEC), or the datapath never sees them",
			"interface", name, "filters", strings.Join(before, "; "))
	}
	// A filter an earlier shardlb recorded at another priority or handle: the new one has
	// taken over.
	if prev != nil && prev.ifindex == ifindex && (prev.priority != f.priority || prev.handle != f.handle) {
		p := *prev
		p.createdQdisc = false
		if _, err := removeFilter(p); err != nil {
			return f, err
		}
	}
	return f, nil
}

// ensureClsact adds a clsact qdisc to the interface unless it has one (or the older
// ingress qdisc, whose ingress takes the same filters), and says whether it added it.
func ensureClsact(lk netlink.Link) (bool, error) {
	q, err := ingressQdisc(lk)
	if err != nil || q != nil {
		return false, err
	}
	err = netlink.QdiscAdd(&netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: lk.Attrs().Index,
		Handle:    netlink.MakeHandle(0xffff, 0),
		Parent:    netlink.HANDLE_CLSACT,
	}})
	if errors.Is(err, unix.EEXIST) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("add clsact qdisc: %w", err)
	}
	return true, nil
}

// ingressQdisc returns the interface's clsact (or ingress) qdisc, nil if it has none.
func ingressQdisc(lk netlink.Link) (netlink.Qdisc, error) {
	qs, err := netlink.QdiscList(lk)
	if err != nil {
		return nil, fmt.Errorf("list qdiscs: %w", err)
	}
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_CLSACT {
			return q, nil
		}
	}
	return nil, nil
}

func bpfForAll(x netlink.Filter) bool {
	_, ok := x.(*netlink.BpfFilter)
	return ok && x.Attrs().Protocol == unix.ETH_P_ALL
}

// ours tells whether a bpf filter, found at shardlb's priority and handle, is
// shardlb's: the name shardlb gives its filter, and shardlb's program in it. Opening a
// program by its ID needs CAP_SYS_ADMIN, which the DaemonSet does not grant: without
// it the filter's name at that priority and handle is what identifies it (else a
// process restarted after a crash would refuse the filter its predecessor left, and
// crash-loop).
func ours(b *netlink.BpfFilter) bool {
	if b.Name != tcFilterName {
		return false
	}
	p, err := ebpf.NewProgramFromID(ebpf.ProgramID(b.Id))
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return true
	}
	if err != nil {
		return false
	}
	defer p.Close()
	info, err := p.Info()
	return err == nil && info.Name == tcProgName
}

func describeFilter(x netlink.Filter) string {
	a := x.Attrs()
	if b, ok := x.(*netlink.BpfFilter); ok {
		return fmt.Sprintf("bpf filter %q (priority %d, handle %#x, protocol %#04x, program id %d)", b.Name, a.Priority, a.Handle, a.Protocol, b.Id)
	}
	return fmt.Sprintf("%s filter (priority %d, handle %#x, protocol %#04x)", x.Type(), a.Priority, a.Handle, a.Protocol)
}

// removeFilter removes shardlb's filter f describes, if it is there, and the clsact
// qdisc when f added it and no filter is left on it in either direction. Other filters
// and qdiscs are left alone. It runs in the interface's network namespace and reports
// whether it removed a filter.
func removeFilter(f tcFilter) (bool, error) {
	lk, err := netlink.LinkByIndex(f.ifindex)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return false, nil // gone, and its filters with it
	}
	if err != nil {
		return false, fmt.Errorf("remove tc filter of %s: %w", f.ifname, err)
	}
	q, err := ingressQdisc(lk)
	if err != nil || q == nil {
		return false, err
	}
	filters, err := netlink.FilterList(lk, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		return false, fmt.Errorf("remove tc filter of %s: list filters: %w", f.ifname, err)
	}
	removed := false
	for _, x := range filters {
		a := x.Attrs()
		if a.Priority != f.priority || a.Handle != f.handle || !bpfForAll(x) || !ours(x.(*netlink.BpfFilter)) {
			continue
		}
		if err := netlink.FilterDel(&netlink.BpfFilter{FilterAttrs: f.attrs(), Fd: -1}); err != nil && !errors.Is(err, unix.ENOENT) {
			return false, fmt.Errorf("remove tc filter of %s: %w", f.ifname, err)
		}
		removed = true
	}
	if !f.createdQdisc || q.Type() != "clsact" {
		return removed, nil
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		left, err := netlink.FilterList(lk, parent)
		if err != nil {
			return removed, fmt.Errorf("remove clsact qdisc of %s: list filters: %w", f.ifname, err)
		}
		if len(left) > 0 {
			return removed, nil
		}
	}
	if err := netlink.QdiscDel(q); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return removed, fmt.Errorf("remove clsact qdisc of %s: %w", f.ifname, err)
	}
	return removed, nil
}

// removeFilters removes the filters this Datapath attached (Close), in their network
// namespace.
func (d *Datapath) removeFilters() error {
	var errs []error
	for _, f := range d.filters {
		if _, err := removeFilter(f); err != nil {
			errs = append(errs, err)
			continue
		}
		d.log.Info("datapath detached", "interface", f.ifname, "hook", hookTC)
	}
	d.filters = nil
	return errors.Join(errs...)
}

// removeStaleFilter removes a filter of shardlb's from an interface the program is now
// attached to through tcx: an earlier process in tc mode left it (filters outlive their
// process), and it would run, with its own maps, after the new program.
func (d *Datapath) removeStaleFilter(name string, ifindex int) error {
	removed, err := removeFilter(tcFilter{ifname: name, ifindex: ifindex, priority: tcPriority, handle: tcHandle})
	if removed {
		d.log.Info("datapath detached", "interface", name, "hook", hookTC, "reason", "an earlier process's filter; the program is at tcx now")
	}
	return err
}

// tcRecord is what the pin path keeps of a tc filter (PinPath/tc/IFNAME), so that the
// next process and Cleanup find it: a filter cannot be pinned (nor needs to be: it
// stays), so the record says where it is, in which network namespace (path, and device
// and inode to recognise it), and whether its clsact qdisc was added for it. bpffs holds
// only BPF objects, so the record is a one-entry array map.
type tcRecord struct {
	Ifindex      uint32
	Priority     uint32
	Handle       uint32
	CreatedQdisc uint32
	NetNSDev     uint64
	NetNSIno     uint64
	NetNS        [256]byte
}

var tcRecordSpec = ebpf.MapSpec{
	Name:       "shardlb_tc",
	Type:       ebpf.Array,
	KeySize:    4,
	ValueSize:  uint32(binary.Size(tcRecord{})),
	MaxEntries: 1,
}

func (r *tcRecord) filter(ifc string) tcFilter {
	return tcFilter{ifname: ifc, ifindex: int(r.Ifindex), priority: uint16(r.Priority), handle: r.Handle, createdQdisc: r.CreatedQdisc != 0}
}

func (p *pinDir) tcPath(ifc string) string { return filepath.Join(p.path, pinTC, ifc) }

// currentNetNS identifies the network namespace of the calling thread.
func currentNetNS() (dev, ino uint64, err error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return 0, 0, fmt.Errorf("identify network namespace: %w", err)
	}
	return st.Dev, st.Ino, nil
}

// writeTC records f, attached in the current network namespace, which is the one at
// nsPath.
func (p *pinDir) writeTC(f tcFilter, nsPath string) error {
	if len(nsPath) >= len(tcRecord{}.NetNS) {
		return fmt.Errorf("record tc filter of %s: network namespace path too long", f.ifname)
	}
	dev, ino, err := currentNetNS()
	if err != nil {
		return fmt.Errorf("record tc filter of %s: %w", f.ifname, err)
	}
	r := tcRecord{Ifindex: uint32(f.ifindex), Priority: uint32(f.priority), Handle: f.handle, NetNSDev: dev, NetNSIno: ino}
	if f.createdQdisc {
		r.CreatedQdisc = 1
	}
	copy(r.NetNS[:], nsPath)
	path := p.tcPath(f.ifname)
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, fs.ErrNotExist) {
		if m, err = ebpf.NewMap(&tcRecordSpec); err != nil {
			return fmt.Errorf("record tc filter of %s: %w", f.ifname, err)
		}
		defer m.Close()
		if err := m.Put(uint32(0), &r); err != nil {
			return fmt.Errorf("record tc filter of %s: %w", f.ifname, err)
		}
		if err := m.Pin(path); err != nil {
			return fmt.Errorf("record tc filter of %s: %w", f.ifname, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("record tc filter of %s: %w", f.ifname, err)
	}
	defer m.Close()
	if err := m.Put(uint32(0), &r); err != nil {
		return fmt.Errorf("record tc filter of %s: %w", f.ifname, err)
	}
	return nil
}

// readTC returns the record of the interface's filter, nil if there is none.
func (p *pinDir) readTC(ifc string) (*tcRecord, error) {
	m, err := ebpf.LoadPinnedMap(p.tcPath(ifc), nil)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read tc filter record of %s: %w", ifc, err)
	}
	defer m.Close()
	var r tcRecord
	if err := m.Lookup(uint32(0), &r); err != nil {
		return nil, fmt.Errorf("read tc filter record of %s: %w", ifc, err)
	}
	return &r, nil
}

// removeTC removes the filter recorded for an interface, in the network namespace it
// was attached in, and the record. A namespace that is gone took the filter with it. A
// record that cannot be read is removed; one of another namespace than the caller's,
// with no path to enter it by, stays and is an error: Cleanup must run there.
func (p *pinDir) removeTC(ifc string) error {
	r, err := p.readTC(ifc)
	if err == nil && r != nil {
		nsPath := string(r.NetNS[:clen(r.NetNS[:])])
		err = inNetNSPath(nsPath, func() error {
			dev, ino, err := currentNetNS()
			if err != nil {
				return err
			}
			if dev != r.NetNSDev || ino != r.NetNSIno {
				if nsPath != "" {
					return nil // a new namespace at that path: the filter went with the old one
				}
				return fmt.Errorf("the tc filter of %s was attached in another network namespace (inode %d, this one is %d): remove it from there", ifc, r.NetNSIno, ino)
			}
			_, err = removeFilter(r.filter(ifc))
			return err
		})
		if nsPath != "" && errors.Is(err, fs.ErrNotExist) {
			err = nil
		}
		if err != nil {
			return err
		}
	}
	if err := os.Remove(p.tcPath(ifc)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove tc filter record of %s: %w", ifc, err)
	}
	return nil
}
