package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/shardlb/shardlb/internal/labsys"
)

// nginxPage is the page the guide's nginx pods serve.
const nginxPage = `<!DOCTYPE html>
<html>
<head>
<title>Welcome to nginx!</title>
<style>
html { color-scheme: light dark; }
body { width: 35em; margin: 0 auto;
font-family: Tahoma, Verdana, Arial, sans-serif; }
</style>
</head>
<body>
<h1>Welcome to nginx!</h1>
<p>If you see this page, the nginx web server is successfully installed and
working. Further configuration is required.</p>

<p>For online documentation and support please refer to
<a href="http://nginx.org/">nginx.org</a>.<br/>
Commercial support is available at
<a href="http://nginx.com/">nginx.com</a>.</p>

<p><em>Thank you for using nginx.</em></p>
</body>
</html>
`

// The long-lived stream every backend serves at /stream: streamBytes at streamRate
// bytes a second, about 65 s, in a pattern a reader checks byte by byte.
const (
	streamBytes = 1 << 20
	streamRate  = 16 << 10
)

// streamBody is the stream's content: byte i is i mod 251.
func streamBody() []byte {
	b := make([]byte, streamBytes)
	for i := range b {
		b[i] = byte(i % 251)
	}
	return b
}

// podHeader names the pod that answered, so that a test can tell which backend a VIP
// reached; the page itself is the guide's.
const podHeader = "X-Pod"

// backend is a "pod": nginx in its own namespace on the node LAN, standing in for the
// guide's ghcr.io/loxilb-io/nginx container.
type backend struct {
	pod   string // the Pod object's name
	ns    string
	addr  netip.Addr
	addr6 netip.Addr // in a dual-stack lab
	port  uint16
	proc  *labsys.Proc
}

// startBackend runs nginx in ns, listening on addr:port and, when addr6 is valid, on
// addr6:port too.
func startBackend(ctx context.Context, pod, ns, dir string, addr, addr6 netip.Addr, port uint16) (*backend, error) {
	b := &backend{pod: pod, ns: ns, addr: addr, addr6: addr6, port: port}
	listen := fmt.Sprintf("listen %s backlog=4096;", netip.AddrPortFrom(addr, port))
	if addr6.IsValid() {
		listen += fmt.Sprintf("\n    listen %s backlog=4096;", netip.AddrPortFrom(addr6, port))
	}
	html := filepath.Join(dir, "html")
	if err := os.MkdirAll(filepath.Join(dir, "tmp"), 0o755); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(html, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(html, "index.html"), []byte(nginxPage), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(html, "stream"), streamBody(), 0o644); err != nil {
		return nil, err
	}
	conf := fmt.Sprintf(`daemon off;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %[1]s/tmp;
  proxy_temp_path %[1]s/tmp;
  default_type text/html;
  keepalive_requests 1000000;
  server {
    %[2]s
    root %[3]s;
    add_header %[4]s %[5]s;
    # A long-lived stream: streamBytes at streamRate bytes a second.
    location = /stream {
      default_type application/octet-stream;
      limit_rate %[6]d;
      limit_rate_after 0;
      sendfile off;
      output_buffers 1 4k;
    }
  }
}
`, dir, listen, html, podHeader, pod, streamRate)
	confPath := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	p, err := labsys.StartProc("nginx "+pod, filepath.Join(dir, "nginx.out"),
		"ip", "netns", "exec", ns, "nginx", "-e", "stderr", "-p", dir, "-c", confPath)
	if err != nil {
		return nil, err
	}
	b.proc = p
	ap := netip.AddrPortFrom(addr, port).String()
	return b, waitFor(ctx, 10*time.Second, "nginx of "+pod, func() error {
		if !p.Running() {
			return fmt.Errorf("nginx exited: %v (see %s)", p.ExitErr(), p.Log)
		}
		// Listening is checked from inside the namespace, where the address lives.
		_, err := labsys.NSRun(ns, "bash", "-c", "exec 3<>/dev/tcp/"+addr.String()+"/"+fmt.Sprint(port))
		if err != nil {
			return fmt.Errorf("connect %s: %w", ap, err)
		}
		return nil
	})
}
