// Package probe checks load-balanced endpoints as kube-loxilb's liveness annotations
// describe: a TCP or UDP exchange, an HTTP or HTTPS GET, or an ICMP echo (Check, the
// effect), and the hysteresis that turns a series of results into a verdict
// (Health.Next, pure). Who probes, and how the verdict reaches every node, is the
// caller's business.
package probe

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// Type is how an endpoint is probed (loxilb.io/probetype).
type Type string

// The probe types kube-loxilb documents; sctp is not among them, as shardlb does not
// serve SCTP.
const (
	TCP   Type = "tcp"
	UDP   Type = "udp"
	HTTP  Type = "http"
	HTTPS Type = "https"
	Ping  Type = "ping"
	// None turns probing off.
	None Type = "none"
)

// ErrType is returned by ParseType for a name it does not know.
var ErrType = errors.New("not a probe type (tcp, udp, http, https, ping or none)")

// ParseType reads a probe type, ignoring case and surrounding spaces.
func ParseType(s string) (Type, error) {
	t := Type(strings.ToLower(strings.TrimSpace(s)))
	switch t {
	case TCP, UDP, HTTP, HTTPS, Ping, None:
		return t, nil
	}
	return "", fmt.Errorf("%q: %w", s, ErrType)
}

// Spec is how one endpoint is probed. It is comparable, so that a caller can key its
// probe state by it: a changed Spec is a new probe.
type Spec struct {
	Type Type
	// Request is, for tcp and udp, the bytes sent once connected ("": none for tcp, an
	// empty datagram for udp); for http and https the path (default "/").
	Request string
	// Response is, for tcp and udp, what the reply must contain; for http and https
	// what the body must contain ("": any reply, any 2xx or 3xx answer).
	Response string
	// Timeout bounds one probe.
	Timeout time.Duration
}

// maxRead bounds what a probe reads of a reply.
const maxRead = 64 << 10

// Health is what the probes of one target have said so far. The zero value is a
// healthy target with no result against it.
type Health struct {
	// Down: the target counts as failed.
	Down bool
	// Streak counts the results in a row that contradict Down.
	Streak int
}

// Next is h after one probe result. A healthy target goes down after retries failures
// in a row, and a failed one comes back after retries successes in a row (retries
// below 1 count as 1): a target whose probes flap, fail and succeed in turn, keeps
// its state instead of flapping with them.
func (h Health) Next(ok bool, retries int) Health {
	retries = max(retries, 1)
	if ok != h.Down {
		return Health{Down: h.Down} // agrees with the state: the streak ends
	}
	h.Streak++
	if h.Streak >= retries {
		return Health{Down: !h.Down}
	}
	return h
}

// Check probes target once as s says; nil means healthy. ctx and s.Timeout both
// bound it.
func Check(ctx context.Context, s Spec, target netip.AddrPort) error {
	if s.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.Timeout)
		defer cancel()
	}
	switch s.Type {
	case TCP:
		return checkTCP(ctx, s, target)
	case UDP:
		return checkUDP(ctx, s, target)
	case HTTP, HTTPS:
		return checkHTTP(ctx, s, target)
	case Ping:
		return checkPing(ctx, target)
	case None:
		return nil
	}
	return fmt.Errorf("probe %s: %w", s.Type, ErrType)
}
