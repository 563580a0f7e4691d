package main

import (
	"context"
	"errors"
	"log/slog"

	"github.com/shardlb/shardlb/bgp"
	slconfig "github.com/shardlb/shardlb/config"
)

// objectFlags is what the flags give the configuration objects to add to.
func objectFlags(cfg config) slconfig.Flags {
	b := cfg.BGP
	f := slconfig.Flags{
		Pools: cfg.Kube.Pools,
		Defaults: slconfig.Defaults{
			Master:    slconfig.Attrs{LocalPref: b.LocalPrefMaster, MED: b.MEDMaster},
			Successor: slconfig.Attrs{LocalPref: b.LocalPrefSuccessor, MED: b.MEDSuccessor},
			Backup:    slconfig.Attrs{LocalPref: b.LocalPrefBackup, MED: b.MEDBackup},
		},
	}
	for _, p := range b.Peers {
		f.Peers = append(f.Peers, slconfig.Peer{Addr: p.Addr, ASN: p.ASN, Port: p.Port})
	}
	return f
}

// speakerPeers turns the configuration's peers into the speaker's. A flag peer comes
// back as --extBGPPeers made it, so applying the flags alone changes no session.
func speakerPeers(b bgp.Config, ps []slconfig.Peer) []bgp.Peer {
	out := make([]bgp.Peer, 0, len(ps))
	for _, p := range ps {
		bp := bgp.Peer{
			Addr: p.Addr, ASN: p.ASN, Port: p.Port, Password: p.Password, LocalAddr: p.SourceAddr,
			HoldTime: p.HoldTime, KeepaliveInterval: p.Keepalive,
		}
		if p.EBGPMultiHop {
			bp.MultiHopTTL = max(b.EBGPMultiHopTTL, 2)
		}
		if p.BFD != nil {
			bp.BFD = &bgp.BFDConfig{Enabled: true, Interval: p.BFD.Transmit, Receive: p.BFD.Receive, Multiplier: p.BFD.DetectMultiplier}
		}
		out = append(out, bp)
	}
	return out
}

// applyObjects applies a node's desired configuration to the speaker (nil: BGP is
// off, and peers from objects have nowhere to go).
func applyObjects(b bgp.Config, sp *bgp.Speaker, log *slog.Logger) func(context.Context, slconfig.Desired) error {
	return func(ctx context.Context, d slconfig.Desired) error {
		if sp == nil {
			if len(d.Peers) > 0 {
				log.Warn("BGPPeer objects ignored: BGP is off (set --setBGP)", "peers", len(d.Peers))
			}
			return nil
		}
		return errors.Join(sp.SetPeers(ctx, speakerPeers(b, d.Peers)), sp.SetPoolCommunities(ctx, poolCommunities(d)))
	}
}

// poolCommunities gives the speaker each pool's communities with the pool's prefixes.
func poolCommunities(d slconfig.Desired) []bgp.PoolCommunities {
	var out []bgp.PoolCommunities
	for _, p := range d.Pools {
		cs, ok := d.PoolCommunities[p.Name]
		if !ok {
			continue
		}
		pc := bgp.PoolCommunities{Communities: cs.Communities, LargeCommunities: cs.LargeCommunities}
		for _, r := range p.Ranges {
			pc.Prefixes = append(pc.Prefixes, bgp.RangePrefixes(r.First, r.Last)...)
		}
		out = append(out, pc)
	}
	return out
}
