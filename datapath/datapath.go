package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netns"
)

// Defaults of Config's capacities. DefaultConfig holds them all; the ring slots are
// derived from the frontends and endpoints (RingSlotsFor).
const (
	DefaultConntrackSize      = 262144
	DefaultMaxServices        = 16384
	DefaultMaxEndpoints       = 65536
	DefaultSNATPortMin        = 1024
	DefaultSNATPortMax        = 32767
	DefaultMaxSourceRanges    = 256
	DefaultSourceRangeEntries = 65536
)

// Ring slots per endpoint slot and per frontend slot (RingSlotsFor). 64 per endpoint
// is 4,194,304 slots at the default 65,536 endpoints; 256 per frontend lets every
// frontend hold the smallest Maglev ring (251 slots, taken in pairs) with a few to
// spare for updates, which need the new ring next to the old one.
const (
	RingSlotsPerEndpoint = 64
	RingSlotsPerService  = 256
)

// RingSlotsFor is the number of ring slots New gives maxServices frontends and
// maxEndpoints endpoints when Config.RingSlots is zero: 64 per endpoint slot, at least
// 256 per frontend slot.
func RingSlotsFor(maxServices, maxEndpoints int) int {
	return max(RingSlotsPerEndpoint*maxEndpoints, RingSlotsPerService*maxServices)
}

// Sentinels of SetServices' per-frontend errors for a map that is full; each error
// names the flag that sizes the map (see Datapath.capacityHint).
var (
	errServicesFull  = errors.New("no free frontend slot")
	errEndpointsFull = errors.New("no free endpoint slot")
	errRingFull      = errors.New("no free ring slots")
)

// DefaultConfig is the configuration New uses for every field left zero: the
// capacities above and the automatic attach mode. RingSlots stays zero, so that it
// follows MaxServices and MaxEndpoints (RingSlotsFor).
func DefaultConfig() Config {
	return Config{
		ConntrackSize:      DefaultConntrackSize,
		MaxServices:        DefaultMaxServices,
		MaxEndpoints:       DefaultMaxEndpoints,
		MaxSourceRanges:    DefaultMaxSourceRanges,
		SourceRangeEntries: DefaultSourceRangeEntries,
		SNATPortMin:        DefaultSNATPortMin,
		SNATPortMax:        DefaultSNATPortMax,
		AttachMode:         AttachAuto,
	}
}

// Config says where the datapath attaches and how large its maps are. Zero values take
// the defaults.
type Config struct {
	// Interfaces to attach the ingress program to: every interface VIP traffic or
	// endpoint replies arrive on. None means load only (tests, benchmarks).
	Interfaces []string
	// NetNS, when set, is the path of the network namespace the interfaces live in
	// (for example /var/run/netns/lb); empty means the caller's.
	NetNS string
	// NodeIPv4 and NodeIPv6 are the source addresses of onearm flows toward endpoints.
	NodeIPv4, NodeIPv6 netip.Addr
	// ConntrackSize is the number of entries of each conntrack map: IPv4 TCP, IPv4 UDP
	// and IPv6 (both protocols) have one each; a flow takes two entries.
	ConntrackSize int
	// MaxServices bounds the number of frontends (VIP, port, protocol): shardlb's
	// --maxServices. SetServices refuses a frontend beyond it.
	MaxServices int
	// MaxEndpoints bounds the endpoints of all frontends together (an endpoint of two
	// frontends counts twice): shardlb's --maxEndpoints. SetServices refuses a frontend
	// whose endpoints do not fit.
	MaxEndpoints int
	// RingSlots bounds the ring slots of all frontends together: a Maglev frontend
	// takes about 100 per endpoint (at least 251, at most 131,071), an rr frontend one
	// per endpoint, and an update needs room for the new ring next to the old one.
	// Zero derives it from MaxServices and MaxEndpoints (RingSlotsFor), as shardlb does.
	RingSlots int
	// MaxSourceRanges bounds the source ranges of one frontend (the prefixes of its
	// VIP's family, see shard.Frontend.SourceRanges): SetServices refuses a frontend
	// with more.
	MaxSourceRanges int
	// SourceRangeEntries bounds the source ranges of all frontends together, in each
	// family: SetServices refuses a frontend whose ranges do not fit.
	SourceRangeEntries int
	// SNATPortMin and SNATPortMax bound the source ports of onearm and fullnat flows
	// (see the package doc, "SNAT ports"). Keep them outside the node's
	// ip_local_port_range (CheckSNATPorts).
	SNATPortMin, SNATPortMax uint16

	// AttachMode is the kernel hook the program runs at on Interfaces: AttachTCX (a tcx
	// link, Linux 6.6 or later), AttachTC (a direct-action bpf filter on a clsact qdisc)
	// or AttachAuto, the default (empty), which takes tcx when the kernel has it and tc
	// otherwise. ParseAttachMode reads it from text.
	AttachMode AttachMode

	// PinPath, when set, is a directory on bpffs (for example /sys/fs/bpf/shardlb)
	// where the maps and the interfaces' links are pinned, so that the datapath
	// outlives the process: Release leaves it forwarding, and the next New with the
	// same PinPath adopts it (see the package doc). Empty: nothing is pinned, and the
	// datapath ends with the process.
	PinPath string

	// closingTimeout, in jiffies, replaces the program's CT_CLOSING_TIMEOUT when not
	// zero: tests shorten it so closed flows expire without waiting seconds.
	closingTimeout uint64
	// timeWaitTimeout, in jiffies, replaces the program's CT_TIME_WAIT_TIMEOUT when not
	// zero.
	timeWaitTimeout uint64
	// probeTCX, when set, replaces the kernel probe AttachAuto decides by: tests make it
	// report tcx unsupported.
	probeTCX func(*ebpf.Program) error
	// variant, when set, is the only program variant New loads, instead of the one the
	// kernel's features pick: tests run both on a kernel that has the kfunc.
	variant variant
	// editSpec, when set, changes a variant's spec before it is loaded: tests make the
	// kernel refuse one.
	editSpec func(variant, *ebpf.CollectionSpec)
}

func (c *Config) setDefaults() {
	if c.ConntrackSize == 0 {
		c.ConntrackSize = DefaultConntrackSize
	}
	if c.MaxServices == 0 {
		c.MaxServices = DefaultMaxServices
	}
	if c.MaxEndpoints == 0 {
		c.MaxEndpoints = DefaultMaxEndpoints
	}
	if c.RingSlots == 0 {
		c.RingSlots = RingSlotsFor(c.MaxServices, c.MaxEndpoints)
	}
	if c.MaxSourceRanges == 0 {
		c.MaxSourceRanges = DefaultMaxSourceRanges
	}
	if c.SourceRangeEntries == 0 {
		c.SourceRangeEntries = DefaultSourceRangeEntries
	}
	if c.SNATPortMin == 0 && c.SNATPortMax == 0 {
		c.SNATPortMin, c.SNATPortMax = DefaultSNATPortMin, DefaultSNATPortMax
	}
	if c.AttachMode == "" {
		c.AttachMode = AttachAuto
	}
}

// Datapath is the loaded program, its maps and its attachments.
type Datapath struct {
	log     *slog.Logger
	cfg     Config
	objs    lbObjects
	variant variant     // the program variant loaded
	hook    hook        // where the program runs on Config.Interfaces
	links   []link.Link // tcx
	filters []tcFilter  // tc
	pins    *pinDir     // nil without Config.PinPath
	adopted bool        // the maps were adopted from an earlier Datapath

	mu      sync.Mutex
	closed  bool
	applied map[frontendKey]*applied
	rings   *rangeAlloc
	epIDs   idAlloc
	epGen   []uint32 // generation of each endpoint id, bumped on release
	svcIDs  idAlloc
	vipRefs map[netip.Addr]int
	// rangeCount is the number of entries of each family's source-range trie
	// (rangeFamily).
	rangeCount [2]int
}

// New loads the program and maps sized by cfg and attaches the program to cfg's
// interfaces at the ingress hook cfg.AttachMode selects (logged with the reason). Close
// undoes both. It fails with ErrNoInterface, before loading anything, when an interface
// of cfg.Interfaces does not exist.
//
// With cfg.PinPath, New first adopts what an earlier Datapath left pinned there: maps
// of the same layout and capacities are kept (conntrack, rings, endpoints, counters)
// and the Go-side state is rebuilt from them; incompatible ones are replaced (logged
// with the reason). Links still attached to a configured interface get the new program
// atomically; other configured interfaces are attached and pinned, and pinned links of
// interfaces no longer configured are detached. It fails with ErrNotBPFFS when PinPath
// is not on bpffs and with ErrPinPathInUse while another Datapath holds it.
func New(cfg Config, log *slog.Logger) (*Datapath, error) {
	cfg.setDefaults()
	if cfg.SNATPortMax < cfg.SNATPortMin {
		return nil, fmt.Errorf("load datapath: SNAT port range %d-%d is empty", cfg.SNATPortMin, cfg.SNATPortMax)
	}
	if _, err := ParseAttachMode(string(cfg.AttachMode)); err != nil {
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	if lo, hi, err := localPortRange(); err == nil && portRangesOverlap(cfg.SNATPortMin, cfg.SNATPortMax, lo, hi) {
		log.Warn("SNAT ports overlap the node's ip_local_port_range: a reply to the node's own connection to an endpoint can be taken for a load-balanced flow's",
			"snatPorts", fmt.Sprintf("%d-%d", cfg.SNATPortMin, cfg.SNATPortMax), "ip_local_port_range", fmt.Sprintf("%d-%d", lo, hi))
	}
	if cfg.RingSlots%2 != 0 {
		cfg.RingSlots++
	}
	if err := checkInterfaces(cfg); err != nil {
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	// The variants' maps are the same: this spec sizes them for the estimate and for
	// adopting pinned maps; the program is loaded from its variant's (loadProgram).
	spec, err := loadLb()
	if err != nil {
		return nil, fmt.Errorf("load datapath spec: %w", err)
	}
	if err := sizeMaps(spec, cfg); err != nil {
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	if est, err := estimateMemory(spec, runtime.NumCPU()); err == nil {
		log.Info("datapath maps sized", "maxServices", cfg.MaxServices, "maxEndpoints", cfg.MaxEndpoints,
			"ringSlots", cfg.RingSlots, "conntrackSize", cfg.ConntrackSize, "cpus", runtime.NumCPU(),
			"estimatedMemory", fmt.Sprintf("%.1f MiB", float64(est.Total)/(1<<20)))
	}

	d := &Datapath{
		log:     log,
		cfg:     cfg,
		applied: map[frontendKey]*applied{},
		rings:   newRangeAlloc(uint32(cfg.RingSlots)),
		epIDs:   idAlloc{capacity: uint32(cfg.MaxEndpoints)},
		epGen:   make([]uint32, cfg.MaxEndpoints),
		svcIDs:  idAlloc{capacity: uint32(cfg.MaxServices)},
		vipRefs: map[netip.Addr]int{},
	}
	if cfg.PinPath != "" {
		if err := d.loadPinned(spec); err != nil {
			// What is pinned stays: it may be forwarding, and the next New adopts it.
			_ = d.Release()
			return nil, err
		}
		return d, nil
	}
	if err := d.loadProgram(nil); err != nil {
		return nil, err
	}
	d.chooseHook()
	if err := d.attach(); err != nil {
		_ = d.Close()
		return nil, err
	}
	return d, nil
}

// loadPinned loads the program with the maps pinned under cfg.PinPath, adopting them
// when compatible and pinning new ones otherwise, and attaches it through pinned links.
func (d *Datapath) loadPinned(spec *ebpf.CollectionSpec) error {
	pins, err := openPinDir(d.cfg.PinPath, true)
	if err != nil {
		return fmt.Errorf("load datapath: %w", err)
	}
	d.pins = pins
	r, err := d.adoptMaps(spec)
	if err != nil {
		return fmt.Errorf("load datapath: %w", err)
	}
	// Pinned by name: the loader opens the pins adoptMaps kept, or creates and pins new
	// maps where it removed them.
	if err := d.loadProgram(&ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: filepath.Join(d.cfg.PinPath, pinMaps)}}); err != nil {
		return err
	}
	if r == nil {
		if err := d.writeLayout(spec); err != nil {
			return fmt.Errorf("load datapath: %w", err)
		}
	} else {
		d.applied, d.rings, d.epIDs, d.epGen, d.svcIDs, d.vipRefs = r.applied, r.rings, r.epIDs, r.epGen, r.svcIDs, r.vipRefs
		d.rangeCount = r.rangeCount
		d.adopted = true
	}
	d.chooseHook()
	return d.attachPinned()
}

// loadProgram loads the program variant the kernel runs (see loadProgram in
// variant.go) with its maps into d.objs; with opts (pinning), the maps of pinnedMaps
// are opened where pinned, and pinned where created.
func (d *Datapath) loadProgram(opts *ebpf.CollectionOptions) error {
	prepare := func(v variant, spec *ebpf.CollectionSpec) error {
		if opts != nil {
			for _, name := range pinnedMaps {
				spec.Maps[name].Pinning = ebpf.PinByName
			}
		}
		return prepareSpec(spec, v, d.cfg)
	}
	load := func(spec *ebpf.CollectionSpec) error {
		err := spec.LoadAndAssign(&d.objs, opts)
		if err != nil && !refused(err) {
			return fmt.Errorf("load datapath program: %w", err)
		}
		return err
	}
	v, err := loadProgram(d.cfg.variant, d.log, prepare, load)
	d.variant = v
	return err
}

// prepareSpec sizes spec's maps and sets the program's variables from cfg; v is the
// variant spec was loaded for (cfg.editSpec, in tests, may change it).
func prepareSpec(spec *ebpf.CollectionSpec, v variant, cfg Config) error {
	if err := sizeMaps(spec, cfg); err != nil {
		return fmt.Errorf("load datapath: %w", err)
	}
	if err := spec.Variables["snat_port_min"].Set(cfg.SNATPortMin); err != nil {
		return fmt.Errorf("set snat_port_min: %w", err)
	}
	if err := spec.Variables["snat_port_count"].Set(uint16(int(cfg.SNATPortMax) - int(cfg.SNATPortMin) + 1)); err != nil {
		return fmt.Errorf("set snat_port_count: %w", err)
	}
	if cfg.closingTimeout != 0 {
		if err := spec.Variables["ct_closing_timeout"].Set(cfg.closingTimeout); err != nil {
			return fmt.Errorf("set ct_closing_timeout: %w", err)
		}
	}
	if cfg.timeWaitTimeout != 0 {
		if err := spec.Variables["ct_time_wait_timeout"].Set(cfg.timeWaitTimeout); err != nil {
			return fmt.Errorf("set ct_time_wait_timeout: %w", err)
		}
	}
	if cfg.editSpec != nil {
		cfg.editSpec(v, spec)
	}
	return nil
}

// attach hooks the program to every configured interface, inside cfg.NetNS if set.
func (d *Datapath) attach() error {
	return d.inNetNS(func() error {
		for _, name := range d.cfg.Interfaces {
			ifindex, err := interfaceIndex(name, d.cfg.NetNS)
			if err != nil {
				return err
			}
			if d.hook == hookTC {
				f, err := d.attachTC(name, ifindex, nil)
				if err != nil {
					return err
				}
				d.filters = append(d.filters, f)
				continue
			}
			l, err := d.attachLink(name, ifindex)
			if err != nil {
				return err
			}
			d.links = append(d.links, l)
			if err := d.removeStaleFilter(name, ifindex); err != nil {
				return err
			}
		}
		return nil
	})
}

// attachLink attaches the program at tcx ingress of an interface.
func (d *Datapath) attachLink(name string, ifindex int) (link.Link, error) {
	l, err := link.AttachTCX(link.TCXOptions{
		Interface: ifindex,
		Program:   d.objs.LbIngress,
		Attach:    ebpf.AttachTCXIngress,
	})
	if errors.Is(err, ebpf.ErrNotSupported) {
		return nil, fmt.Errorf("attach tcx ingress to %s: %w (attach mode %s or %s uses a tc filter instead)", name, err, AttachAuto, AttachTC)
	}
	if err != nil {
		return nil, fmt.Errorf("attach tcx ingress to %s: %w", name, err)
	}
	d.log.Info("datapath attached", "interface", name, "hook", hookTCX)
	return l, nil
}

// inNetNS runs fn inside cfg.NetNS if set; with no interface to attach and no pinned
// link to look at, it does nothing.
func (d *Datapath) inNetNS(fn func() error) error {
	if len(d.cfg.Interfaces) == 0 && d.pins == nil {
		return nil
	}
	return inNetNSPath(d.cfg.NetNS, fn)
}

// inNetNSPath runs fn inside the network namespace at path, or where the caller is when
// path is empty. The thread is locked while it sits in another namespace so no other
// goroutine runs there by accident.
func inNetNSPath(path string, fn func() error) (err error) {
	if path == "" {
		return fn()
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return fmt.Errorf("get current netns: %w", err)
	}
	defer orig.Close()
	target, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		return fmt.Errorf("enter netns %s: %w", path, err)
	}
	defer func() {
		if rerr := netns.Set(orig); rerr != nil {
			// The thread is unusable in the wrong namespace: let it die with the
			// goroutine rather than return it to the scheduler.
			runtime.LockOSThread()
			err = errors.Join(err, fmt.Errorf("restore network namespace: %w", rerr))
		}
	}()
	return fn()
}

// Close detaches the program from every interface it was attached to (in tc mode it
// removes its own filters, and a clsact qdisc it added when nothing else uses it) and
// releases the maps. Established flows stop being translated. With a PinPath it also
// removes everything pinned there: it is a real stop (uninstall), not a restart; see
// Release.
func (d *Datapath) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	var errs []error
	if len(d.filters) > 0 {
		// Unlike a link, a filter stays when the process's descriptors close.
		errs = append(errs, d.inNetNS(d.removeFilters))
	}
	errs = append(errs, d.closeFDs())
	if d.pins != nil {
		// The pins kept the links attached after their descriptors closed: removing
		// them detaches.
		if err := d.pins.removeAll(); err != nil {
			errs = append(errs, err)
		}
		d.pins.unlock()
	}
	return errors.Join(errs...)
}

// Adopted reports whether New adopted the maps an earlier Datapath left pinned
// (conntrack included): the connections it served are still served, so this process
// restarts the node's forwarding state rather than starting it.
func (d *Datapath) Adopted() bool { return d.adopted }

// Release ends this Datapath but not the datapath: with a PinPath it closes the
// process's descriptors and leaves the maps and links pinned (tc filters attached and
// recorded), so the program keeps forwarding (services, endpoints and flows as they
// are) with no process at all, until a New with the same PinPath adopts it or Cleanup
// removes it. Without a PinPath nothing would find what is left, and Release is Close.
func (d *Datapath) Release() error {
	if d.pins == nil {
		return d.Close()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	err := d.closeFDs()
	d.pins.unlock()
	return err
}

// closeFDs closes the links (detaching those not pinned) and the program and maps. The
// tc filters keep the program they hold.
func (d *Datapath) closeFDs() error {
	var errs []error
	for i := len(d.links) - 1; i >= 0; i-- {
		if err := d.links[i].Close(); err != nil {
			errs = append(errs, fmt.Errorf("detach: %w", err))
		}
	}
	d.links = nil
	d.filters = nil
	if err := d.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close maps and program: %w", err))
	}
	return errors.Join(errs...)
}

// MapMemory is the memory the kernel accounts to the datapath's maps, in bytes.
func (d *Datapath) MapMemory() (uint64, error) {
	var total uint64
	for _, m := range []*ebpf.Map{d.objs.Conntrack4Tcp, d.objs.Conntrack4Udp, d.objs.Conntrack6, d.objs.Drops, d.objs.Endpoints, d.objs.RingSlots,
		d.objs.ServiceStats, d.objs.Services, d.objs.Vips, d.objs.EndpointNhs, d.objs.NewEntry, d.objs.SourceRanges4, d.objs.SourceRanges6,
		d.objs.SnatTimeWaitReuses} {
		info, err := m.Info()
		if err != nil {
			return 0, fmt.Errorf("map memory: %w", err)
		}
		n, ok := info.Memlock()
		// A trie allocates its entries as they are inserted: an empty one reports 0,
		// which reads as not reported.
		if !ok && info.Type != ebpf.LPMTrie {
			return 0, fmt.Errorf("map memory: kernel does not report memlock of %s", info.Name)
		}
		total += n
	}
	return total, nil
}

// localPortRange reads the node's net.ipv4.ip_local_port_range, which IPv6 shares.
func localPortRange() (lo, hi uint16, err error) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0, 0, err
	}
	var x, y uint16
	if _, err := fmt.Sscan(string(b), &x, &y); err != nil {
		return 0, 0, fmt.Errorf("read ip_local_port_range %q: %w", b, err)
	}
	return x, y, nil
}

// portRangesOverlap tells whether the port ranges a-b and c-d share a port.
func portRangesOverlap(a, b, c, d uint16) bool { return a <= d && c <= b }
