package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/shardlb/shardlb/internal/labsys"
)

// client is the outside world: a namespace behind the router. The lab's own Go code
// fetches pages from there by creating its sockets inside that namespace.
type client struct {
	ns string
	h  netns.NsHandle
	tr *http.Transport
}

func newClient(ns string) (*client, error) {
	h, err := netns.GetFromName(ns)
	if err != nil {
		return nil, fmt.Errorf("open namespace %s: %w", ns, err)
	}
	c := &client{ns: ns, h: h}
	// A new connection per request: every probe is a new flow, routed afresh.
	c.tr = &http.Transport{DialContext: c.dial, DisableKeepAlives: true}
	return c, nil
}

func (c *client) close() {
	c.tr.CloseIdleConnections()
	_ = c.h.Close()
}

// dial opens a TCP connection from the client namespace.
func (c *client) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := labsys.InNetNS(c.h, func() error {
		var err error
		conn, err = (&net.Dialer{}).DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

// getFrom fetches http://target/ on a new connection from the client's address src
// (one of the client namespace's addresses) within timeout.
func (c *client) getFrom(ctx context.Context, src netip.Addr, target netip.AddrPort, timeout time.Duration) (page, error) {
	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var conn net.Conn
		err := labsys.InNetNS(c.h, func() error {
			var err error
			conn, err = (&net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))}).DialContext(ctx, network, addr)
			return err
		})
		return conn, err
	}}
	defer tr.CloseIdleConnections()
	return fetch(ctx, tr, target, timeout)
}

// page is what one GET returned.
type page struct {
	Body string
	Pod  string // the X-Pod header: which backend answered
}

// get fetches http://target/ on a new connection within timeout.
func (c *client) get(ctx context.Context, target netip.AddrPort, timeout time.Duration) (page, error) {
	return fetch(ctx, c.tr, target, timeout)
}

// fetch GETs http://target/ through tr within timeout.
func fetch(ctx context.Context, tr http.RoundTripper, target netip.AddrPort, timeout time.Duration) (page, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+target.String()+"/", nil)
	if err != nil {
		return page{}, err
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return page{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return page{}, err
	}
	if resp.StatusCode != http.StatusOK {
		return page{}, fmt.Errorf("%s", resp.Status)
	}
	if !strings.Contains(string(body), "<title>Welcome to nginx!</title>") {
		return page{}, errors.New("not the nginx page")
	}
	return page{Body: string(body), Pod: resp.Header.Get(podHeader)}, nil
}

// probe is one GET of a prober: when it started and how it ended.
type probe struct {
	start time.Time
	err   error
}

// prober GETs each target on a new connection every interval, whether or not the
// previous GET has finished, so that an outage shows as a run of failed probes
// whose length does not depend on the timeout.
type prober struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	probes map[netip.AddrPort][]probe
}

// probeTimeout bounds one probe: a SYN to a dead node is never answered, and TCP
// would retransmit it only after a second.
const probeTimeout = 500 * time.Millisecond

func (c *client) startProbes(targets []netip.AddrPort, every time.Duration) *prober {
	ctx, cancel := context.WithCancel(context.Background())
	p := &prober{cancel: cancel, probes: map[netip.AddrPort][]probe{}}
	for _, t := range targets {
		p.wg.Go(func() {
			tick := time.NewTicker(every)
			defer tick.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				p.wg.Go(func() {
					start := time.Now()
					// Not ctx: a probe in flight when the prober stops still counts.
					_, err := c.get(context.Background(), t, probeTimeout)
					p.mu.Lock()
					p.probes[t] = append(p.probes[t], probe{start: start, err: err})
					p.mu.Unlock()
				})
			}
		})
	}
	return p
}

// stop ends the probing, waits for probes in flight and returns the outage per target.
func (p *prober) stop() map[netip.AddrPort]Outage {
	p.cancel()
	p.wg.Wait()
	out := map[netip.AddrPort]Outage{}
	for t, ps := range p.probes {
		out[t] = analyze(ps)
	}
	return out
}

// Outage summarises the probes of one target.
type Outage struct {
	Probes int
	Failed int
	// Gap is the longest run of failed probes: from the start of its first probe to
	// the start of the next successful one (to the last failed one's start when
	// probing stopped first). 0 when no probe failed.
	Gap time.Duration
	// FirstError is the error of the first failed probe.
	FirstError string
	// Errors counts failed probes by kind of error.
	Errors map[string]int
	// Runs are the runs of consecutive failed probes, in order.
	Runs []Run
	// Resets are the start times of the probes whose connection was reset.
	Resets []time.Time
}

// Run is a run of consecutive failed probes.
type Run struct {
	Start, End time.Time // first failed probe's start; next good probe's start
	Failed     int
}

func (o Outage) String() string {
	if o.Failed == 0 {
		return fmt.Sprintf("0 of %d probes failed", o.Probes)
	}
	return fmt.Sprintf("%d of %d probes failed, gap %v (first error: %s)", o.Failed, o.Probes, o.Gap.Round(time.Millisecond), o.FirstError)
}

func analyze(ps []probe) Outage {
	ps = slices.Clone(ps)
	slices.SortFunc(ps, func(a, b probe) int { return a.start.Compare(b.start) })
	o := Outage{Probes: len(ps)}
	var run *Run
	for _, p := range ps {
		if p.err == nil {
			if run != nil {
				run.End = p.start
				run = nil
			}
			continue
		}
		o.Failed++
		if o.FirstError == "" {
			o.FirstError = p.err.Error()
		}
		if o.Errors == nil {
			o.Errors = map[string]int{}
		}
		o.Errors[errorKind(p.err)]++
		if errors.Is(p.err, syscall.ECONNRESET) {
			o.Resets = append(o.Resets, p.start)
		}
		if run == nil {
			o.Runs = append(o.Runs, Run{Start: p.start})
			run = &o.Runs[len(o.Runs)-1]
		}
		run.Failed++
		run.End = p.start // until a good probe says otherwise
	}
	for _, r := range o.Runs {
		o.Gap = max(o.Gap, r.End.Sub(r.Start))
	}
	return o
}

// errorKind names a probe error without its addresses and ports.
func errorKind(err error) string {
	s := err.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 {
		return s[i+2:]
	}
	return s
}
