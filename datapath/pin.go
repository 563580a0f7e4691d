package datapath

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
)

// Errors of a pin path that cannot be used.
var (
	// ErrNotBPFFS: Config.PinPath is not on a bpf filesystem.
	ErrNotBPFFS = errors.New("not on a bpf filesystem")
	// ErrPinPathInUse: another Datapath (in this process or another) holds the pin path.
	ErrPinPathInUse = errors.New("pin path in use by another datapath")
)

// Under Config.PinPath: maps/NAME for each map in pinnedMaps plus maps/layout,
// links/IFNAME for the tcx link of each interface, and tc/IFNAME for the record of each
// interface's tc filter (tcRecord).
const (
	pinMaps   = "maps"
	pinLinks  = "links"
	pinTC     = "tc"
	pinLayout = "layout"

	// layoutVersion is part of every pinned map's layout digest. Bump it when the
	// meaning of a pinned map's contents changes while its C types stay the same, so
	// that a new program does not adopt maps it would misread.
	layoutVersion = 1

	bpfFSMagic = 0xcafe4a11 // statfs f_type of bpffs (BPF_FS_MAGIC)
)

// pinnedMaps are the maps whose contents outlive a process: what Go wrote (services,
// rings, endpoints, source ranges), what the program learnt (conntrack) and the
// counters. perProgramMaps belong to one program.
var pinnedMaps = []string{
	lbMapServices, lbMapVips, lbMapRingSlots, lbMapEndpoints, lbMapSourceRanges4, lbMapSourceRanges6,
	lbMapConntrack4Tcp, lbMapConntrack4Udp, lbMapConntrack6,
	lbMapServiceStats, lbMapDrops,
}

// perProgramMaps start empty with each program: the per-CPU scratch entry and
// next-hop cache (new_entry, endpoint_nhs), and the SNAT TIME_WAIT reuse counter, which
// counts from the process's start like its other metrics; pinning it would have made
// every datapath pinned before it incompatible.
var perProgramMaps = []string{lbMapNewEntry, lbMapEndpointNhs, lbMapSnatTimeWaitReuses}

// capacityOf names the Config field that sizes a pinned map, for the log line that
// says why pinned maps were replaced.
var capacityOf = map[string]string{
	lbMapServices: "MaxServices", lbMapVips: "MaxServices", lbMapServiceStats: "MaxServices",
	lbMapRingSlots: "RingSlots, from MaxServices and MaxEndpoints", lbMapEndpoints: "MaxEndpoints",
	lbMapConntrack4Tcp: "ConntrackSize", lbMapConntrack4Udp: "ConntrackSize", lbMapConntrack6: "ConntrackSize",
	lbMapSourceRanges4: "SourceRangeEntries + Config.MaxSourceRanges", lbMapSourceRanges6: "SourceRangeEntries + Config.MaxSourceRanges",
}

// pinDir is a pin path locked by one Datapath (or by Cleanup) for as long as it uses it:
// two processes rebuilding their state from the same maps would hand out the same ids.
type pinDir struct {
	path string
	lock *os.File // the directory itself, flock'ed
}

// openPinDir checks that path is on bpffs, creates it and its subdirectories when
// create is set, and locks it.
func openPinDir(path string, create bool) (*pinDir, error) {
	if err := checkBPFFS(path); err != nil {
		return nil, err
	}
	if create {
		for _, dir := range []string{path, filepath.Join(path, pinMaps), filepath.Join(path, pinLinks), filepath.Join(path, pinTC)} {
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return nil, fmt.Errorf("pin path: %w", err)
			}
		}
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("pin path: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s", ErrPinPathInUse, path)
		}
		return nil, fmt.Errorf("lock pin path %s: %w", path, err)
	}
	return &pinDir{path: path, lock: f}, nil
}

// checkBPFFS checks the file system of path, or of its nearest existing parent when
// path does not exist yet.
func checkBPFFS(path string) error {
	dir := filepath.Clean(path)
	for {
		var st syscall.Statfs_t
		err := syscall.Statfs(dir, &st)
		if err == nil {
			if uint32(st.Type) != bpfFSMagic {
				return fmt.Errorf("pin path %s: %s is %w: mount bpffs there (mount -t bpf bpf /sys/fs/bpf; in a pod, mount the host's /sys/fs/bpf)", path, dir, ErrNotBPFFS)
			}
			return nil
		}
		parent := filepath.Dir(dir)
		if !errors.Is(err, syscall.ENOENT) || parent == dir {
			return fmt.Errorf("pin path %s: statfs %s: %w", path, dir, err)
		}
		dir = parent
	}
}

func (p *pinDir) mapPath(name string) string  { return filepath.Join(p.path, pinMaps, name) }
func (p *pinDir) linkPath(ifc string) string  { return filepath.Join(p.path, pinLinks, ifc) }
func (p *pinDir) entries(sub string) []string { return dirNames(filepath.Join(p.path, sub)) }

func (p *pinDir) unlock() {
	if p != nil && p.lock != nil {
		p.lock.Close() // closing the descriptor drops the flock
		p.lock = nil
	}
}

func dirNames(dir string) []string {
	es, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	names := make([]string, 0, len(es))
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

// removeMaps unpins every map. A program still attached keeps the maps it uses until
// it is replaced; nothing else does.
func (p *pinDir) removeMaps() error {
	var errs []error
	for _, name := range p.entries(pinMaps) {
		if err := os.Remove(p.mapPath(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("unpin map: %w", err))
		}
	}
	return errors.Join(errs...)
}

// removeLink detaches the link pinned for an interface and removes its pin.
func (p *pinDir) removeLink(ifc string) error {
	path := p.linkPath(ifc)
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		// Not a link (or unreadable): the pin is all there is to remove.
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("unpin link of %s: %w", ifc, err)
		}
		return nil
	}
	defer l.Close()
	// Detach now rather than when the last reference goes, which may be later (another
	// holder) or asynchronous (a dropped pin is released from a work queue).
	if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("detach from %s: %w", ifc, err)
	}
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpin link of %s: %w", ifc, err)
	}
	return nil
}

// removeAll detaches every pinned link, removes every recorded tc filter, then unpins
// the maps and removes the directories. Files in the pin path that shardlb did not
// create are left, and so is the path itself then.
func (p *pinDir) removeAll() error {
	var errs []error
	for _, ifc := range p.entries(pinLinks) {
		if err := p.removeLink(ifc); err != nil {
			errs = append(errs, err)
		}
	}
	for _, ifc := range p.entries(pinTC) {
		if err := p.removeTC(ifc); err != nil {
			errs = append(errs, err)
		}
	}
	if err := p.removeMaps(); err != nil {
		errs = append(errs, err)
	}
	for _, dir := range []string{filepath.Join(p.path, pinLinks), filepath.Join(p.path, pinTC), filepath.Join(p.path, pinMaps), p.path} {
		err := os.Remove(dir)
		// EBUSY: the pin path is itself a bpffs mount point, which stays.
		if err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.EBUSY) {
			errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}

// Cleanup removes what a Datapath pinned under pinPath: it detaches the program from
// every interface it is pinned to (tcx links) or recorded on (tc filters, removed in the
// network namespace they were attached in), then unpins the maps (conntrack included)
// and removes the directory. It is the uninstall path after Release; a pin path that
// does not exist is not an error. It fails with ErrPinPathInUse while a Datapath holds
// the pin path.
func Cleanup(pinPath string) error {
	if _, err := os.Stat(pinPath); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	p, err := openPinDir(pinPath, false)
	if err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	defer p.unlock()
	if err := p.removeAll(); err != nil {
		return fmt.Errorf("cleanup %s: %w", pinPath, err)
	}
	return nil
}

// layoutDigest identifies what a map's entries mean: layoutVersion, the map's name and
// type, and the complete layout of its key and value types (member names, offsets and
// types, recursively), so a change of the C structs is never adopted by mistake.
// Capacities are compared separately (MapSpec.Compatible) for a clearer reason.
func layoutDigest(ms *ebpf.MapSpec) ([32]byte, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "shardlb layout %d\n%s %s\n", layoutVersion, ms.Name, ms.Type)
	for _, t := range []btf.Type{ms.Key, ms.Value} {
		if t == nil {
			return [32]byte{}, fmt.Errorf("map %s has no BTF key or value type", ms.Name)
		}
		if err := describeType(&b, t, 0); err != nil {
			return [32]byte{}, fmt.Errorf("map %s: %w", ms.Name, err)
		}
		b.WriteByte('\n')
	}
	return sha256.Sum256([]byte(b.String())), nil
}

func describeType(b *strings.Builder, t btf.Type, depth int) error {
	if depth > 16 {
		return errors.New("type nested too deep")
	}
	switch t := btf.UnderlyingType(t).(type) {
	case *btf.Int:
		fmt.Fprintf(b, "int%d/%d", t.Size*8, t.Encoding)
	case *btf.Enum:
		fmt.Fprintf(b, "enum%d", t.Size*8)
	case *btf.Array:
		fmt.Fprintf(b, "[%d]", t.Nelems)
		return describeType(b, t.Type, depth+1)
	case *btf.Struct, *btf.Union:
		var members []btf.Member
		var size uint32
		if s, ok := t.(*btf.Struct); ok {
			b.WriteString("struct")
			members, size = s.Members, s.Size
		} else {
			u := t.(*btf.Union)
			b.WriteString("union")
			members, size = u.Members, u.Size
		}
		fmt.Fprintf(b, "%d{", size)
		for _, m := range members {
			fmt.Fprintf(b, "%s@%d:%d ", m.Name, m.Offset, m.BitfieldSize)
			if err := describeType(b, m.Type, depth+1); err != nil {
				return err
			}
			b.WriteString(";")
		}
		b.WriteString("}")
	default:
		return fmt.Errorf("no layout description for %T", t)
	}
	return nil
}

// layoutKey is a map name as the layout map's key.
func layoutKey(name string) [16]byte {
	var k [16]byte
	copy(k[:], name)
	return k
}

var layoutSpec = ebpf.MapSpec{
	Name:       "shardlb_layout",
	Type:       ebpf.Hash,
	KeySize:    16,
	ValueSize:  32,
	MaxEntries: 64,
}

// writeLayout pins the layout map, which records the digest of every pinned map: it is
// written last, so maps whose pinning was interrupted are never adopted.
func (d *Datapath) writeLayout(spec *ebpf.CollectionSpec) error {
	m, err := ebpf.NewMap(&layoutSpec)
	if err != nil {
		return fmt.Errorf("create layout map: %w", err)
	}
	defer m.Close()
	for _, name := range pinnedMaps {
		dg, err := layoutDigest(spec.Maps[name])
		if err != nil {
			return err
		}
		if err := m.Put(layoutKey(name), dg); err != nil {
			return fmt.Errorf("write layout of %s: %w", name, err)
		}
	}
	if err := m.Pin(d.pins.mapPath(pinLayout)); err != nil {
		return fmt.Errorf("pin layout map: %w", err)
	}
	return nil
}

// adoptMaps decides whether the maps pinned under the pin path can serve the program
// of spec. It returns the Go-side state rebuilt from them, or nil when there is nothing
// to adopt or they cannot be adopted; in the latter case it says why in one log line and
// removes their pins, so that the program gets new maps.
func (d *Datapath) adoptMaps(spec *ebpf.CollectionSpec) (*restored, error) {
	if len(d.pins.entries(pinMaps)) == 0 {
		return nil, nil
	}
	r, why := d.tryAdopt(spec)
	if why == nil {
		d.log.Info("datapath adopted pinned maps", "pinPath", d.cfg.PinPath, "frontends", len(r.applied))
		return r, nil
	}
	d.log.Warn("datapath replaces incompatible pinned maps; tracked connections are lost",
		"pinPath", d.cfg.PinPath, "reason", why.Error())
	if err := d.pins.removeMaps(); err != nil {
		return nil, err
	}
	return nil, nil
}

// tryAdopt opens the pinned maps and checks them against spec: each one present, of
// the same type, sizes and flags (capacities from Config included), with the layout
// digest this program has, and no map pinned that this program does not use; then it
// rebuilds the Go-side state. The error says what did not match.
func (d *Datapath) tryAdopt(spec *ebpf.CollectionSpec) (*restored, error) {
	layout, err := ebpf.LoadPinnedMap(d.pins.mapPath(pinLayout), nil)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, errors.New("no layout record (pinning was interrupted, or by a shardlb that did not record it)")
		}
		return nil, fmt.Errorf("open layout record: %w", err)
	}
	defer layout.Close()

	var reasons []string
	var key [16]byte
	var dg [32]byte
	iter := layout.Iterate()
	for iter.Next(&key, &dg) {
		name := string(key[:clen(key[:])])
		if !slices.Contains(pinnedMaps, name) {
			reasons = append(reasons, fmt.Sprintf("map %s is not used by this program", name))
		}
	}
	if err := iter.Err(); err != nil {
		return nil, fmt.Errorf("read layout record: %w", err)
	}

	maps := make(map[string]*ebpf.Map, len(pinnedMaps))
	defer func() {
		for _, m := range maps {
			m.Close()
		}
	}()
	for _, name := range pinnedMaps {
		m, err := ebpf.LoadPinnedMap(d.pins.mapPath(name), nil)
		if errors.Is(err, fs.ErrNotExist) {
			// Maps added by a later version: source_ranges4 and 6 were.
			reasons = append(reasons, fmt.Sprintf("map %s is not pinned (pinned by a program without it)", name))
			continue
		}
		if err != nil {
			reasons = append(reasons, fmt.Sprintf("map %s: %v", name, err))
			continue
		}
		maps[name] = m
		if err := spec.Maps[name].Compatible(m); err != nil {
			why := strings.TrimSuffix(err.Error(), ": "+ebpf.ErrMapIncompatible.Error())
			if c := capacityOf[name]; c != "" && strings.Contains(why, "MaxEntries") {
				why += " (Config." + c + ")"
			}
			reasons = append(reasons, fmt.Sprintf("map %s: %s", name, why))
			continue
		}
		want, err := layoutDigest(spec.Maps[name])
		if err != nil {
			return nil, err
		}
		var got [32]byte
		if err := layout.Lookup(layoutKey(name), &got); err != nil {
			reasons = append(reasons, fmt.Sprintf("map %s: no layout recorded", name))
		} else if got != want {
			reasons = append(reasons, fmt.Sprintf("map %s: key or value layout changed", name))
		}
	}
	if len(reasons) > 0 {
		return nil, errors.New(strings.Join(reasons, "; "))
	}
	r, err := d.restore(maps)
	if err != nil {
		return nil, fmt.Errorf("pinned state is inconsistent: %w", err)
	}
	return r, nil
}

func clen(b []byte) int {
	if i := slices.Index(b, 0); i >= 0 {
		return i
	}
	return len(b)
}

// attachPinned gives every configured interface the program at the chosen hook.
//
// tcx: a link pinned by an earlier process that is still attached to that interface has
// its program replaced atomically (packets meet either program, never none); a missing
// or stale one is attached anew and pinned.
//
// tc: the filter an earlier process left (it needs no pin to stay) gets the new program
// in place, also atomically, and the pin path records where it is.
//
// What an earlier process left at the other hook (the attach mode changed) is removed
// once the program is at the new one; links and filters of interfaces that are no
// longer configured are removed.
func (d *Datapath) attachPinned() error {
	return d.inNetNS(func() error {
		for _, name := range d.cfg.Interfaces {
			ifindex, err := interfaceIndex(name, d.cfg.NetNS)
			if err != nil {
				return err
			}
			if d.hook == hookTC {
				err = d.attachPinnedTC(name, ifindex)
			} else {
				err = d.attachPinnedTCX(name, ifindex)
			}
			if err != nil {
				return err
			}
		}
		for _, name := range d.pins.entries(pinLinks) {
			if slices.Contains(d.cfg.Interfaces, name) {
				continue
			}
			if err := d.pins.removeLink(name); err != nil {
				return err
			}
			d.log.Info("datapath detached", "interface", name, "hook", hookTCX, "reason", "no longer configured")
		}
		for _, name := range d.pins.entries(pinTC) {
			if slices.Contains(d.cfg.Interfaces, name) {
				continue
			}
			if err := d.pins.removeTC(name); err != nil {
				return err
			}
			d.log.Info("datapath detached", "interface", name, "hook", hookTC, "reason", "no longer configured")
		}
		return nil
	})
}

func (d *Datapath) attachPinnedTCX(name string, ifindex int) error {
	l, err := d.adoptLink(name, ifindex)
	if err != nil {
		return err
	}
	if l == nil {
		if l, err = d.attachLink(name, ifindex); err != nil {
			return err
		}
		if err := l.Pin(d.pins.linkPath(name)); err != nil {
			l.Close()
			return fmt.Errorf("pin link of %s: %w", name, err)
		}
	}
	d.links = append(d.links, l)
	if r, _ := d.pins.readTC(name); r != nil {
		if err := d.pins.removeTC(name); err != nil {
			return err
		}
		d.log.Info("datapath detached", "interface", name, "hook", hookTC, "reason", "the program is at tcx now")
	}
	return d.removeStaleFilter(name, ifindex)
}

func (d *Datapath) attachPinnedTC(name string, ifindex int) error {
	var prev *tcFilter
	if r, err := d.pins.readTC(name); err != nil {
		return err
	} else if r != nil {
		f := r.filter(name)
		prev = &f
	}
	f, err := d.attachTC(name, ifindex, prev)
	if err != nil {
		return err
	}
	d.filters = append(d.filters, f)
	if err := d.pins.writeTC(f, d.cfg.NetNS); err != nil {
		return err
	}
	if _, err := os.Lstat(d.pins.linkPath(name)); err == nil {
		if err := d.pins.removeLink(name); err != nil {
			return err
		}
		d.log.Info("datapath detached", "interface", name, "hook", hookTCX, "reason", "the program is at tc now")
	}
	return nil
}

// adoptLink returns the link pinned for interface name after replacing its program,
// or nil when there is none that is attached to that interface now (the pin of a link
// whose interface went away, or of an interface of another namespace, is removed).
func (d *Datapath) adoptLink(name string, ifindex int) (link.Link, error) {
	path := d.pins.linkPath(name)
	l, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open pinned link of %s: %w", name, err)
	}
	if !attachedTo(l, ifindex) {
		l.Close()
		if err := d.pins.removeLink(name); err != nil {
			return nil, err
		}
		d.log.Info("datapath dropped a stale link pin", "interface", name)
		return nil, nil
	}
	if err := l.Update(d.objs.LbIngress); err != nil {
		l.Close()
		return nil, fmt.Errorf("replace program on %s: %w", name, err)
	}
	d.log.Info("datapath program replaced in place", "interface", name, "hook", hookTCX)
	return l, nil
}

// attachedTo reports whether l is a tcx ingress link that the interface with ifindex,
// in the current network namespace, lists among its attachments.
func attachedTo(l link.Link, ifindex int) bool {
	info, err := l.Info()
	if err != nil || info.TCX() == nil || info.TCX().Ifindex != uint32(ifindex) || ebpf.AttachType(info.TCX().AttachType) != ebpf.AttachTCXIngress {
		return false
	}
	res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		return false
	}
	for _, p := range res.Programs {
		if id, ok := p.LinkID(); ok && id == info.ID {
			return true
		}
	}
	return false
}
