package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/shardlb/shardlb/datapath"
	"github.com/vishvananda/netlink"
)

// noInterfaces is the --interfaces value that runs without a datapath.
const noInterfaces = "none"

// hostInterface is what interface resolution reads of one of the host's interfaces.
type hostInterface struct {
	Name     string
	Up       bool // administratively up
	Loopback bool
	Addrs    []netip.Addr
}

// hostRoute is one next hop of a route: a multipath route gives one per interface.
type hostRoute struct {
	Dst       netip.Prefix
	Interface string
}

// interfaceChoice is the result of resolveInterfaces: the names, sorted, and why.
type interfaceChoice struct {
	Names []string
	// Reason says how they were found, for the start-up log.
	Reason string
	// Unmatched are the patterns that matched no interface: with others matching this
	// is normal on a DaemonSet whose nodes differ, so it is logged, not refused.
	Unmatched []string
}

// resolveInterfaces turns --interfaces into the interfaces the datapath attaches to at
// start. Patterns are datapath.MatchInterfaces': path.Match syntax, a plain name is a
// pattern matching itself, any interface up or down, a wildcard never a loopback; the
// datapath then follows them (datapath.FollowInterfaces) as links come and go. Without
// patterns the choice is this node's, made once: the up, non-loopback interfaces that
// carry nodeIPs, else those of the IPv4 and IPv6 default routes. Finding nothing at
// start is an error naming what was seen.
func resolveInterfaces(patterns []string, nodeIPs []netip.Addr, links []hostInterface, routes []hostRoute) (interfaceChoice, error) {
	var ch interfaceChoice
	if len(patterns) > 0 {
		ifs := make([]datapath.Interface, len(links))
		for i, l := range links {
			ifs[i] = datapath.Interface{Name: l.Name, Loopback: l.Loopback}
		}
		ch.Names, ch.Unmatched = datapath.MatchInterfaces(patterns, ifs)
		if len(ch.Names) == 0 {
			return ch, fmt.Errorf("--interfaces=%s matches none of this node's interfaces (%s)", strings.Join(patterns, ","), seen(links))
		}
		ch.Reason = "--interfaces=" + strings.Join(patterns, ",")
		return ch, nil
	}

	byName := map[string]hostInterface{}
	for _, l := range links {
		byName[l.Name] = l
	}
	usable := func(name string) bool {
		l, ok := byName[name]
		return ok && l.Up && !l.Loopback
	}
	found := map[string]bool{}
	var carried []string
	for _, l := range links {
		for _, a := range l.Addrs {
			if slices.Contains(nodeIPs, a.Unmap().WithZone("")) && usable(l.Name) {
				found[l.Name] = true
				carried = append(carried, a.String())
			}
		}
	}
	if len(found) > 0 {
		slices.Sort(carried)
		ch.Names, ch.Reason = sortedKeys(found), "they carry --nodeIP "+strings.Join(slices.Compact(carried), ",")
		return ch, nil
	}
	for _, r := range routes {
		if r.Dst.IsValid() && r.Dst.Bits() == 0 && usable(r.Interface) {
			found[r.Interface] = true
		}
	}
	if len(found) > 0 {
		why := "they carry the default routes"
		if len(nodeIPs) > 0 {
			why = "no interface carries --nodeIP " + joinAddrs(nodeIPs) + "; " + why
		}
		ch.Names, ch.Reason = sortedKeys(found), why
		return ch, nil
	}
	what := "no up interface carries --nodeIP " + joinAddrs(nodeIPs) + " and none has a default route"
	if len(nodeIPs) == 0 {
		what = "no --nodeIP and no up interface with a default route"
	}
	return ch, fmt.Errorf("%s: set --interfaces to names or patterns (eth*,bond0) or to none for no datapath; interfaces seen: %s", what, seen(links))
}

// seen lists the host's interfaces for an error: names, down ones marked.
func seen(links []hostInterface) string {
	if len(links) == 0 {
		return "none"
	}
	names := make([]string, 0, len(links))
	for _, l := range links {
		n := l.Name
		if !l.Up {
			n += " (down)"
		}
		names = append(names, n)
	}
	return strings.Join(names, ", ")
}

func joinAddrs(as []netip.Addr) string {
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// findInterfaces sets c.Datapath.Interfaces from --interfaces and the host's
// interfaces and routes, and logs the choice; with --interfaces=none it leaves them
// empty, so no datapath is attached.
func (c *config) findInterfaces(log *slog.Logger) error {
	if c.NoDatapath {
		log.Info("no datapath", "reason", "--interfaces=none")
		return nil
	}
	links, routes, err := readHostNetwork()
	if err != nil {
		return fmt.Errorf("read this node's interfaces for --interfaces: %w", err)
	}
	ch, err := resolveInterfaces(c.Interfaces, c.Kube.NodeAddresses, links, routes)
	if err != nil {
		return err
	}
	if len(ch.Unmatched) > 0 {
		log.Warn("--interfaces patterns match no interface on this node", "patterns", strings.Join(ch.Unmatched, ","))
	}
	log.Info("datapath interfaces", "interfaces", strings.Join(ch.Names, ","), "reason", ch.Reason)
	c.Datapath.Interfaces = ch.Names
	return nil
}

// readHostNetwork reads the interfaces and the main table's default routes of the
// network namespace the process runs in.
func readHostNetwork() ([]hostInterface, []hostRoute, error) {
	ls, err := netlink.LinkList()
	if err != nil {
		return nil, nil, fmt.Errorf("list links: %w", err)
	}
	links := make([]hostInterface, 0, len(ls))
	names := map[int]string{}
	for _, l := range ls {
		a := l.Attrs()
		names[a.Index] = a.Name
		hi := hostInterface{Name: a.Name, Up: a.Flags&net.FlagUp != 0, Loopback: a.Flags&net.FlagLoopback != 0}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return nil, nil, fmt.Errorf("addresses of %s: %w", a.Name, err)
		}
		for _, ad := range addrs {
			if ip, ok := netip.AddrFromSlice(ad.IP); ok {
				hi.Addrs = append(hi.Addrs, ip.Unmap())
			}
		}
		links = append(links, hi)
	}
	var routes []hostRoute
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: 254}, netlink.RT_FILTER_TABLE)
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return nil, nil, fmt.Errorf("list routes: %w", err)
		}
		for _, r := range rs {
			dst := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
			if fam == netlink.FAMILY_V6 {
				dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
			}
			if r.Dst != nil {
				if ones, _ := r.Dst.Mask.Size(); ones != 0 {
					continue
				}
			}
			idx := []int{r.LinkIndex}
			for _, nh := range r.MultiPath {
				idx = append(idx, nh.LinkIndex)
			}
			for _, i := range idx {
				if n, ok := names[i]; ok {
					routes = append(routes, hostRoute{Dst: dst, Interface: n})
				}
			}
		}
	}
	return links, routes, nil
}
