package ipam

import (
	"errors"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// step is one call on a shared allocator; steps of a scenario run in order.
type step struct {
	desc    string
	svc     string
	release bool   // Release(svc) instead of Allocate
	fam     Family // default IPv4
	pool    string
	static  string
	ports   string // "80/tcp,53/udp"
	want    string // IP, or "" when an error is expected
	inPool  string // Allocation.Pool wanted when want is set
	wantErr error
	holder  string // with ErrStaticIPConflict: the service the error must name
}

func ports(t testing.TB, s string) []PortKey {
	t.Helper()
	var out []PortKey
	for _, f := range strings.Split(s, ",") {
		if f == "" {
			continue
		}
		num, proto, _ := strings.Cut(f, "/")
		n, err := strconv.Atoi(num)
		if err != nil {
			t.Fatalf("bad port %q", f)
		}
		pk := PortKey{Protocol: 6, Port: uint16(n)}
		if proto == "udp" {
			pk.Protocol = 17
		}
		out = append(out, pk)
	}
	return out
}

func mustPools(t testing.TB, specs ...string) []PoolSpec {
	t.Helper()
	var out []PoolSpec
	for _, s := range specs {
		p, err := ParsePools(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, p...)
	}
	return out
}

func runSteps(t *testing.T, a *Allocator, steps []step) {
	t.Helper()
	for _, s := range steps {
		if s.release {
			a.Release(s.svc)
			if got := a.Lookup(s.svc); got != nil {
				t.Fatalf("%s: after Release, Lookup(%s) = %v", s.desc, s.svc, got)
			}
			continue
		}
		r := Request{Service: s.svc, Family: IPv4, Pool: s.pool, Ports: ports(t, s.ports)}
		if s.fam != 0 {
			r.Family = s.fam
		}
		if s.static != "" {
			r.StaticIP = netip.MustParseAddr(s.static)
		}
		got, err := a.Allocate(r)
		if s.wantErr != nil {
			if !errors.Is(err, s.wantErr) {
				t.Fatalf("%s: Allocate(%+v) = %v, %v; want error %v", s.desc, r, got, err, s.wantErr)
			}
			if s.holder != "" {
				var ce *ConflictError
				if !errors.As(err, &ce) || ce.Holder != s.holder || ce.Requester != s.svc {
					t.Fatalf("%s: error %v should name holder %s and requester %s", s.desc, err, s.holder, s.svc)
				}
			}
			for _, al := range a.Lookup(s.svc) {
				if familyOf(al.IP) == r.Family {
					t.Fatalf("%s: a refused request left %v behind", s.desc, al)
				}
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: Allocate(%+v): %v", s.desc, r, err)
		}
		if got.IP != netip.MustParseAddr(s.want) || got.Pool != s.inPool || got.Service != s.svc {
			t.Fatalf("%s: Allocate(%+v) = %+v, want %s in pool %q", s.desc, r, got, s.want, s.inPool)
		}
		if !slices.ContainsFunc(a.Lookup(s.svc), func(l Allocation) bool {
			return l.IP == got.IP && l.Pool == got.Pool && slices.Equal(l.Ports, got.Ports)
		}) {
			t.Fatalf("%s: Lookup(%s) = %v lacks %v", s.desc, s.svc, a.Lookup(s.svc), got)
		}
	}
}

func TestUniqueMode(t *testing.T) {
	const p = "defaultPool"
	steps := []step{
		{desc: "s1 gets the address written in the CIDR", svc: "s1", want: "192.168.80.250", inPool: p},
		{desc: "s1 asking again gets the same address", svc: "s1", ports: "443/tcp", want: "192.168.80.250", inPool: p},
		{desc: "s2 gets the next address", svc: "s2", want: "192.168.80.251", inPool: p},
		{desc: "s3 with other ports still gets its own address", svc: "s3", ports: "8080/tcp", want: "192.168.80.252", inPool: p},
		{desc: "s4 gets .253", svc: "s4", want: "192.168.80.253", inPool: p},
		{desc: "s5 gets .254", svc: "s5", want: "192.168.80.254", inPool: p},
		{desc: "s6 finds the pool exhausted instead of the broadcast address", svc: "s6", wantErr: ErrPoolExhausted},
		{desc: "s2 leaves", svc: "s2", release: true},
		{desc: "s6 gets s2's address back", svc: "s6", want: "192.168.80.251", inPool: p},
		{desc: "s7 can't grab s1's IP as a static IP", svc: "s7", static: "192.168.80.250", wantErr: ErrStaticIPConflict, holder: "s1"},
		{desc: "s7 can't grab s3's IP even with different ports", svc: "s7", static: "192.168.80.252", ports: "9/udp", wantErr: ErrStaticIPConflict, holder: "s3"},
		{desc: "releasing an unknown service does nothing", svc: "nobody", release: true},
		{desc: "s7 may take a static IP outside every pool", svc: "s7", static: "10.9.9.9", want: "10.9.9.9", inPool: ""},
		{desc: "s8 can't grab s7's IP outside the pools", svc: "s8", static: "10.9.9.9", wantErr: ErrStaticIPConflict, holder: "s7"},
		{desc: "s7 leaves", svc: "s7", release: true},
		{desc: "s8 then gets the outside address", svc: "s8", static: "10.9.9.9", want: "10.9.9.9", inPool: ""},
		{desc: "s9 asking for IPv6 finds no IPv6 pool", svc: "s9", fam: IPv6, wantErr: ErrNoPool},
		{desc: "s9 selecting an unknown pool is refused", svc: "s9", pool: "gold", wantErr: ErrUnknownPool},
		{desc: "s9 with an IPv6 static IP for an IPv4 request is refused", svc: "s9", static: "fd00::1", wantErr: ErrInvalidRequest},
		{desc: "a request without a service is refused", svc: "", wantErr: ErrInvalidRequest},
		{desc: "a port 0 is refused", svc: "s9", ports: "0/tcp", wantErr: ErrInvalidRequest},
	}
	a, err := New(mustPools(t, "defaultPool=192.168.80.250/24"), true)
	if err != nil {
		t.Fatal(err)
	}
	runSteps(t, a, steps)
}

func TestSharedMode(t *testing.T) {
	const p = "defaultPool"
	steps := []step{
		{desc: "s1 on 80/tcp gets the first address", svc: "s1", ports: "80/tcp", want: "192.168.80.250", inPool: p},
		{desc: "s2 on 443/tcp shares s1's address", svc: "s2", ports: "443/tcp", want: "192.168.80.250", inPool: p},
		{desc: "s3 on 80/tcp can't share s1's port and gets the next address", svc: "s3", ports: "80/tcp", want: "192.168.80.251", inPool: p},
		{desc: "s4 on 80/udp shares the first address: the protocol differs", svc: "s4", ports: "80/udp", want: "192.168.80.250", inPool: p},
		{desc: "s5 on 80/tcp and 443/tcp takes the lowest address with neither", svc: "s5", ports: "80/tcp,443/tcp", want: "192.168.80.252", inPool: p},
		{desc: "s6 on 443/tcp shares s3's address, the lowest without 443", svc: "s6", ports: "443/tcp", want: "192.168.80.251", inPool: p},
		{desc: "s7 can't take the first address statically for 443/tcp, s2 has it", svc: "s7", static: "192.168.80.250", ports: "443/tcp", wantErr: ErrStaticIPConflict, holder: "s2"},
		{desc: "s7 takes the first address statically for 8443/tcp", svc: "s7", static: "192.168.80.250", ports: "8443/tcp", want: "192.168.80.250", inPool: p},
		{desc: "s1 leaves", svc: "s1", release: true},
		{desc: "s8 on 80/tcp gets the first address again", svc: "s8", ports: "80/tcp", want: "192.168.80.250", inPool: p},
		{desc: "s9 on 80/tcp, 443/tcp and 8443/tcp gets the fourth address", svc: "s9", ports: "80/tcp,443/tcp,8443/tcp", want: "192.168.80.253", inPool: p},
		{desc: "s10 repeating its port twice is one port", svc: "s10", ports: "22/tcp,22/tcp", want: "192.168.80.250", inPool: p},
		{desc: "s11 on 80/tcp gets the last address", svc: "s11", ports: "80/tcp", want: "192.168.80.254", inPool: p},
		{desc: "s12 on 80/tcp finds every address using 80/tcp", svc: "s12", ports: "80/tcp", wantErr: ErrPoolExhausted},
		{desc: "s12 on 81/tcp still shares", svc: "s12", ports: "81/tcp", want: "192.168.80.250", inPool: p},
		{desc: "s13 outside the pools with 80/tcp", svc: "s13", static: "10.9.9.9", ports: "80/tcp", want: "10.9.9.9"},
		{desc: "s14 shares s13's outside address on another port", svc: "s14", static: "10.9.9.9", ports: "443/tcp", want: "10.9.9.9"},
		{desc: "s15 can't take s13's outside address on its port", svc: "s15", static: "10.9.9.9", ports: "80/tcp", wantErr: ErrStaticIPConflict, holder: "s13"},
	}
	a, err := New(mustPools(t, "defaultPool=192.168.80.250/24"), false)
	if err != nil {
		t.Fatal(err)
	}
	runSteps(t, a, steps)
}

func TestPoolSelectAndDualStack(t *testing.T) {
	steps := []step{
		{desc: "s1 without a selection gets the first IPv4 pool", svc: "s1", want: "10.0.0.1", inPool: "defaultPool"},
		{desc: "s1 also gets an IPv6 address from the IPv6 pool of the same name", svc: "s1", fam: IPv6, want: "3ffe::1", inPool: "defaultPool"},
		{desc: "s2 selecting gold gets gold's first address", svc: "s2", pool: "gold", want: "10.0.1.10", inPool: "gold"},
		{desc: "s3 selecting gold for IPv6 is told gold is an IPv4 pool", svc: "s3", fam: IPv6, pool: "gold", wantErr: ErrUnknownPool},
		{desc: "s3 selecting gold with a static IP of another pool is refused", svc: "s3", pool: "gold", static: "10.0.0.2", wantErr: ErrInvalidRequest},
		{desc: "s3 selecting gold with a static IP inside gold gets it", svc: "s3", pool: "gold", static: "10.0.1.11", want: "10.0.1.11", inPool: "gold"},
		{desc: "s4 selecting gold skips s3's reserved address", svc: "s4", pool: "gold", want: "10.0.1.12", inPool: "gold"},
		{desc: "s5 in gold finds it exhausted", svc: "s5", pool: "gold", wantErr: ErrPoolExhausted},
		{desc: "s5 with a static IPv6 address outside every pool", svc: "s5", fam: IPv6, static: "fd00:1::5", want: "fd00:1::5"},
		{desc: "s1 leaves in both families", svc: "s1", release: true},
		{desc: "s6 gets s1's IPv6 address back", svc: "s6", fam: IPv6, want: "3ffe::1", inPool: "defaultPool"},
	}
	a, err := New(mustPools(t, "defaultPool=10.0.0.0/24,gold=10.0.1.10-10.0.1.12", "defaultPool=3ffe::/96"), true)
	if err != nil {
		t.Fatal(err)
	}
	runSteps(t, a, steps)
	want := []PoolStats{
		{Name: "defaultPool", Family: IPv4, Size: 254, Used: 0, Services: 0},
		{Name: "gold", Family: IPv4, Size: 3, Used: 3, Services: 3},
		{Name: "defaultPool", Family: IPv6, Size: 1<<32 - 1, Used: 1, Services: 1},
	}
	if got := a.Pools(); !slices.Equal(got, want) {
		t.Errorf("Pools() = %+v, want %+v", got, want)
	}
}

func TestHugeIPv6PoolsReportSaturatedSize(t *testing.T) {
	a, err := New(mustPools(t, "slash64=fd00::/64,slash48=fd01::/48"), true)
	if err != nil {
		t.Fatal(err)
	}
	got := a.Pools()
	if got[0].Size != 1<<64-1 || got[1].Size != 1<<64-1 {
		t.Errorf("sizes = %d, %d; want 2^64-1 (a /64 minus its anycast address) and saturated", got[0].Size, got[1].Size)
	}
	al, err := a.Allocate(Request{Service: "s1", Family: IPv6, Pool: "slash48", StaticIP: netip.MustParseAddr("fd01::ffff:0:0:0:1")})
	if err != nil || al.Pool != "slash48" {
		t.Fatalf("static IP deep inside a /48: %v, %v", al, err)
	}
	al, err = a.Allocate(Request{Service: "s2", Family: IPv6, Pool: "slash48"})
	if err != nil || al.IP != netip.MustParseAddr("fd01::1") {
		t.Errorf("first dynamic address of the /48 = %v, %v; want fd01::1", al, err)
	}
}

func TestRestore(t *testing.T) {
	pools := "defaultPool=192.168.80.250/24"
	at := func(svc, ip, ps string) Allocation {
		return Allocation{Service: svc, Pool: "defaultPool", IP: netip.MustParseAddr(ip), Ports: ports(t, ps)}
	}
	t.Run("restored addresses are skipped by later allocations", func(t *testing.T) {
		a, _ := New(mustPools(t, pools), true)
		if err := a.Restore([]Allocation{at("s1", "192.168.80.250", ""), at("s2", "192.168.80.252", "")}); err != nil {
			t.Fatal(err)
		}
		runSteps(t, a, []step{
			{desc: "s3 gets the gap", svc: "s3", want: "192.168.80.251", inPool: "defaultPool"},
			{desc: "s4 skips s2", svc: "s4", want: "192.168.80.253", inPool: "defaultPool"},
			{desc: "s2 asking again keeps its restored address", svc: "s2", want: "192.168.80.252", inPool: "defaultPool"},
		})
	})
	t.Run("restoring the same records twice changes nothing", func(t *testing.T) {
		a, _ := New(mustPools(t, pools), false)
		recs := []Allocation{at("s1", "192.168.80.250", "80/tcp"), at("s2", "192.168.80.250", "443/tcp")}
		for i := range 2 {
			if err := a.Restore(recs); err != nil {
				t.Fatalf("restore %d: %v", i+1, err)
			}
		}
		if got := a.Pools()[0]; got.Used != 1 || got.Services != 2 {
			t.Errorf("after two restores Pools() = %+v, want 1 address used by 2 services", got)
		}
	})
	t.Run("a conflicting record names both services and the rest still applies", func(t *testing.T) {
		a, _ := New(mustPools(t, pools), true)
		err := a.Restore([]Allocation{
			at("old", "192.168.80.250", ""),
			at("new", "192.168.80.250", ""),
			at("other", "192.168.80.251", ""),
		})
		var ce *ConflictError
		if !errors.Is(err, ErrStaticIPConflict) || !errors.As(err, &ce) || ce.Holder != "old" || ce.Requester != "new" {
			t.Fatalf("Restore error = %v, want a conflict of new with old", err)
		}
		if a.Lookup("new") != nil || len(a.Lookup("other")) != 1 || len(a.Lookup("old")) != 1 {
			t.Errorf("old %v, new %v, other %v: want old and other restored, new not", a.Lookup("old"), a.Lookup("new"), a.Lookup("other"))
		}
	})
	t.Run("in shared mode only an overlapping port conflicts", func(t *testing.T) {
		a, _ := New(mustPools(t, pools), false)
		err := a.Restore([]Allocation{
			at("web", "192.168.80.250", "80/tcp,443/tcp"),
			at("dns", "192.168.80.250", "53/udp"),
			at("web2", "192.168.80.250", "443/tcp"),
		})
		var ce *ConflictError
		if !errors.As(err, &ce) || ce.Holder != "web" || ce.Requester != "web2" || !slices.Equal(ce.Ports, ports(t, "443/tcp")) {
			t.Fatalf("Restore error = %v, want web2 refused for 443/tcp held by web", err)
		}
		if len(a.Lookup("dns")) != 1 {
			t.Errorf("dns was not restored")
		}
	})
	t.Run("the address decides the pool, not the recorded name", func(t *testing.T) {
		a, _ := New(mustPools(t, pools), true)
		if err := a.Restore([]Allocation{
			{Service: "moved", Pool: "oldPool", IP: netip.MustParseAddr("192.168.80.251")},
			{Service: "outside", Pool: "defaultPool", IP: netip.MustParseAddr("10.1.1.1")},
		}); err != nil {
			t.Fatal(err)
		}
		if got := a.Lookup("moved"); len(got) != 1 || got[0].Pool != "defaultPool" {
			t.Errorf("moved = %v, want it in defaultPool", got)
		}
		if got := a.Lookup("outside"); len(got) != 1 || got[0].Pool != "" {
			t.Errorf("outside = %v, want it outside every pool", got)
		}
	})
	t.Run("a service recorded with two addresses of one family is refused", func(t *testing.T) {
		a, _ := New(mustPools(t, pools), true)
		err := a.Restore([]Allocation{at("s1", "192.168.80.250", ""), at("s1", "192.168.80.251", "")})
		if !errors.Is(err, ErrInvalidRequest) || !strings.Contains(err.Error(), "s1") {
			t.Errorf("Restore error = %v, want ErrInvalidRequest naming s1", err)
		}
	})
	t.Run("malformed records are refused", func(t *testing.T) {
		a, _ := New(mustPools(t, pools), true)
		err := a.Restore([]Allocation{
			{Service: "", IP: netip.MustParseAddr("192.168.80.250")},
			{Service: "noip"},
			{Service: "zoned", IP: netip.MustParseAddr("fe80::1%eth0")},
			{Service: "port0", IP: netip.MustParseAddr("192.168.80.252"), Ports: []PortKey{{Protocol: 6}}},
		})
		if !errors.Is(err, ErrInvalidRequest) || strings.Count(err.Error(), "\n") != 3 {
			t.Errorf("Restore error = %v, want four ErrInvalidRequest", err)
		}
		if a.Pools()[0].Used != 0 {
			t.Errorf("malformed records were applied: %+v", a.Pools())
		}
	})
}
