package kube

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/shardlb/shardlb/shard"
)

func localTraffic(s *corev1.Service) {
	s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
}

// externalTrafficPolicy Local changes no mode and no announcement: the guide's Local +
// onearm services keep their VIPs, shards and mode. That the mode then gives the
// endpoints the load balancer's address, not the client's, is said once with a Normal
// event; a Local service in a mode that keeps the client's address, or a Cluster one,
// hears nothing.
func TestExternalTrafficPolicyLocal(t *testing.T) {
	e := newEnv(t, "etplocal")
	cfg := e.config(t, "node-a", "defaultPool=10.22.0.1-10.22.0.20", 1)
	rec, dp := &recorder{}, &datapathRecorder{}
	startPodOn(t, cfg, rec, dp)
	for _, c := range []struct {
		name string
		opts []svcOpt
	}{
		{"local-onearm", []svcOpt{localTraffic, annotate(AnnotationLBMode, "onearm")}},
		{"local-fullnat", []svcOpt{localTraffic, annotate(AnnotationLBMode, "fullnat")}},
		{"local-default", []svcOpt{localTraffic}},
		{"cluster-onearm", []svcOpt{annotate(AnnotationLBMode, "onearm")}},
	} {
		e.createSlice(t, c.name, "10.244.0.1")
		e.create(t, e.lbService(c.name, c.opts...))
	}
	mode := func(name string, want shard.Mode) {
		t.Helper()
		waitFor(t, 10*time.Second, fmt.Sprintf("%s served in mode %v", name, want), func() bool {
			fes := dp.frontends(e.ns + "/" + name)
			return len(fes) == 1 && fes[0].Mode == want
		})
	}
	t.Run("every service is served in its own mode, with a VIP", func(t *testing.T) {
		mode("local-onearm", shard.ModeOneArm)
		mode("local-fullnat", shard.ModeFullNAT)
		mode("local-default", shard.ModeDefault)
		mode("cluster-onearm", shard.ModeOneArm)
		for _, name := range []string{"local-onearm", "local-fullnat", "local-default", "cluster-onearm"} {
			if ips := ingressIPs(e.get(t, name)); len(ips) != 1 {
				t.Errorf("%s has VIPs %v, want one", name, ips)
			}
		}
	})
	t.Run("a translating mode under Local is said once, nothing else is", func(t *testing.T) {
		for _, name := range []string{"local-onearm", "local-fullnat"} {
			msgs := e.waitTold(t, name, ReasonClientAddressTranslated)
			if !strings.Contains(msgs[0], "externalTrafficPolicy Local") || !strings.Contains(msgs[0], AnnotationLBMode+" default") {
				t.Errorf("%s: message %q", name, msgs[0])
			}
		}
		for i := range 3 {
			e.update(t, "local-onearm", func(s *corev1.Service) { s.Labels = map[string]string{"round": fmt.Sprint(i)} })
		}
		// The updates are decided in order: once a later change is seen, so were they.
		e.update(t, "local-default", annotate(AnnotationLBMode, "fullnat"))
		e.waitTold(t, "local-default", ReasonClientAddressTranslated)
		if n, msgs := e.told(t, "local-onearm", ReasonClientAddressTranslated); n != 1 {
			t.Errorf("local-onearm told %d times, want once: %v", n, msgs)
		}
		if n, msgs := e.told(t, "cluster-onearm", ReasonClientAddressTranslated); n != 0 {
			t.Errorf("cluster-onearm told %v", msgs)
		}
	})
	t.Run("a Local service switched to default keeps the client's address and is served so", func(t *testing.T) {
		e.update(t, "local-fullnat", annotate(AnnotationLBMode, "default"))
		mode("local-fullnat", shard.ModeDefault)
		if n, _ := e.told(t, "local-fullnat", ReasonClientAddressTranslated); n != 1 {
			t.Errorf("told %d times after the switch to default, want the one before it", n)
		}
	})
}

// `get lb -o wide` says what the endpoints see as a connection's source.
func TestGetLBWideShowsClientAddress(t *testing.T) {
	rows := []LBRow{
		{ExtIP: "192.168.80.250", Port: 57002, Protocol: "tcp", Name: "a", Select: "hash", Mode: "onearm", ClientAddr: "node"},
		{ExtIP: "192.168.80.251", Port: 57002, Protocol: "tcp", Name: "b", Select: "hash", Mode: "default", ClientAddr: "client"},
	}
	body, _ := json.Marshal(rows)
	header, out, err := tabulate("lb", body, true)
	if err != nil {
		t.Fatal(err)
	}
	if header[len(header)-1] != "CLIENT ADDR" {
		t.Fatalf("header %v, want CLIENT ADDR last", header)
	}
	if out[0][len(header)-1] != "node" || out[1][len(header)-1] != "client" {
		t.Errorf("rows %v", out)
	}
	var b bytes.Buffer
	if err := renderTable(&b, header, out); err != nil || !strings.Contains(b.String(), "CLIENT ADDR") {
		t.Errorf("table %q, %v", b.String(), err)
	}
}

// The status rows derive the column from the frontend's mode.
func TestLBRowsClientAddress(t *testing.T) {
	for m, want := range map[shard.Mode]string{shard.ModeDefault: "client", shard.ModeDSR: "client", shard.ModeOneArm: "node", shard.ModeFullNAT: "node"} {
		rows := lbRows(shard.Plan{Frontends: []shard.Frontend{{Service: "ns/a", Mode: m}}})
		if len(rows) != 1 || rows[0].ClientAddr != want {
			t.Errorf("mode %v: rows %+v, want clientAddr %s", m, rows, want)
		}
	}
}
