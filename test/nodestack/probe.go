package nodestack

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netns"
)

// Get fetches http://addr/ from the client's namespace on a new connection and
// returns the body.
func Get(ctx context.Context, addr netip.AddrPort, timeout time.Duration) (string, error) {
	var body string
	err := inClient(func() error {
		var err error
		body, err = get(ctx, addr, timeout)
		return err
	})
	return body, err
}

// get must run on a thread in the client's namespace: the socket is made there.
func get(ctx context.Context, addr netip.AddrPort, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		return "", err
	}
	defer c.Close()
	deadline, _ := ctx.Deadline()
	_ = c.SetDeadline(deadline)
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", addr); err != nil {
		return "", err
	}
	resp, err := io.ReadAll(c)
	if err != nil {
		return "", err
	}
	head, body, ok := strings.Cut(string(resp), "\r\n\r\n")
	if !ok || !strings.HasPrefix(head, "HTTP/1.") || !strings.Contains(strings.SplitN(head, "\r\n", 2)[0], " 200 ") {
		return "", fmt.Errorf("unexpected response %q", resp)
	}
	return body, nil
}

// inClient runs f on an OS thread switched into the client's namespace; should
// switching back fail, the thread stays locked and dies with the goroutine.
func inClient(f func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	h, err := netns.GetFromName(clientNS)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer h.Close()
	if err := netns.Set(h); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := f()
	if err := netns.Set(orig); err != nil {
		return err
	}
	runtime.UnlockOSThread()
	return ferr
}

// Failure is one failed probe.
type Failure struct {
	At   time.Time
	Addr netip.AddrPort
	Err  error
}

// Prober fetches every address from the client on a new connection each interval,
// until Stop; a probe fails on any error or after its timeout.
type Prober struct {
	mu       sync.Mutex
	ok       map[netip.AddrPort]int
	bodies   map[string]int
	failures []Failure
	cancel   context.CancelFunc
	done     chan error
}

// StartProber starts probing addrs every interval.
func StartProber(ctx context.Context, addrs []netip.AddrPort, interval, timeout time.Duration) *Prober {
	ctx, cancel := context.WithCancel(ctx)
	p := &Prober{ok: map[netip.AddrPort]int{}, bodies: map[string]int{}, cancel: cancel, done: make(chan error, 1)}
	go func() {
		p.done <- inClient(func() error {
			t := time.NewTicker(interval)
			defer t.Stop()
			for {
				for _, a := range addrs {
					body, err := get(ctx, a, timeout)
					if ctx.Err() != nil {
						return nil
					}
					p.mu.Lock()
					if err != nil {
						p.failures = append(p.failures, Failure{At: time.Now(), Addr: a, Err: err})
					} else {
						p.ok[a]++
						p.bodies[strings.TrimSpace(body)]++
					}
					p.mu.Unlock()
				}
				select {
				case <-ctx.Done():
					return nil
				case <-t.C:
				}
			}
		})
	}()
	return p
}

// Stop ends probing and returns the successes per address, the answers per body
// (pod name) and the failures.
func (p *Prober) Stop() (map[netip.AddrPort]int, map[string]int, []Failure, error) {
	p.cancel()
	err := <-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ok, p.bodies, p.failures, err
}
