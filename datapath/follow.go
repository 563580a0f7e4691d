package datapath

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path"
	"slices"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Interface is what the choice of interfaces reads of one of the host's links.
type Interface struct {
	Name     string
	Loopback bool
}

// MatchInterfaces is the choice of the interfaces patterns name among links: the
// names, sorted, of the links that match a pattern (path.Match syntax; a plain name is
// a pattern matching itself), and the patterns that match none. A wildcard never
// matches a loopback, which can only be named. Links match up or down, so one that
// comes up later is already served.
func MatchInterfaces(patterns []string, links []Interface) (names, unmatched []string) {
	found := map[string]bool{}
	for _, p := range patterns {
		n := 0
		for _, l := range links {
			if ok, _ := path.Match(p, l.Name); ok && (!l.Loopback || p == l.Name) {
				found[l.Name] = true
				n++
			}
		}
		if n == 0 {
			unmatched = append(unmatched, p)
		}
	}
	for name := range found {
		names = append(names, name)
	}
	slices.Sort(names)
	return names, unmatched
}

// FollowInterfaces keeps the program on the interfaces patterns match
// (MatchInterfaces) as links appear, are renamed and go, until ctx ends: it subscribes
// to the link updates of Config.NetNS, then lists the links and applies the match with
// SetInterfaces once, and again after each burst of updates. A subscription the kernel
// ends (its socket overran) is made again, and the links listed again. Errors of one
// pass are logged; the next update tries again. An interface that keeps failing (an
// attach another party's tc filter refuses) is logged once per error, not on each of
// the updates that follow: again when its error changes, and when it fails again after
// it was served or left alone.
func (d *Datapath) FollowInterfaces(ctx context.Context, patterns []string) error {
	failing := map[string]string{} // interface -> its error last logged
	for {
		ch := make(chan netlink.LinkUpdate, 256)
		done := make(chan struct{})
		var stopping atomic.Bool // closing the socket ends its receiver with an error
		opts := netlink.LinkSubscribeOptions{ErrorCallback: func(err error) {
			if !stopping.Load() {
				d.log.Warn("interface updates", "err", err)
			}
		}}
		if d.cfg.NetNS != "" {
			ns, err := netns.GetFromPath(d.cfg.NetNS)
			if err != nil {
				return fmt.Errorf("follow interfaces: open netns %s: %w", d.cfg.NetNS, err)
			}
			opts.Namespace = &ns
			err = netlink.LinkSubscribeWithOptions(ch, done, opts)
			ns.Close()
			if err != nil {
				return fmt.Errorf("follow interfaces: subscribe to link updates: %w", err)
			}
		} else if err := netlink.LinkSubscribeWithOptions(ch, done, opts); err != nil {
			return fmt.Errorf("follow interfaces: subscribe to link updates: %w", err)
		}
		stop := func() {
			stopping.Store(true)
			close(done)
			for range ch { // the receiver ends, and closes ch, once its socket is closed
			}
		}
		d.followPass(patterns, failing)
		for open := true; open; {
			select {
			case <-ctx.Done():
				stop()
				return nil
			case _, open = <-ch:
				// A burst (a pod's veth created, renamed, moved, brought up) is one pass.
				for open && len(ch) > 0 {
					_, open = <-ch
				}
				d.followPass(patterns, failing)
			}
		}
		stop()
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
	}
}

// followPass lists the links and serves those patterns match. A listing the kernel
// marks interrupted (the links changed during it) may lack links that are there, so it
// is never applied: it is listed again, and after three such listings the pass is left
// to the next update, which the change that interrupted it brings. failing holds the
// error last logged for each interface (the key "" for the listing), so that a pass
// logs only what changed.
func (d *Datapath) followPass(patterns []string, failing map[string]string) {
	errs := map[string][]error{}
	var links []netlink.Link
	err := inNetNSPath(d.cfg.NetNS, func() error {
		var err error
		for range 3 {
			if links, err = netlink.LinkList(); !errors.Is(err, netlink.ErrDumpInterrupted) {
				break
			}
		}
		return err
	})
	if err != nil {
		errs[""] = []error{fmt.Errorf("list links: %w", err)}
	} else {
		ifs := make([]Interface, 0, len(links))
		for _, l := range links {
			a := l.Attrs()
			ifs = append(ifs, Interface{Name: a.Name, Loopback: a.Flags&net.FlagLoopback != 0})
		}
		names, _ := MatchInterfaces(patterns, ifs)
		for _, e := range d.setInterfaces(names) {
			errs[e.name] = append(errs[e.name], e.err)
		}
	}
	// What failed before and not in this pass was served, left alone or is gone: its
	// next failure is news.
	for name := range failing {
		if errs[name] == nil {
			delete(failing, name)
		}
	}
	for name, es := range errs {
		err := errors.Join(es...)
		if failing[name] == err.Error() {
			continue
		}
		failing[name] = err.Error()
		if name == "" {
			d.log.Error("follow interfaces", "err", err)
		} else {
			d.log.Error("follow interfaces: interface failed", "interface", name, "err", err)
		}
	}
}

// ErrClosed: the Datapath was closed or released.
var ErrClosed = errors.New("datapath closed")

// Interfaces returns the interfaces the program is attached to, sorted.
func (d *Datapath) Interfaces() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Sorted(slices.Values(d.cfg.Interfaces))
}

// attachment is the program on one interface: Datapath.cfg.Interfaces[i] with
// d.links[i] (tcx) or d.filters[i] (tc), and the interface's index.
type attachment struct {
	name    string
	ifindex int // 0: the interface is gone
	link    link.Link
	filter  tcFilter
}

// SetInterfaces attaches the program to exactly the named interfaces, at the hook New
// chose, and is declarative like SetServices: an interface already served is left as
// it is; one that is no longer named is detached; one that is gone (deleted, or its
// network namespace) is forgotten, and with a PinPath its link pin or tc record is
// removed, so nothing of it is left; one renamed to another named interface is kept
// attached under its new name (its pin or record moves). A named interface that does
// not exist is skipped: the next call finds it if it comes. Each attach and detach is
// logged; errors of one interface do not stop the others.
func (d *Datapath) SetInterfaces(names []string) error {
	var errs []error
	for _, e := range d.setInterfaces(names) {
		errs = append(errs, e.err)
	}
	return errors.Join(errs...)
}

// interfaceError is what SetInterfaces could not do for one interface.
type interfaceError struct {
	name string // the interface, "" when the error concerns none
	err  error
}

// setInterfaces is SetInterfaces with its errors told apart by interface.
func (d *Datapath) setInterfaces(names []string) []interfaceError {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return []interfaceError{{err: ErrClosed}}
	}
	want := slices.Compact(slices.Sorted(slices.Values(names)))
	var errs []interfaceError
	err := inNetNSPath(d.cfg.NetNS, func() error {
		if len(d.cfg.Interfaces) == 0 && len(want) > 0 {
			// New attached nothing, so it chose no hook.
			d.selectHook()
		}
		add := func(name string, err error) {
			if err != nil {
				errs = append(errs, interfaceError{name, err})
			}
		}
		var kept []attachment
		for _, a := range d.attachments() {
			var lk netlink.Link
			if a.ifindex != 0 {
				var err error
				if lk, err = netlink.LinkByIndex(a.ifindex); err != nil {
					var nf netlink.LinkNotFoundError
					if !errors.As(err, &nf) {
						add(a.name, fmt.Errorf("interface %s: %w", a.name, err))
						kept = append(kept, a)
						continue
					}
					lk = nil
				}
			}
			switch {
			case lk == nil:
				add(a.name, d.detach(a, false, "the interface is gone"))
			case lk.Attrs().Name != a.name && slices.Contains(want, lk.Attrs().Name):
				b, err := d.renamed(a, lk.Attrs().Name)
				add(b.name, err)
				kept = append(kept, b)
			case lk.Attrs().Name != a.name:
				add(lk.Attrs().Name, d.detach(a, true, "renamed to "+lk.Attrs().Name+", which is not served"))
			case !slices.Contains(want, a.name):
				add(a.name, d.detach(a, true, "no longer served"))
			default:
				kept = append(kept, a)
			}
		}
		for _, name := range want {
			if slices.ContainsFunc(kept, func(a attachment) bool { return a.name == name }) {
				continue
			}
			lk, err := netlink.LinkByName(name)
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) {
				continue
			}
			if err != nil {
				add(name, fmt.Errorf("interface %s: %w", name, err))
				continue
			}
			a, err := d.attachOne(name, lk.Attrs().Index)
			if err != nil {
				add(name, err)
				continue
			}
			kept = append(kept, a)
		}
		d.setAttachments(kept)
		return nil
	})
	if err != nil {
		errs = append(errs, interfaceError{err: err})
	}
	return errs
}

// attachments pairs the served interfaces with their links or filters.
func (d *Datapath) attachments() []attachment {
	as := make([]attachment, len(d.cfg.Interfaces))
	for i, name := range d.cfg.Interfaces {
		as[i].name = name
		switch {
		case i < len(d.filters):
			as[i].filter = d.filters[i]
			as[i].ifindex = d.filters[i].ifindex
		case i < len(d.links):
			as[i].link = d.links[i]
			as[i].ifindex = linkIfindex(d.links[i])
		}
	}
	return as
}

func (d *Datapath) setAttachments(as []attachment) {
	d.cfg.Interfaces, d.links, d.filters = nil, nil, nil
	for _, a := range as {
		d.cfg.Interfaces = append(d.cfg.Interfaces, a.name)
		if a.link != nil {
			d.links = append(d.links, a.link)
		} else {
			d.filters = append(d.filters, a.filter)
		}
	}
}

// linkIfindex is the interface a tcx link is attached to, 0 when that interface is
// gone (the kernel keeps the link, detached).
func linkIfindex(l link.Link) int {
	info, err := l.Info()
	if err != nil || info.TCX() == nil {
		return 0
	}
	return int(info.TCX().Ifindex)
}

// attachOne attaches the program to one interface at the chosen hook, pinned or
// recorded when there is a pin path. It runs in the interface's network namespace.
func (d *Datapath) attachOne(name string, ifindex int) (attachment, error) {
	a := attachment{name: name, ifindex: ifindex}
	n := len(d.links) + len(d.filters)
	var err error
	switch {
	case d.hook == hookTC && d.pins != nil:
		err = d.attachPinnedTC(name, ifindex)
	case d.hook == hookTC:
		var f tcFilter
		if f, err = d.attachTC(name, ifindex, nil); err == nil {
			d.filters = append(d.filters, f)
		}
	case d.pins != nil:
		err = d.attachPinnedTCX(name, ifindex)
	default:
		var l link.Link
		if l, err = d.attachLink(name, ifindex); err == nil {
			d.links = append(d.links, l)
			err = d.removeStaleFilter(name, ifindex)
		}
	}
	// The helpers append what they attached; take it back into the attachment.
	if len(d.links)+len(d.filters) > n {
		if d.hook == hookTC {
			a.filter, d.filters = d.filters[len(d.filters)-1], d.filters[:len(d.filters)-1]
		} else {
			a.link, d.links = d.links[len(d.links)-1], d.links[:len(d.links)-1]
		}
		if err != nil {
			// Attached but not completed (a pin or record failed): undo, so that the
			// next pass tries again from nothing.
			err = errors.Join(err, d.detach(a, true, "attaching failed"))
		}
	}
	return a, err
}

// detach removes the program from an interface that is still there (present), or
// forgets one that is gone, its pin or record included, and logs it.
func (d *Datapath) detach(a attachment, present bool, why string) error {
	var errs []error
	h := hookTCX
	if a.link != nil {
		if d.pins != nil {
			errs = append(errs, d.pins.removeLink(a.name))
		}
		if err := a.link.Close(); err != nil && present {
			errs = append(errs, fmt.Errorf("detach from %s: %w", a.name, err))
		}
	} else {
		h = hookTC
		// A gone interface took its filter with it: removeFilter finds nothing.
		_, err := removeFilter(a.filter)
		errs = append(errs, err)
		if d.pins != nil {
			errs = append(errs, d.pins.removeTC(a.name))
		}
	}
	err := errors.Join(errs...)
	if err == nil {
		d.log.Info("datapath detached", "interface", a.name, "hook", h, "reason", why)
	}
	return err
}

// renamed moves an attachment to the new name of its interface: the program stays,
// and so does its pin or record, under the new name.
func (d *Datapath) renamed(a attachment, name string) (attachment, error) {
	old := a.name
	a.name = name
	a.filter.ifname = name
	var err error
	if d.pins != nil {
		if a.link != nil {
			err = os.Rename(d.pins.linkPath(old), d.pins.linkPath(name))
		} else if err = d.pins.writeTC(a.filter, d.cfg.NetNS); err == nil {
			err = os.Remove(d.pins.tcPath(old))
		}
		if err != nil {
			err = fmt.Errorf("interface %s renamed to %s: move its pin: %w", old, name, err)
		}
	}
	d.log.Info("datapath interface renamed", "interface", name, "previousName", old)
	return a, err
}
