package main

import (
	"context"
	"maps"
	"testing"
	"time"
)

// TestRestartsKeepConnections runs the lab with BGP graceful restart (60 s) on the
// nodes and the router, the guide's two onearm services and a fullnat one on the
// third instance, so that every node masters one. Through every VIP a keep-alive
// connection sends a request every 20 ms and a stream of 1 MiB runs for about 65 s,
// while every node's process is restarted in turn, first with SIGTERM, then with
// SIGKILL, each followed at once by a new process of the same binary. Nothing may
// notice: no failed probe (new connections every 10 ms), no failed request, every
// stream complete and intact, the router's kernel route for each VIP never missing
// or pointing elsewhere (polled every millisecond), and the same masters after.
func TestRestartsKeepConnections(t *testing.T) {
	l := startLabWith(t, Options{GracefulRestart: 60 * time.Second})
	ctx := context.Background()
	vips, err := l.EveryNodeMasters(ctx)
	if err != nil {
		t.Fatal(err)
	}
	res, err := l.RestartUnderLoad(ctx, vips, []Failure{CleanStop, Kill})
	for _, line := range res.Timeline {
		t.Log(line)
	}
	for _, c := range res.Conns {
		t.Log(c)
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range res.Conns {
		if c.KeepAliveErr != "" || c.Requests == 0 {
			t.Errorf("%s: the keep-alive connection failed after %d requests: %s", c.VIP, c.Requests, c.KeepAliveErr)
		}
		if c.StreamErr != "" || c.StreamBytes != streamBytes {
			t.Errorf("%s: the stream failed after %d of %d bytes: %s", c.VIP, c.StreamBytes, streamBytes, c.StreamErr)
		}
	}
	for _, v := range sortedVIPs(vips) {
		o := res.Probes[v]
		t.Logf("%s (%s): %s", v, vips[v], o)
		if o.Failed > 0 || o.Probes == 0 {
			t.Errorf("%s: %s, want no failed probe", v, o)
		}
	}
	for _, m := range res.Moves {
		t.Errorf("router: %s", m)
	}
	if !maps.Equal(res.MastersBefore, res.MastersAfter) {
		t.Errorf("masters changed across the restarts: %v, then %v", res.MastersBefore, res.MastersAfter)
	}
}
