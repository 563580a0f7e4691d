package perf

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
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
	wrkRate   = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkNon2xx = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
	wrkErrors = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
)

// wrk runs wrk from the client against v.dst and returns requests per second. With
// closeConns every request opens a new connection (Connection: close).
func (tp *topology) wrk(t testing.TB, v variant, closeConns bool) float64 {
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
	out, err := tp.client.Cmd("wrk", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: wrk %v: %v\n%s", v.name, args, err, out)
	}
	m := wrkRate.FindSubmatch(out)
	if m == nil {
		t.Fatalf("%s: no Requests/sec in wrk output:\n%s", v.name, out)
	}
	if n := wrkNon2xx.FindSubmatch(out); n != nil {
		t.Fatalf("%s: %s non-2xx responses:\n%s", v.name, n[1], out)
	}
	rate, _ := strconv.ParseFloat(string(m[1]), 64)
	// A few resets at the end of a run are normal; a load balancer that loses
	// connections is not measured, it is broken.
	if e := wrkErrors.FindSubmatch(out); e != nil {
		total := 0
		for _, s := range e[1:] {
			n, _ := strconv.Atoi(string(s))
			total += n
		}
		if float64(total) > rate*httpDuration.Seconds()/100 {
			t.Fatalf("%s: socket errors on more than 1%% of requests:\n%s", v.name, out)
		}
	}
	return rate
}

// measureHTTP returns requests per second per variant and round.
func measureHTTP(t testing.TB, tp *topology, vs []variant, closeConns bool) map[string][]float64 {
	t.Helper()
	rates := map[string][]float64{}
	for _, v := range vs {
		rates[v.name] = make([]float64, rounds)
	}
	alternate(t, vs, func(v variant, r int) {
		withVariant(t, tp, v, func() { rates[v.name][r] = tp.wrk(t, v, closeConns) })
	})
	return rates
}
