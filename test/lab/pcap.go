package main

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/shardlb/shardlb/internal/labsys"
)

// capture records packets on interfaces of the lab's namespaces into pcap files in the
// lab directory, kept with the logs when a test fails: the packets of a failed probe
// say which hop lost or reset it. Without tcpdump it records nothing.
type capture struct{ procs []*labsys.Proc }

// startCapture starts one tcpdump per namespace:interface, writing
// DIR/NAME-NS-IFACE.pcap (headers only).
func (l *Lab) startCapture(name string, where map[string]string) *capture {
	c := &capture{}
	if _, err := exec.LookPath("tcpdump"); err != nil {
		return c
	}
	for ns, ifc := range where {
		file := filepath.Join(l.Dir, fmt.Sprintf("%s-%s-%s.pcap", name, ns, ifc))
		p, err := labsys.StartProc("tcpdump "+ns, file+".log", "ip", "netns", "exec", ns,
			"tcpdump", "-i", ifc, "-n", "-s", "160", "-U", "-w", file, "tcp or icmp")
		if err == nil {
			c.procs = append(c.procs, p)
		}
	}
	time.Sleep(300 * time.Millisecond) // tcpdump opens its socket
	return c
}

// stop ends the captures, flushing their files.
func (c *capture) stop() {
	for _, p := range c.procs {
		p.Stop(5 * time.Second)
	}
}
