package datapath

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// AttachMode is the kernel hook the program runs at on Config.Interfaces.
type AttachMode string

// Attach modes.
const (
	// AttachAuto takes tcx when the kernel has it and classic tc otherwise.
	AttachAuto AttachMode = "auto"
	// AttachTCX attaches through a tcx link (bpf_link, no qdisc): Linux 6.6 or later.
	AttachTCX AttachMode = "tcx"
	// AttachTC attaches a direct-action bpf filter to the ingress of a clsact qdisc.
	AttachTC AttachMode = "tc"
)

// ParseAttachMode reads an attach mode: auto, tcx or tc.
func ParseAttachMode(s string) (AttachMode, error) {
	switch m := AttachMode(s); m {
	case AttachAuto, AttachTCX, AttachTC:
		return m, nil
	}
	return "", fmt.Errorf("attach mode %q: want %s, %s or %s", s, AttachAuto, AttachTCX, AttachTC)
}

// ErrNoInterface: an interface named in Config.Interfaces does not exist.
var ErrNoInterface = errors.New("no such interface")

// hook is where the program runs on the configured interfaces.
type hook int

const (
	hookTCX hook = iota
	hookTC
)

func (h hook) String() string {
	if h == hookTC {
		return "tc-ingress"
	}
	return "tcx-ingress"
}

// chooseHook sets d.hook from Config.AttachMode, probing the kernel for AttachAuto,
// and logs the choice with its reason. With no interface there is nothing to choose.
func (d *Datapath) chooseHook() {
	if len(d.cfg.Interfaces) == 0 {
		return
	}
	d.selectHook()
}

// selectHook is chooseHook for a Datapath that has interfaces to attach to: New's, or
// the first ones SetInterfaces gets after New had none.
func (d *Datapath) selectHook() {
	var why string
	switch d.cfg.AttachMode {
	case AttachTCX:
		d.hook, why = hookTCX, "attach mode tcx"
	case AttachTC:
		d.hook, why = hookTC, "attach mode tc"
	default:
		probe := d.cfg.probeTCX
		if probe == nil {
			probe = probeTCX
		}
		if err := probe(d.objs.LbIngress); err != nil {
			d.hook, why = hookTC, fmt.Sprintf("attach mode auto: tcx unavailable (%v)", err)
		} else {
			d.hook, why = hookTCX, "attach mode auto: the kernel has tcx"
		}
	}
	d.log.Info("datapath hook chosen", "hook", d.hook, "reason", why)
}

// probeTCX tells whether the kernel has tcx: it asks for a tcx link on an interface
// index no interface has, which a kernel with tcx refuses with ENODEV, and one without
// it with EINVAL (cilium/ebpf then reports ErrNotSupported with the version needed).
func probeTCX(prog *ebpf.Program) error {
	l, err := link.AttachTCX(link.TCXOptions{Interface: math.MaxInt32, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		l.Close()
		return nil
	}
	if errors.Is(err, unix.ENODEV) {
		return nil
	}
	return err
}

// checkInterfaces makes sure every configured interface exists, inside cfg.NetNS, so
// that a wrong name fails New before anything is loaded, attached or replaced.
func checkInterfaces(cfg Config) error {
	if len(cfg.Interfaces) == 0 {
		return nil
	}
	return inNetNSPath(cfg.NetNS, func() error {
		var missing []string
		for _, name := range cfg.Interfaces {
			_, err := netlink.LinkByName(name)
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) {
				missing = append(missing, strconv.Quote(name))
			} else if err != nil {
				return fmt.Errorf("interface %s: %w", name, err)
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("%w: %s (Config.Interfaces) in %s", ErrNoInterface, strings.Join(missing, ", "), netNSName(cfg.NetNS))
		}
		return nil
	})
}

// interfaceIndex looks an interface up in the current network namespace, which is the
// one at nsPath.
func interfaceIndex(name, nsPath string) (int, error) {
	l, err := netlink.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return 0, fmt.Errorf("attach to %s: %w in %s", name, ErrNoInterface, netNSName(nsPath))
	}
	if err != nil {
		return 0, fmt.Errorf("attach to %s: %w", name, err)
	}
	return l.Attrs().Index, nil
}

func netNSName(path string) string {
	if path == "" {
		return "this network namespace"
	}
	return "network namespace " + path
}
