package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netns"
)

// Defaults of Config's capacities.
const (
	DefaultConntrackSize = 262144
	DefaultMaxServices   = 16384
	DefaultMaxEndpoints  = 65536
	DefaultRingSlots     = 1 << 22
	DefaultSNATPortMin   = 61000
	DefaultSNATPortMax   = 65535
)

var errRingFull = errors.New("ring slots exhausted (raise Config.RingSlots)")

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
	// MaxServices bounds the number of frontends (VIP, port, protocol).
	MaxServices int
	// MaxEndpoints bounds the endpoints of all frontends together.
	MaxEndpoints int
	// RingSlots bounds the ring slots of all frontends together: a Maglev frontend
	// takes about 100 per endpoint (at least 251), an rr frontend one per endpoint, and
	// an update needs room for the new ring next to the old one.
	RingSlots int
	// SNATPortMin and SNATPortMax bound the source ports of onearm and fullnat flows.
	// Keep them outside the node's ip_local_port_range.
	SNATPortMin, SNATPortMax uint16

	// closingTimeout, in jiffies, replaces the program's CT_CLOSING_TIMEOUT when not
	// zero: tests shorten it so closed flows expire without waiting seconds.
	closingTimeout uint64
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
		c.RingSlots = DefaultRingSlots
	}
	if c.SNATPortMin == 0 && c.SNATPortMax == 0 {
		c.SNATPortMin, c.SNATPortMax = DefaultSNATPortMin, DefaultSNATPortMax
	}
}

// Datapath is the loaded program, its maps and its attachments.
type Datapath struct {
	log   *slog.Logger
	cfg   Config
	objs  lbObjects
	links []link.Link

	mu      sync.Mutex
	applied map[frontendKey]*applied
	rings   *rangeAlloc
	epIDs   idAlloc
	epGen   []uint32 // generation of each endpoint id, bumped on release
	svcIDs  idAlloc
	vipRefs map[netip.Addr]int
}

// New loads the program and maps sized by cfg and attaches the program to cfg's
// interfaces at tcx ingress. Close undoes both.
func New(cfg Config, log *slog.Logger) (*Datapath, error) {
	cfg.setDefaults()
	if cfg.SNATPortMax < cfg.SNATPortMin {
		return nil, fmt.Errorf("load datapath: SNAT port range %d-%d is empty", cfg.SNATPortMin, cfg.SNATPortMax)
	}
	if cfg.RingSlots%2 != 0 {
		cfg.RingSlots++
	}
	spec, err := loadLb()
	if err != nil {
		return nil, fmt.Errorf("load datapath spec: %w", err)
	}
	sizes := map[string]int{
		lbMapConntrack4Tcp: cfg.ConntrackSize,
		lbMapConntrack4Udp: cfg.ConntrackSize,
		lbMapConntrack6:    cfg.ConntrackSize,
		lbMapServices:      cfg.MaxServices,
		lbMapVips:          cfg.MaxServices,
		lbMapServiceStats:  cfg.MaxServices,
		lbMapEndpoints:     cfg.MaxEndpoints,
		lbMapRingSlots:     cfg.RingSlots / 2,
	}
	for name, n := range sizes {
		if n <= 0 {
			return nil, fmt.Errorf("load datapath: size of map %s must be positive, got %d", name, n)
		}
		spec.Maps[name].MaxEntries = uint32(n)
	}
	if err := spec.Variables["snat_port_min"].Set(cfg.SNATPortMin); err != nil {
		return nil, fmt.Errorf("set snat_port_min: %w", err)
	}
	if err := spec.Variables["snat_port_count"].Set(uint16(int(cfg.SNATPortMax) - int(cfg.SNATPortMin) + 1)); err != nil {
		return nil, fmt.Errorf("set snat_port_count: %w", err)
	}
	if cfg.closingTimeout != 0 {
		if err := spec.Variables["ct_closing_timeout"].Set(cfg.closingTimeout); err != nil {
			return nil, fmt.Errorf("set ct_closing_timeout: %w", err)
		}
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
	if err := spec.LoadAndAssign(&d.objs, nil); err != nil {
		return nil, fmt.Errorf("load datapath program: %w", err)
	}
	if err := d.attach(); err != nil {
		_ = d.Close()
		return nil, err
	}
	return d, nil
}

// attach links the program to every configured interface, inside cfg.NetNS if set.
// The thread is locked while it sits in another namespace so no other goroutine runs
// there by accident.
func (d *Datapath) attach() error {
	if len(d.cfg.Interfaces) == 0 {
		return nil
	}
	if d.cfg.NetNS != "" {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		orig, err := netns.Get()
		if err != nil {
			return fmt.Errorf("attach: get current netns: %w", err)
		}
		defer orig.Close()
		target, err := netns.GetFromPath(d.cfg.NetNS)
		if err != nil {
			return fmt.Errorf("attach: open netns %s: %w", d.cfg.NetNS, err)
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			return fmt.Errorf("attach: enter netns %s: %w", d.cfg.NetNS, err)
		}
		defer func() {
			if err := netns.Set(orig); err != nil {
				// The thread is unusable in the wrong namespace: let it die with the
				// goroutine rather than return it to the scheduler.
				d.log.Error("restore network namespace", "err", err)
				runtime.LockOSThread()
			}
		}()
	}
	for _, name := range d.cfg.Interfaces {
		ifc, err := net.InterfaceByName(name)
		if err != nil {
			return fmt.Errorf("attach to %s: %w", name, err)
		}
		l, err := link.AttachTCX(link.TCXOptions{
			Interface: ifc.Index,
			Program:   d.objs.LbIngress,
			Attach:    ebpf.AttachTCXIngress,
		})
		if err != nil {
			return fmt.Errorf("attach tcx ingress to %s: %w", name, err)
		}
		d.links = append(d.links, l)
		d.log.Info("datapath attached", "interface", name, "hook", "tcx-ingress")
	}
	return nil
}

// Close detaches the program from every interface it was attached to and releases the
// maps. Established flows stop being translated.
func (d *Datapath) Close() error {
	var errs []error
	for i := len(d.links) - 1; i >= 0; i-- {
		if err := d.links[i].Close(); err != nil {
			errs = append(errs, fmt.Errorf("detach: %w", err))
		}
	}
	d.links = nil
	if err := d.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close maps and program: %w", err))
	}
	return errors.Join(errs...)
}

// MapMemory is the memory the kernel accounts to the datapath's maps, in bytes.
func (d *Datapath) MapMemory() (uint64, error) {
	var total uint64
	for _, m := range []*ebpf.Map{d.objs.Conntrack4Tcp, d.objs.Conntrack4Udp, d.objs.Conntrack6, d.objs.Drops, d.objs.Endpoints, d.objs.RingSlots,
		d.objs.ServiceStats, d.objs.Services, d.objs.Vips, d.objs.EndpointNhs, d.objs.NewEntry} {
		info, err := m.Info()
		if err != nil {
			return 0, fmt.Errorf("map memory: %w", err)
		}
		n, ok := info.Memlock()
		if !ok {
			return 0, fmt.Errorf("map memory: kernel does not report memlock of %s", info.Name)
		}
		total += n
	}
	return total, nil
}
