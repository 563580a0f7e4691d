package shard

import (
	"errors"
	"reflect"
	"testing"
)

func TestInstanceNamesFollowTheGuide(t *testing.T) {
	in, err := NewInstances("llb", 3)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := in.Names(), []string{"default", "llb-inst1", "llb-inst2"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("Names() = %v, want %v", got, want)
	}
	for _, tc := range []struct {
		name, want string
		err        error
	}{
		{"default", "default", nil},
		{"llb-inst0", "default", nil},
		{"llb-inst2", "llb-inst2", nil},
		{"llb-inst3", "", ErrUnknownInstance},
		{"llb-inst01", "", ErrUnknownInstance},
		{"llb-inst-1", "", ErrUnknownInstance},
		{"other-inst1", "", ErrUnknownInstance},
		{"", "", ErrUnknownInstance},
	} {
		got, err := in.Canonical(tc.name)
		if !errors.Is(err, tc.err) || got != tc.want {
			t.Errorf("Canonical(%q) = %q, %v; want %q, %v", tc.name, got, err, tc.want, tc.err)
		}
	}
}

func TestNewInstancesRejectsBadFlags(t *testing.T) {
	for _, tc := range []struct {
		zone string
		n    int
	}{{"llb", 0}, {"llb", -1}, {"llb", MaxInstances + 1}, {"", 3}, {"LLB", 3}, {"a b", 2}, {"-x", 2}} {
		if _, err := NewInstances(tc.zone, tc.n); !errors.Is(err, ErrInvalid) {
			t.Errorf("NewInstances(%q, %d) error = %v, want ErrInvalid", tc.zone, tc.n, err)
		}
	}
}

// TestAssignScenarios applies ordered steps to one cluster's load, as the controller
// would: each step assigns one service and, on success, counts it.
func TestAssignScenarios(t *testing.T) {
	in, _ := NewInstances("llb", 3)
	load := map[string]int{}
	steps := []struct {
		desc             string
		pin, recorded    string
		want             string
		err              error
		countsTowardLoad bool
	}{
		{desc: "the first service goes to default", want: "default", countsTowardLoad: true},
		{desc: "the second goes to the emptiest instance, llb-inst1", want: "llb-inst1", countsTowardLoad: true},
		{desc: "a pinned service goes where it is pinned", pin: "llb-inst2", want: "llb-inst2", countsTowardLoad: true},
		{desc: "with all equal, ties go to the lowest index", want: "default", countsTowardLoad: true},
		{desc: "a recorded instance never moves, even off balance", recorded: "default", want: "default", countsTowardLoad: true},
		{desc: "a pin overrides a recorded instance", pin: "llb-inst1", recorded: "default", want: "llb-inst1"},
		{desc: "the alias llb-inst0 pins to default", pin: "llb-inst0", want: "default"},
		{desc: "an unknown pin is refused", pin: "llb-inst9", err: ErrUnknownInstance},
		{desc: "a stale recorded instance is replaced by the emptiest", recorded: "llb-inst7", want: "llb-inst1"},
	}
	for _, s := range steps {
		got, err := Assign(in, s.pin, s.recorded, load)
		if !errors.Is(err, s.err) || got != s.want {
			t.Fatalf("%s: Assign = %q, %v; want %q, %v", s.desc, got, err, s.want, s.err)
		}
		if s.countsTowardLoad {
			load[got]++
		}
	}
}

func TestParseModeAndSelect(t *testing.T) {
	modes := map[string]Mode{"": ModeDefault, "0": ModeDefault, "default": ModeDefault, "onearm": ModeOneArm,
		"1": ModeOneArm, "FullNAT": ModeFullNAT, "2": ModeFullNAT, "dsr": ModeDSR, "3": ModeDSR}
	for s, want := range modes {
		if got, err := ParseMode(s); err != nil || got != want {
			t.Errorf("ParseMode(%q) = %v, %v; want %v", s, got, err, want)
		}
	}
	for _, bad := range []string{"4", "one arm", "nat", "-1"} {
		if _, err := ParseMode(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseMode(%q) error = %v, want ErrInvalid", bad, err)
		}
	}
	sels := map[string]Select{"": SelectHash, "hash": SelectHash, "rr": SelectRoundRobin, "persist": SelectPersist}
	for s, want := range sels {
		if got, err := ParseSelect(s); err != nil || got != want {
			t.Errorf("ParseSelect(%q) = %v, %v; want %v", s, got, err, want)
		}
	}
	if _, err := ParseSelect("random"); !errors.Is(err, ErrInvalid) {
		t.Errorf("ParseSelect(random) error = %v, want ErrInvalid", err)
	}
}

func FuzzCanonical(f *testing.F) {
	for _, s := range []string{"default", "llb-inst0", "llb-inst2", "llb-inst", "llb-inst-0", "llb-inst99999999999999999999", "\x00"} {
		f.Add(s)
	}
	in, _ := NewInstances("llb", 5)
	f.Fuzz(func(t *testing.T, name string) {
		c, err := in.Canonical(name)
		if err != nil {
			if !errors.Is(err, ErrUnknownInstance) {
				t.Fatalf("Canonical(%q): error %v does not wrap ErrUnknownInstance", name, err)
			}
			return
		}
		again, err := in.Canonical(c)
		if err != nil || again != c {
			t.Fatalf("canonical name %q of %q is not a fixed point: %q, %v", c, name, again, err)
		}
	})
}

func FuzzParseMode(f *testing.F) {
	for _, s := range []string{"", "onearm", "3", "FULLNAT", " dsr "} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, err := ParseMode(s)
		if err == nil {
			if back, err := ParseMode(m.String()); err != nil || back != m {
				t.Fatalf("ParseMode(%q) = %v does not round-trip: %v, %v", s, m, back, err)
			}
		} else if !errors.Is(err, ErrInvalid) {
			t.Fatalf("ParseMode(%q): error %v does not wrap ErrInvalid", s, err)
		}
		if sel, err := ParseSelect(s); err == nil {
			if back, err := ParseSelect(sel.String()); err != nil || back != sel {
				t.Fatalf("ParseSelect(%q) = %v does not round-trip", s, sel)
			}
		}
	})
}
