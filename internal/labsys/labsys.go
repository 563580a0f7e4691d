// Package labsys runs the commands, network namespaces, veth pairs and processes that
// the labs (test/lab, test/nodestack) are built from. Every helper shells out to
// ip(8), sysctl(8) and ethtool(8), as an operator would, and puts what they printed
// in its error, since a failing ip says why only there.
package labsys

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
)

// Sh runs a command and returns its output; the error carries the output.
func Sh(name string, args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// NSRun runs a command inside the named network namespace.
func NSRun(ns, name string, args ...string) (string, error) {
	return Sh("ip", append([]string{"netns", "exec", ns, name}, args...)...)
}

// Script runs commands one after the other and stops at the first failure, which Err
// holds.
type Script struct{ Err error }

// Run runs a command unless an earlier one failed.
func (s *Script) Run(name string, args ...string) {
	if s.Err == nil {
		_, s.Err = Sh(name, args...)
	}
}

// In runs a command in the namespace ns unless an earlier one failed.
func (s *Script) In(ns, name string, args ...string) {
	if s.Err == nil {
		_, s.Err = NSRun(ns, name, args...)
	}
}

// AddNetNS creates a namespace with loopback up, forwarding as asked, and neither
// reverse-path filtering nor ICMP redirects: the lab's nodes forward one-arm (out of
// the interface traffic came in on), and redirects would teach the router to bypass
// them.
func AddNetNS(name string, forward bool) error {
	var s Script
	s.Run("ip", "netns", "add", name)
	s.In(name, "ip", "link", "set", "lo", "up")
	fwd := "0"
	if forward {
		fwd = "1"
	}
	s.In(name, "sysctl", "-qw",
		"net.ipv4.ip_forward="+fwd,
		"net.ipv4.conf.all.rp_filter=0",
		"net.ipv4.conf.default.rp_filter=0",
		"net.ipv4.conf.all.send_redirects=0",
		"net.ipv4.conf.default.send_redirects=0",
		"net.ipv4.conf.all.accept_redirects=0",
		"net.ipv4.conf.default.accept_redirects=0")
	return s.Err
}

// DeleteNetNS kills every process left in the namespace, by PID, and deletes it.
func DeleteNetNS(name string) error {
	if out, err := exec.Command("ip", "netns", "pids", name).Output(); err == nil {
		for _, pid := range strings.Fields(string(out)) {
			_ = exec.Command("kill", "-9", pid).Run()
		}
	}
	_, err := Sh("ip", "netns", "del", name)
	return err
}

// ListNetNS returns the namespaces whose name starts with prefix.
func ListNetNS(prefix string) []string {
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

// Veth joins two namespaces ("" is the root namespace) with a veth pair, brings both
// ends up and turns checksum offload off, so that a datapath checksum bug shows as
// lost traffic instead of being hidden by veth.
func Veth(aNS, aIf, bNS, bIf string) error {
	args := []string{"link", "add", aIf}
	if aNS != "" {
		args = append(args, "netns", aNS)
	}
	args = append(args, "type", "veth", "peer", "name", bIf)
	if bNS != "" {
		args = append(args, "netns", bNS)
	}
	var s Script
	s.Run("ip", args...)
	for _, e := range [][2]string{{aNS, aIf}, {bNS, bIf}} {
		s.Run("ip", NSArgs(e[0], "link", "set", e[1], "up")...)
		if e[0] == "" {
			s.Run("ethtool", "-K", e[1], "rx", "off", "tx", "off")
		} else {
			s.In(e[0], "ethtool", "-K", e[1], "rx", "off", "tx", "off")
		}
	}
	return s.Err
}

// NSArgs prefixes ip(8) arguments with -n NS unless ns is the root namespace.
func NSArgs(ns string, args ...string) []string {
	if ns == "" {
		return args
	}
	return append([]string{"-n", ns}, args...)
}

// InNetNS runs f on an OS thread switched into the namespace: sockets created there
// belong to it for their whole life. Should switching back fail, the thread stays
// locked so that it dies with the goroutine instead of running others in the wrong
// namespace.
func InNetNS(ns netns.NsHandle, f func() error) error {
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

// Proc is one process a lab started. Done closes once it has exited and been reaped,
// so that stopping it never signals a PID the kernel has given to someone else.
type Proc struct {
	Name string
	Log  string // where its output goes
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// StartProc starts argv with its output appended to logPath. The process gets its own
// process group, so a Ctrl-C at the terminal reaches only the lab, which then stops
// everything in order; and it is killed should the lab die without cleaning up.
func StartProc(name, logPath string, argv ...string) (*Proc, error) {
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
	p := &Proc{Name: name, Log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p, nil
}

// PID is the process's ID.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// Done closes once the process has exited and been reaped.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Running reports whether the process has not exited yet.
func (p *Proc) Running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Signal sends sig unless the process has already been reaped.
func (p *Proc) Signal(sig syscall.Signal) {
	if p.Running() {
		_ = p.cmd.Process.Signal(sig)
	}
}

// Wait waits at most d for the process to exit.
func (p *Proc) Wait(d time.Duration) bool {
	select {
	case <-p.done:
		return true
	case <-time.After(d):
		return false
	}
}

// Stop sends SIGTERM and, after grace, SIGKILL; it returns once the process is reaped.
func (p *Proc) Stop(grace time.Duration) {
	p.Signal(syscall.SIGTERM)
	if !p.Wait(grace) {
		p.Signal(syscall.SIGKILL)
		<-p.done
	}
}

// ExitErr says how the process ended: nil for exit status 0.
func (p *Proc) ExitErr() error {
	if p.Running() {
		return errors.New("still running")
	}
	return p.err
}

// Exited says how a process that should run ended, naming its log; nil while it runs.
func (p *Proc) Exited() error {
	if p.Running() {
		return nil
	}
	err := p.err
	if err == nil {
		err = errors.New("exit status 0")
	}
	return fmt.Errorf("%s exited: %w (log %s)", p.Name, err, p.Log)
}
