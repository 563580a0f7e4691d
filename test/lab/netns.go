package main

import (
	"bytes"
	"fmt"
	"os/exec"
	"runtime"
	"strings"

	"github.com/vishvananda/netns"
)

// sh runs a command and returns its output; the error carries the output, since a
// failing ip or sysctl says why only there.
func sh(name string, args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// nsRun runs a command inside the named network namespace.
func nsRun(ns, name string, args ...string) (string, error) {
	return sh("ip", append([]string{"netns", "exec", ns, name}, args...)...)
}

// script runs commands one after the other and stops at the first failure.
type script struct{ err error }

func (s *script) run(name string, args ...string) {
	if s.err == nil {
		_, s.err = sh(name, args...)
	}
}

func (s *script) in(ns, name string, args ...string) {
	if s.err == nil {
		_, s.err = nsRun(ns, name, args...)
	}
}

// addNetNS creates a namespace with loopback up and the sysctls every lab namespace
// shares: no reverse-path filter and no ICMP redirects, because the nodes forward
// out of the interface traffic came in on (one-arm) and redirects would teach the
// router to bypass them.
func addNetNS(name string, forward bool) error {
	var s script
	s.run("ip", "netns", "add", name)
	s.in(name, "ip", "link", "set", "lo", "up")
	fwd := "0"
	if forward {
		fwd = "1"
	}
	s.in(name, "sysctl", "-qw",
		"net.ipv4.ip_forward="+fwd,
		"net.ipv4.conf.all.rp_filter=0",
		"net.ipv4.conf.default.rp_filter=0",
		"net.ipv4.conf.all.send_redirects=0",
		"net.ipv4.conf.default.send_redirects=0",
		"net.ipv4.conf.all.accept_redirects=0",
		"net.ipv4.conf.default.accept_redirects=0")
	return s.err
}

// deleteNetNS kills every process left in the namespace, by PID, and deletes it.
func deleteNetNS(name string) error {
	if out, err := exec.Command("ip", "netns", "pids", name).Output(); err == nil {
		for _, pid := range strings.Fields(string(out)) {
			_ = exec.Command("kill", "-9", pid).Run()
		}
	}
	_, err := sh("ip", "netns", "del", name)
	return err
}

// listNetNS returns the namespaces whose name starts with prefix.
func listNetNS(prefix string) []string {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return nil
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], prefix) {
			names = append(names, f[0])
		}
	}
	return names
}

// veth joins two namespaces ("" is the root namespace) with a veth pair, brings both
// ends up and turns checksum offload off, so that a datapath checksum bug shows as
// lost traffic instead of being hidden by veth.
func veth(aNS, aIf, bNS, bIf string) error {
	args := []string{"link", "add", aIf}
	if aNS != "" {
		args = append(args, "netns", aNS)
	}
	args = append(args, "type", "veth", "peer", "name", bIf)
	if bNS != "" {
		args = append(args, "netns", bNS)
	}
	var s script
	s.run("ip", args...)
	for _, e := range [][2]string{{aNS, aIf}, {bNS, bIf}} {
		s.run("ip", nsArgs(e[0], "link", "set", e[1], "up")...)
		if e[0] == "" {
			s.run("ethtool", "-K", e[1], "rx", "off", "tx", "off")
		} else {
			s.in(e[0], "ethtool", "-K", e[1], "rx", "off", "tx", "off")
		}
	}
	return s.err
}

// nsArgs prefixes ip(8) arguments with -n NS unless ns is the root namespace.
func nsArgs(ns string, args ...string) []string {
	if ns == "" {
		return args
	}
	return append([]string{"-n", ns}, args...)
}

// inNetNS runs f on an OS thread switched into the namespace: sockets created there
// belong to it for their whole life. Should switching back fail, the thread stays
// locked so that it dies with the goroutine instead of running others in the wrong
// namespace.
func inNetNS(ns netns.NsHandle, f func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("current network namespace: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter network namespace: %w", err)
	}
	ferr := f()
	if err := netns.Set(orig); err != nil {
		return fmt.Errorf("leave network namespace: %w", err)
	}
	runtime.UnlockOSThread()
	return ferr
}
