// Package testenv gives tests what they need from the machine: root, tools, network
// namespaces and veth pairs, each removed again when the test ends, also on failure.
//
// A test that lacks root or a tool fails under CI=true (CI must never pass by skipping)
// and skips with the same message elsewhere.
package testenv

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// CI reports whether the tests run in CI (CI=true), where missing prerequisites fail.
func CI() bool { return os.Getenv("CI") == "true" }

// Unavailable fails the test under CI and skips it elsewhere, with the same message.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if CI() {
		t.Fatalf("prerequisite missing under CI=true: %s", msg)
	}
	t.Skipf("prerequisite missing: %s", msg)
}

// RequireRoot stops the test unless it runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "this test needs root (run make test as root)")
	}
}

// RequireTool stops the test unless every named program is on PATH (or is an
// absolute path that exists), and returns their paths in order.
func RequireTool(t testing.TB, names ...string) []string {
	t.Helper()
	paths := make([]string, len(names))
	for i, n := range names {
		p, err := exec.LookPath(n)
		if err != nil {
			Unavailable(t, "%s not found (make deps installs it)", n)
		}
		paths[i] = p
	}
	return paths
}

// Run runs a command and fails the test with its output if it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// NetNS is a network namespace created for one test.
type NetNS struct{ Name string }

// NewNetNS creates a network namespace with a unique name starting with prefix, brings
// its loopback up, and deletes it (killing what still runs in it) when the test ends.
func NewNetNS(t testing.TB, prefix string) NetNS {
	t.Helper()
	RequireRoot(t)
	RequireTool(t, "ip")
	var b [3]byte
	_, _ = rand.Read(b[:])
	name := fmt.Sprintf("%s-%s", prefix, hex.EncodeToString(b[:]))
	Run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { DeleteNetNS(name) })
	ns := NetNS{Name: name}
	ns.Run(t, "ip", "link", "set", "lo", "up")
	return ns
}

// DeleteNetNS kills every process left in the namespace and deletes it.
func DeleteNetNS(name string) {
	if out, err := exec.Command("ip", "netns", "pids", name).Output(); err == nil {
		for _, pid := range strings.Fields(string(out)) {
			_ = exec.Command("kill", "-9", pid).Run()
		}
	}
	_ = exec.Command("ip", "netns", "del", name).Run()
}

// Cmd returns a command that runs inside the namespace.
func (n NetNS) Cmd(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Run runs a command inside the namespace and fails the test if it fails.
func (n NetNS) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	return Run(t, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Veth connects two namespaces with a veth pair, assigns the given addresses
// (CIDR notation, empty for none), brings both ends up and turns checksum offload off
// so that checksum bugs are not hidden.
func Veth(t testing.TB, a NetNS, aIf, aAddr string, b NetNS, bIf, bAddr string) {
	t.Helper()
	Run(t, "ip", "link", "add", aIf, "netns", a.Name, "type", "veth", "peer", "name", bIf, "netns", b.Name)
	for _, e := range []struct {
		ns        NetNS
		ifc, addr string
	}{{a, aIf, aAddr}, {b, bIf, bAddr}} {
		if e.addr != "" {
			e.ns.Run(t, "ip", "addr", "add", e.addr, "dev", e.ifc)
		}
		e.ns.Run(t, "ip", "link", "set", e.ifc, "up")
		if _, err := exec.LookPath("ethtool"); err == nil {
			_ = e.ns.Cmd("ethtool", "-K", e.ifc, "rx", "off", "tx", "off").Run()
		}
	}
}
