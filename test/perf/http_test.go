package perf

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shardlb/shardlb/internal/testenv"
)

// startNginx serves a two-byte body on port 80 of every backend address, and stops
// nginx by its PID when the test ends.
func (tp *topology) startNginx(t testing.TB) {
	t.Helper()
	testenv.RequireTool(t, "nginx")
	dir := t.TempDir()
	conf := fmt.Sprintf(`worker_processes 2;
daemon off;
master_process on;
user root;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 16384; }
http {
	access_log off;
	keepalive_requests 10000000;
	client_body_temp_path %[1]s/body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
	server {
		listen %[2]d reuseport backlog=4096;
		location / { return 200 "ok"; }
	}
}
`, dir, httpPort)
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	// ip netns exec execs nginx in place: the PID is nginx's master.
	cmd := tp.backend.Cmd("nginx", "-p", dir, "-c", path)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start nginx: %v", err)
	}
	tp.nginxPID = cmd.Process.Pid
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM) // the master stops its workers
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	addr := net.JoinHostPort(directAddr.String(), strconv.Itoa(httpPort))
	for start := time.Now(); ; time.Sleep(50 * time.Millisecond) {
		err := inNetNS(tp.client.Name, func() error {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil {
			return
		}
		select {
		case err := <-done:
			t.Fatalf("nginx exited: %v (log in %s)", err, dir)
		default:
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("nginx not reachable at %s: %v", addr, err)
		}
	}
}

var (
	wrkCount  = regexp.MustCompile(`(\d+) requests in`)
	wrkRate   = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkNon2xx = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
	wrkErrors = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
)

// httpRun is one wrk run.
type httpRun struct {
	rate float64 // requests per second
	// cpuPerReq is CPU time per request of everything on the path: wrk (its rusage),
	// nginx's workers and both ksoftirqds (their scheduler run time), which includes
	// the load balancer's softirq work wherever it ran. Other load on the machine
	// changes rate but not this.
	cpuPerReq time.Duration
}

// wrk runs wrk from the client against v.dst. With closeConns every request opens a
// new connection (Connection: close).
func (tp *topology) wrk(t testing.TB, v variant, closeConns bool) httpRun {
	t.Helper()
	testenv.RequireTool(t, "wrk")
	args := []string{
		"-t", strconv.Itoa(httpThreads), "-c", strconv.Itoa(httpConnsOpen),
		"-d", fmt.Sprintf("%ds", int(httpDuration.Seconds())),
	}
	if closeConns {
		args = append(args, "-H", "Connection: close")
	}
	args = append(args, fmt.Sprintf("http://%s/", net.JoinHostPort(v.dst.String(), strconv.Itoa(httpPort))))
	threads := tp.serverThreads(t)
	before := runtimes(t, threads)
	cmd := tp.client.Cmd("wrk", args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s: wrk %v: %v\n%s", v.name, args, err, out)
	}
	after := runtimes(t, threads)
	m := wrkRate.FindSubmatch(out)
	c := wrkCount.FindSubmatch(out)
	if m == nil || c == nil {
		t.Fatalf("%s: no request count or rate in wrk output:\n%s", v.name, out)
	}
	if n := wrkNon2xx.FindSubmatch(out); n != nil {
		t.Fatalf("%s: %s non-2xx responses:\n%s", v.name, n[1], out)
	}
	rate, _ := strconv.ParseFloat(string(m[1]), 64)
	requests, _ := strconv.ParseFloat(string(c[1]), 64)
	// A few resets at the end of a run are normal; a load balancer that loses
	// connections is not measured, it is broken.
	if e := wrkErrors.FindSubmatch(out); e != nil {
		total := 0
		for _, s := range e[1:] {
			n, _ := strconv.Atoi(string(s))
			total += n
		}
		if float64(total) > requests/100 {
			t.Fatalf("%s: socket errors on more than 1%% of requests:\n%s", v.name, out)
		}
	}
	cpu := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime() + (after - before)
	return httpRun{rate: rate, cpuPerReq: time.Duration(float64(cpu) / requests)}
}

// serverThreads returns the schedstat files of nginx's worker threads and of every
// CPU's ksoftirqd.
func (tp *topology) serverThreads(t testing.TB) []string {
	t.Helper()
	var paths []string
	for cpu := range runtime.NumCPU() {
		p, err := ksoftirqd(cpu)
		if err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	workers := 0
	for _, d := range dirs {
		stat, err := os.ReadFile(filepath.Join("/proc", d.Name(), "stat"))
		if err != nil {
			continue
		}
		// Fields after the command's closing parenthesis: state, ppid, ...
		rest := stat[bytes.LastIndexByte(stat, ')')+1:]
		f := strings.Fields(string(rest))
		if len(f) > 1 && f[1] == strconv.Itoa(tp.nginxPID) {
			tasks, _ := filepath.Glob(filepath.Join("/proc", d.Name(), "task", "*", "schedstat"))
			paths = append(paths, tasks...)
			workers++
		}
	}
	if workers == 0 {
		t.Fatalf("no nginx workers under pid %d", tp.nginxPID)
	}
	return paths
}

func runtimes(t testing.TB, paths []string) time.Duration {
	t.Helper()
	var sum time.Duration
	for _, p := range paths {
		d, err := schedRuntime(p)
		if err != nil {
			t.Fatal(err)
		}
		sum += d
	}
	return sum
}

// measureHTTP runs wrk per variant and round.
func measureHTTP(t testing.TB, tp *topology, vs []variant, closeConns bool) map[string][]httpRun {
	t.Helper()
	runs := map[string][]httpRun{}
	for _, v := range vs {
		runs[v.name] = make([]httpRun, rounds)
	}
	alternate(t, vs, func(v variant, r int) {
		withVariant(t, tp, v, func() { runs[v.name][r] = tp.wrk(t, v, closeConns) })
	})
	return runs
}
