package shard

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Errors returned by the parsers and the assignment. Callers match them with errors.Is
// to pick the Kubernetes Event reason.
var (
	ErrUnknownInstance = errors.New("unknown zone instance")
	ErrInvalid         = errors.New("invalid value")
)

// DefaultInstance is the name of instance 0, as kube-loxilb calls it.
const DefaultInstance = "default"

// MaxInstances bounds --numZoneInstances: more shards than this is a typo, not a plan.
const MaxInstances = 1024

// Instances is the set of shards from --zone and --numZoneInstances: "default",
// "<zone>-inst1", ... "<zone>-inst<n-1>".
type Instances struct {
	zone string
	n    int
}

// NewInstances validates the zone prefix and the count.
func NewInstances(zone string, n int) (Instances, error) {
	if n < 1 || n > MaxInstances {
		return Instances{}, fmt.Errorf("%w: numZoneInstances %d: want 1..%d", ErrInvalid, n, MaxInstances)
	}
	if zone == "" || !validName(zone) {
		return Instances{}, fmt.Errorf("%w: zone %q: want lowercase letters, digits and '-'", ErrInvalid, zone)
	}
	return Instances{zone: zone, n: n}, nil
}

func validName(s string) bool {
	if len(s) > 40 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for _, c := range s {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
			return false
		}
	}
	return true
}

// Count is the number of instances.
func (in Instances) Count() int { return in.n }

// Zone is the name prefix.
func (in Instances) Zone() string { return in.zone }

// Name is the canonical name of instance i (0 <= i < Count).
func (in Instances) Name(i int) string {
	if i == 0 {
		return DefaultInstance
	}
	return in.zone + "-inst" + strconv.Itoa(i)
}

// Names lists the canonical names in index order.
func (in Instances) Names() []string {
	names := make([]string, in.n)
	for i := range names {
		names[i] = in.Name(i)
	}
	return names
}

// Index returns the index of a name, accepting "<zone>-inst0" as an alias of "default".
func (in Instances) Index(name string) (int, error) {
	if name == DefaultInstance {
		return 0, nil
	}
	rest, ok := strings.CutPrefix(name, in.zone+"-inst")
	if ok && rest != "" && (rest == "0" || rest[0] != '0') {
		if i, err := strconv.Atoi(rest); err == nil && i >= 0 && i < in.n {
			return i, nil
		}
	}
	return 0, fmt.Errorf("%w: %q (this cluster has %s)", ErrUnknownInstance, name, in.describe())
}

// Canonical maps a name or alias to its canonical name.
func (in Instances) Canonical(name string) (string, error) {
	i, err := in.Index(name)
	if err != nil {
		return "", err
	}
	return in.Name(i), nil
}

func (in Instances) describe() string {
	if in.n == 1 {
		return DefaultInstance
	}
	return fmt.Sprintf("%s, %s..%s", DefaultInstance, in.Name(1), in.Name(in.n-1))
}

// Assign picks the instance of a service. pin is the loxilb.io/zoneinstance annotation,
// recorded the shardlb.io/instance annotation written earlier, load the number of
// services per canonical instance name. A pin always wins (an unknown pin is an error
// and the caller keeps whatever the service had); else a valid recorded instance stays,
// so an assignment never moves; else the least loaded instance, ties to the lowest index.
func Assign(in Instances, pin, recorded string, load map[string]int) (string, error) {
	if pin != "" {
		return in.Canonical(pin)
	}
	if recorded != "" {
		if c, err := in.Canonical(recorded); err == nil {
			return c, nil
		}
	}
	best, bestLoad := 0, -1
	for i := 0; i < in.n; i++ {
		if l := load[in.Name(i)]; bestLoad < 0 || l < bestLoad {
			best, bestLoad = i, l
		}
	}
	return in.Name(best), nil
}

// ParseMode reads --setLBMode and loxilb.io/lbmode: a name or kube-loxilb's number.
func ParseMode(s string) (Mode, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "0", "default":
		return ModeDefault, nil
	case "1", "onearm":
		return ModeOneArm, nil
	case "2", "fullnat":
		return ModeFullNAT, nil
	case "3", "dsr":
		return ModeDSR, nil
	}
	return 0, fmt.Errorf("%w: lbmode %q: want default, onearm, fullnat, dsr or 0..3", ErrInvalid, s)
}

// ParseSelect reads loxilb.io/epselect.
func ParseSelect(s string) (Select, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "hash", "maglev":
		return SelectHash, nil
	case "rr", "roundrobin":
		return SelectRoundRobin, nil
	case "persist":
		return SelectPersist, nil
	}
	return 0, fmt.Errorf("%w: epselect %q: want hash, rr or persist", ErrInvalid, s)
}
