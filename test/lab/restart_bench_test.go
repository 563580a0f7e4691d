package main

import (
	"context"
	"testing"
	"time"
)

// BenchmarkRestart restarts every node's process in turn, with SIGTERM then with
// SIGKILL, while a keep-alive connection and a 65 s stream run through each of three
// VIPs (two onearm, one fullnat; every node masters one) and the client probes every
// VIP every 10 ms (RestartUnderLoad). The baseline runs without BGP graceful restart:
// a SIGTERM hands the node's shard over and drains, a SIGKILL fails over by route
// withdrawal. The other case runs with it (60 s) and the datapath pinned: a restart
// keeps the shard, the routes and the connections. Each case starts a lab of its own
// and runs once, whatever b.N.
func BenchmarkRestart(b *testing.B) {
	closeSharedLab() // one lab at a time
	for _, c := range []struct {
		name string
		gr   time.Duration
	}{{"baseline=no-graceful-restart", 0}, {"graceful-restart", 60 * time.Second}} {
		b.Run(c.name, func(b *testing.B) {
			l := startLabWith(b, Options{GracefulRestart: c.gr})
			ctx := context.Background()
			vips, err := l.EveryNodeMasters(ctx)
			if err != nil {
				b.Fatal(err)
			}
			res, err := l.RestartUnderLoad(ctx, vips, []Failure{CleanStop, Kill})
			if err != nil {
				b.Fatal(err)
			}
			broken, lost := 0, 0
			var gap time.Duration
			for _, conn := range res.Conns {
				b.Log(conn)
				if conn.KeepAliveErr != "" {
					broken++
				}
				if conn.StreamErr != "" {
					broken++
				}
			}
			for v, o := range res.Probes {
				b.Logf("%s: %s", v, o)
				lost += o.Failed
				gap = max(gap, o.Gap)
			}
			// Go prints custom metrics sorted by unit, and benchtab compares the first.
			b.ReportMetric(float64(broken), "broken-conns")
			b.ReportMetric(float64(lost), "lost-probes")
			b.ReportMetric(float64(gap)/float64(time.Millisecond), "longest-gap-ms")
			b.ReportMetric(float64(len(res.Moves)), "route-moves")
			b.ReportMetric(0, "ns/op")
		})
	}
}
