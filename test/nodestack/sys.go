package nodestack

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// sh runs a command and returns its output; the error carries the output, since a
// failing ip or mount says why only there.
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

// addNetNS creates a namespace with loopback up, forwarding as asked, and neither
// reverse-path filtering nor ICMP redirects: the nodes forward one-arm (out of the
// interface traffic came in on), and redirects would teach the router to bypass them.
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
		if e[0] == "" {
			s.run("ip", "link", "set", "dev", e[1], "up")
			s.run("ethtool", "-K", e[1], "rx", "off", "tx", "off")
		} else {
			s.run("ip", "-n", e[0], "link", "set", "dev", e[1], "up")
			s.in(e[0], "ethtool", "-K", e[1], "rx", "off", "tx", "off")
		}
	}
	return s.err
}

// proc is one process the stack started; done closes once it has exited and been
// reaped, so that stopping it never signals a PID the kernel gave to someone else.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

// startProc starts argv with its output appended to logPath, in its own process group
// and killed should the test die without cleaning up.
func startProc(name, logPath string, argv ...string) (*proc, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("%s: log: %w", name, err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM and, after grace, SIGKILL; it returns once the process is reaped.
func (p *proc) stop(grace time.Duration) {
	if p.running() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-p.done:
	case <-time.After(grace):
		if p.running() {
			_ = p.cmd.Process.Signal(syscall.SIGKILL)
		}
		<-p.done
	}
}

// exited says how a process that should run ended, naming its log.
func (p *proc) exited() error {
	if p.running() {
		return nil
	}
	if p.err == nil {
		p.err = errors.New("exit status 0")
	}
	return fmt.Errorf("%s exited: %w (log %s)", p.name, p.err, p.log)
}
