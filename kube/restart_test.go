package kube

import (
	"slices"
	"testing"
	"time"
)

// Three pods whose forwarding outlives their processes (a restart time of 60 s): a
// master stopped for a restart (SIGTERM) or killed (SIGKILL) keeps its instance,
// although its node refuses the peers' probes, and its next process masters it again
// without a handover; no other pod announces it as master meanwhile. Without a
// restart time the same SIGKILL moves the instance within a few probes.
func TestARestartingMasterKeepsItsInstance(t *testing.T) {
	e := newEnv(t, "gr-restart")
	leases := watchLeases(t, e)
	c := newHACluster(t, e)
	restart := "NODE_RESTART=60s"
	for _, n := range []string{"node-a", "node-b", "node-c"} {
		c.start(n, restart)
	}
	waitFor(t, 30*time.Second, "one master per instance and one instance per node", func() bool {
		m := c.masters()
		return len(m) == 3 && balanced(m)
	})
	inst := c.masters()["node-c"][0]
	probe := DefaultConfig().PeerProbe
	// Well beyond the probes: a refused probe of a pod without a restart time is a
	// death at once (the last subtest: under a second).
	beyondProbes := time.Duration(probe.Failures+2)*probe.Interval + time.Second
	for _, how := range []struct {
		name string
		end  func(*nodeProc)
	}{{"SIGTERM", c.stop}, {"SIGKILL", c.kill}} {
		t.Run(how.name, func(t *testing.T) {
			since := time.Now()
			how.end(c.procs["node-c"])
			time.Sleep(beyondProbes)
			if _, acquired, by := leases.takeover(InstanceLeaseName(inst), "node-c"); by != "" && acquired.After(since) {
				t.Fatalf("%s taken by %s %v after node-c's %s: a restarting master lost its instance", inst, by, acquired.Sub(since).Round(time.Millisecond), how.name)
			}
			for _, l := range c.timeline() {
				if time.Unix(0, l.T).After(since) && l.Node != "node-c" && slices.Contains(l.Masters, inst) {
					t.Fatalf("%s announced %s as master while node-c restarted", l.Node, inst)
				}
			}
			c.start("node-c", restart)
			started := time.Now()
			waitFor(t, 30*time.Second, "node-c to master "+inst+" again", func() bool {
				m := c.masters()
				return len(m) == 3 && balanced(m) && len(m["node-c"]) == 1 && m["node-c"][0] == inst
			})
			t.Logf("node-c masters %s again %v after its new process started", inst, time.Since(started).Round(time.Millisecond))
			for _, l := range c.timeline() {
				if time.Unix(0, l.T).After(since) && l.Node != "node-c" && slices.Contains(l.Masters, inst) {
					t.Fatalf("%s announced %s as master while node-c restarted", l.Node, inst)
				}
			}
		})
	}
	t.Run("without a restart time a SIGKILL moves the instance", func(t *testing.T) {
		for _, n := range []string{"node-a", "node-b", "node-c"} {
			c.stop(c.procs[n])
		}
		for _, n := range []string{"node-a", "node-b", "node-c"} {
			c.start(n)
		}
		waitFor(t, 60*time.Second, "one master per instance and one instance per node", func() bool {
			m := c.masters()
			return len(m) == 3 && balanced(m)
		})
		lost := c.masters()["node-c"][0]
		since := time.Now()
		c.kill(c.procs["node-c"])
		waitFor(t, 15*time.Second, lost+" taken from the killed node-c", func() bool {
			_, acquired, by := leases.takeover(InstanceLeaseName(lost), "node-c")
			return by != "" && acquired.After(since)
		})
	})
}
