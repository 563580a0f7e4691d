package bgp

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/osrg/gobgp/v4/api"
	"github.com/osrg/gobgp/v4/pkg/apiutil"
	"github.com/osrg/gobgp/v4/pkg/packet/bgp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/shardlb/shardlb/shard"
)

// grpcAddPath adds a path through a speaker's gRPC API, as `gobgp global rib add`
// run by any process on the node would: a path the speaker did not choose to announce.
func grpcAddPath(ctx context.Context, grpcAddr string, prefix netip.Prefix, localPref uint32) error {
	nlri, err := bgp.NewIPAddrPrefix(prefix)
	if err != nil {
		return err
	}
	family := bgp.RF_IPv4_UC
	var nh bgp.PathAttributeInterface
	if prefix.Addr().Is4() {
		nh, err = bgp.NewPathAttributeNextHop(netip.MustParseAddr("192.0.2.66"))
	} else {
		family = bgp.RF_IPv6_UC
		nh, err = bgp.NewPathAttributeMpReachNLRI(family, []bgp.PathNLRI{{NLRI: nlri}}, netip.MustParseAddr("2001:db8::66"))
	}
	if err != nil {
		return err
	}
	attrs := []bgp.PathAttributeInterface{bgp.NewPathAttributeOrigin(bgp.BGP_ORIGIN_ATTR_TYPE_IGP), nh, bgp.NewPathAttributeLocalPref(localPref)}
	path, err := apiutil.NewPath(family, nlri, false, attrs, time.Now())
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = api.NewGoBgpServiceClient(conn).AddPath(ctx, &api.AddPathRequest{TableType: api.TableType_TABLE_TYPE_GLOBAL, Path: path})
	if err != nil {
		return fmt.Errorf("gRPC AddPath %v: %w", prefix, err)
	}
	return nil
}

// foreignPath is a path added through the gRPC API that must not leave: outside the
// pools, or inside one but not a host route. Their LOCAL_PREFs are the roles' so that
// an export statement keyed on LOCAL_PREF alone would let them out.
type foreignPath struct {
	prefix    netip.Prefix
	localPref uint32
}

var foreignPaths = []foreignPath{
	{netip.MustParsePrefix("198.51.100.0/24"), 100},
	{netip.MustParsePrefix("10.97.0.5/32"), 200},
	{netip.MustParsePrefix("10.96.0.0/24"), 100},
	{netip.MustParsePrefix("0.0.0.0/0"), 5000},
	{netip.MustParsePrefix("2001:db8::/32"), 100},
	{netip.MustParsePrefix("2001:db8::5/128"), 200},
	{netip.MustParsePrefix("fd00:96::/64"), 100},
}

var exportPools = []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16"), netip.MustParsePrefix("fd00:96::/64")}

// TestExportLetsOnlyVIPsOut adds paths through the speaker's gRPC API next to its
// VIPs, over iBGP and eBGP: the router gets the VIPs with their roles' attributes,
// a static VIP outside the pools while it is announced, and never a foreign path.
func TestExportLetsOnlyVIPsOut(t *testing.T) {
	for _, tc := range []struct {
		name      string
		routerASN uint32
		// wantLP and wantASPath by role: master, successor, backup.
		wantLP     [3]uint32
		wantASPath [3]int
	}{
		{"iBGP", 65000, [3]uint32{5000, 200, 100}, [3]int{0, 0, 0}},
		{"eBGP", 65001, [3]uint32{0, 0, 0}, [3]int{1, 3, 4}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newTestRouter(t, "127.0.0.1", tc.routerASN, map[string]uint32{"127.0.0.2": 65000})
			cfg := testConfig("127.0.0.2", 65000, r)
			cfg.Pools = exportPools
			cfg.NextHop6 = netip.MustParseAddr("fd00::2")
			cfg.GRPCListen = "127.0.0.1:" + itoa(int(freePort(t, netip.MustParseAddr("127.0.0.1"))))
			s := startSpeaker(t, cfg)
			waitEstablished(t, s, r.addr)

			successor := adv("10.96.0.2/32", shard.RoleBackup)
			successor.Successor = true
			static := adv("203.0.113.7/32", shard.RoleMaster)
			vips := []shard.Advertisement{adv("10.96.0.1/32", shard.RoleMaster), successor, adv("10.96.0.3/32", shard.RoleBackup), adv("fd00:96::1/128", shard.RoleMaster), static}
			set(t, s, vips...)
			eventually(t, 5*time.Second, "the VIPs at the router", func() bool {
				for _, v := range vips {
					if len(r.rib(v.Prefix.String())) != 1 {
						return false
					}
				}
				return true
			})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			for _, f := range foreignPaths {
				if err := grpcAddPath(ctx, cfg.GRPCListen, f.prefix, f.localPref); err != nil {
					t.Fatal(err)
				}
			}
			// A VIP announced after them is a marker: a foreign path let out would
			// have reached the router before it.
			set(t, s, slices.Concat(vips, []shard.Advertisement{adv("10.96.0.9/32", shard.RoleMaster), adv("fd00:96::9/128", shard.RoleMaster)})...)
			eventually(t, 5*time.Second, "the marker VIPs at the router", func() bool {
				return len(r.rib("10.96.0.9/32")) == 1 && len(r.rib("fd00:96::9/128")) == 1
			})

			t.Run("the foreign paths are in the speaker's RIB and never reach the router", func(t *testing.T) {
				rib := s.rib()
				for _, f := range foreignPaths {
					if !slices.Contains(rib, f.prefix) {
						t.Errorf("%v is not in the speaker's RIB %v: the gRPC API did not take it", f.prefix, rib)
					}
					if seen := r.seen(f.prefix.String()); len(seen) > 0 || len(r.rib(f.prefix.String())) > 0 {
						t.Errorf("the router received %v: %+v", f.prefix, seen)
					}
				}
			})
			t.Run("the VIPs keep their roles' attributes", func(t *testing.T) {
				for i, v := range vips[:3] {
					p, ok := pathFrom(r, v.Prefix.String(), "127.0.0.2")
					if !ok || p.LocalPref != tc.wantLP[i] || len(p.ASPath) != tc.wantASPath[i] || p.MED != []uint32{10, 15, 20}[i] {
						t.Errorf("%v path = %+v, want LOCAL_PREF %d, MED %d, AS path of %d", v.Prefix, p, tc.wantLP[i], []uint32{10, 15, 20}[i], tc.wantASPath[i])
					}
				}
			})
			t.Run("a static VIP outside the pools stops leaving once withdrawn", func(t *testing.T) {
				set(t, s, vips[:4]...)
				// The router's record of UPDATEs may lag its RIB: wait for both.
				eventually(t, 5*time.Second, "the static VIP withdrawn", func() bool {
					seen := r.seen(static.Prefix.String())
					return len(r.rib(static.Prefix.String())) == 0 && len(seen) > 0 && seen[len(seen)-1].Withdraw
				})
				before := len(r.seen(static.Prefix.String()))
				if err := grpcAddPath(ctx, cfg.GRPCListen, static.Prefix, 5000); err != nil {
					t.Fatal(err)
				}
				set(t, s, slices.Concat(vips[:4], []shard.Advertisement{adv("10.96.0.10/32", shard.RoleMaster)})...)
				eventually(t, 5*time.Second, "a new marker VIP at the router", func() bool { return len(r.rib("10.96.0.10/32")) == 1 })
				if seen := r.seen(static.Prefix.String())[before:]; len(seen) > 0 || len(r.rib(static.Prefix.String())) > 0 {
					t.Fatalf("after its withdrawal the router received %v again: %+v", static.Prefix, seen)
				}
			})
		})
	}
}
