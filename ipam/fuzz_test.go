package ipam

import (
	"errors"
	"strings"
	"testing"
)

// Seeds beyond these are committed under testdata/fuzz/<FuzzName>/.

func FuzzParsePools(f *testing.F) {
	for _, s := range []string{
		"defaultPool=192.168.80.250/24",
		"a=10.0.0.0/24,b=10.0.1.1-10.0.1.9",
		"defaultPool=3ffe::1/96",
		"a=fd00::/64,b=fd01::5-fd01::ff",
		"a=10.0.0.255/24",
		"a=0.0.0.0/0",
		"a=::/0",
		"a=10.0.0.9-10.0.0.1",
		"a=fe80::1%eth0/64",
		"=,=,",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, spec string) {
		pools, err := ParsePools(spec)
		if err != nil {
			if !errors.Is(err, ErrInvalidPool) {
				t.Fatalf("ParsePools(%q) error %v does not wrap ErrInvalidPool", spec, err)
			}
			return
		}
		// What is accepted is a valid table: New takes it, and written back in range
		// syntax it parses to the same pools.
		if _, err := New(pools, false); err != nil {
			t.Fatalf("ParsePools(%q) = %v, which New refuses: %v", spec, pools, err)
		}
		var back []string
		for _, p := range pools {
			if p.Last.Less(p.First) {
				t.Fatalf("ParsePools(%q) gave the empty pool %v", spec, p)
			}
			back = append(back, p.String())
		}
		again, err := ParsePools(strings.Join(back, ","))
		if err != nil {
			t.Fatalf("ParsePools(%q) = %v, written back it fails: %v", spec, pools, err)
		}
		if len(again) != len(pools) {
			t.Fatalf("round trip of %v gave %v", pools, again)
		}
		for i := range pools {
			if again[i] != pools[i] {
				t.Fatalf("round trip of %v gave %v", pools, again)
			}
		}
	})
}

func FuzzParseStaticIP(f *testing.F) {
	for _, s := range []string{"10.0.0.1", "fd00::1", "", " 10.0.0.1 ", "::ffff:1.2.3.4", "fe80::1%eth0", "10.0.0.1/32"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ip, err := ParseStaticIP(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidRequest) {
				t.Fatalf("ParseStaticIP(%q) error %v does not wrap ErrInvalidRequest", s, err)
			}
			return
		}
		if !ip.IsValid() {
			if strings.TrimSpace(s) != "" {
				t.Fatalf("ParseStaticIP(%q) accepted no address", s)
			}
			return
		}
		// An accepted address is one any request of its family validates with.
		r := Request{Service: "ns/s", Family: familyOf(ip), StaticIP: ip}
		if err := r.Validate(); err != nil {
			t.Fatalf("ParseStaticIP(%q) = %v, which Validate refuses: %v", s, ip, err)
		}
	})
}

// FuzzAllocator reads an operation sequence from the fuzzer's bytes and holds the
// allocator to the model and the invariants, then checks Restore, as the property test
// does with math/rand.
func FuzzAllocator(f *testing.F) {
	f.Add([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10})
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte("the quick brown fox jumps over the lazy dog, twice over"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		unique := data[0]&1 == 1
		c := &byteChooser{b: data[1:]}
		pools := propPools(t)
		a, err := New(pools, unique)
		if err != nil {
			t.Fatal(err)
		}
		m := newModel(pools, unique)
		var trace []string
		for len(c.b) > 0 {
			stepBoth(t, c, a, m, &trace)
		}
		checkInvariants(t, a, unique, trace)
		checkRestore(t, c, a, pools, unique, trace)
	})
}
