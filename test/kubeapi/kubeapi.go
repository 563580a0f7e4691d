// Package kubeapi runs a real etcd and kube-apiserver for tests and the lab: generated
// certificates, service-account keys and an admin token, bound to a given address, and
// stopped again by PID. It is the Kubernetes half of the test levels in DESIGN.md.
package kubeapi

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Version is the Kubernetes release whose binaries hack/k8s-binaries.sh builds.
const Version = "v1.37.2"

// BinDirEnv names the environment variable that points at the directory holding the
// kube-apiserver and etcd binaries (make test sets it).
const BinDirEnv = "SHARDLB_K8S_BINS"

// DefaultBinDir is where hack/k8s-binaries.sh caches the binaries.
func DefaultBinDir() string {
	if d := os.Getenv(BinDirEnv); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ""
	}
	return filepath.Join(home, ".cache", "shardlb", "k8s-"+Version)
}

// ErrBinariesMissing: kube-apiserver or etcd is not in the binary directory.
var ErrBinariesMissing = errors.New("kube-apiserver or etcd binary missing (run make k8s-bins)")

// Options says where and how to run the pair. Zero values are sane defaults.
type Options struct {
	// BindAddress is where the apiserver listens and what it advertises; default
	// 127.0.0.1. Use a bridge address to reach it from network namespaces.
	BindAddress netip.Addr
	// Port of the apiserver; 0 picks a free one.
	Port int
	// Dir holds certificates, keys, etcd data and logs; "" makes a temporary one that
	// Stop removes. A given Dir is left in place.
	Dir string
	// BinDir holds kube-apiserver and etcd; "" means DefaultBinDir().
	BinDir string
	// ExtraArgs are appended to the kube-apiserver command line.
	ExtraArgs []string
	// ServiceAccountAdmission keeps the ServiceAccount admission plugin, which mounts
	// a token into Pods and refuses Pods of a namespace without its ServiceAccount (a
	// kube-controller-manager creates them): what a cluster whose kubelets run Pods
	// needs. Off by default, as without a controller-manager no Pod would be admitted.
	ServiceAccountAdmission bool
	// Log receives both processes' output; nil writes it to Dir/etcd.log and
	// Dir/apiserver.log.
	Log io.Writer
}

// Server is a running etcd + kube-apiserver.
type Server struct {
	dir, ownDir string
	url         string
	token       string
	caPEM       []byte
	kubeconfig  string

	mu      sync.Mutex
	procs   []*proc // in start order; Stop stops them in reverse
	logs    []*os.File
	stopped bool
}

// Start launches etcd, then kube-apiserver, and returns when /readyz answers ok. On
// error everything started is stopped again.
func Start(ctx context.Context, o Options) (_ *Server, err error) {
	if !o.BindAddress.IsValid() {
		o.BindAddress = netip.MustParseAddr("127.0.0.1")
	}
	if o.BinDir == "" {
		o.BinDir = DefaultBinDir()
	}
	apiserverBin := filepath.Join(o.BinDir, "kube-apiserver")
	etcdBin := filepath.Join(o.BinDir, "etcd")
	for _, b := range []string{apiserverBin, etcdBin} {
		if st, err := os.Stat(b); err != nil || st.Mode()&0o111 == 0 {
			return nil, fmt.Errorf("%w: %s", ErrBinariesMissing, b)
		}
	}
	s := &Server{dir: o.Dir}
	if s.dir == "" {
		d, err := os.MkdirTemp("", "kubeapi-")
		if err != nil {
			return nil, fmt.Errorf("kubeapi: temp dir: %w", err)
		}
		s.dir, s.ownDir = d, d
	}
	defer func() {
		if err != nil {
			_ = s.Stop()
		}
	}()
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return nil, fmt.Errorf("kubeapi: %w", err)
	}

	// etcd stays on loopback: only the apiserver talks to it.
	etcdClient, err := freePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	etcdPeer, err := freePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	port := o.Port
	if port == 0 {
		if port, err = freePort(o.BindAddress.String()); err != nil {
			return nil, err
		}
	}
	pki, err := writePKI(s.dir, o.BindAddress)
	if err != nil {
		return nil, err
	}
	s.token, s.caPEM = pki.token, pki.caPEM
	hostPort := net.JoinHostPort(o.BindAddress.String(), strconv.Itoa(port))
	s.url = "https://" + hostPort

	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdClient)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPeer)
	if err := s.spawn(o.Log, "etcd", etcdBin,
		"--data-dir", filepath.Join(s.dir, "etcd"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "default="+peerURL,
		// Tests throw the data away: skipping fsync saves seconds per run.
		"--unsafe-no-fsync", "--log-level", "warn",
	); err != nil {
		return nil, err
	}
	args := []string{
		"--etcd-servers", etcdURL,
		"--bind-address", o.BindAddress.String(),
		"--advertise-address", o.BindAddress.String(),
		"--secure-port", strconv.Itoa(port),
		// 1.37 refuses a loopback advertise address with the lease reconciler.
		"--endpoint-reconciler-type", "none",
		"--cert-dir", filepath.Join(s.dir, "certs"),
		"--tls-cert-file", pki.certFile, "--tls-private-key-file", pki.keyFile,
		"--client-ca-file", pki.caFile,
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", pki.saPubFile,
		"--service-account-signing-key-file", pki.saKeyFile,
		"--token-auth-file", pki.tokenFile,
		"--authorization-mode", "RBAC",
		// Large enough for benchmarks with ten thousand services.
		"--service-cluster-ip-range", "10.96.0.0/16",
		"--v", "0",
	}
	if !o.ServiceAccountAdmission {
		args = append(args, "--disable-admission-plugins", "ServiceAccount")
	}
	if err := s.spawn(o.Log, "apiserver", apiserverBin, append(args, o.ExtraArgs...)...); err != nil {
		return nil, err
	}
	if err := s.waitReady(ctx); err != nil {
		return nil, err
	}
	s.kubeconfig = filepath.Join(s.dir, "kubeconfig")
	if err := os.WriteFile(s.kubeconfig, s.kubeconfigYAML(), 0o600); err != nil {
		return nil, fmt.Errorf("kubeapi: kubeconfig: %w", err)
	}
	return s, nil
}

// spawn starts one process with its output in Dir/<name>.log (or log).
func (s *Server) spawn(log io.Writer, name, bin string, args ...string) error {
	cmd := exec.Command(bin, args...)
	if log == nil {
		f, err := os.Create(filepath.Join(s.dir, name+".log"))
		if err != nil {
			return fmt.Errorf("kubeapi: %s log: %w", name, err)
		}
		s.logs = append(s.logs, f)
		log = f
	}
	cmd.Stdout, cmd.Stderr = log, log
	// Should the test binary die without running Stop, the kernel kills the pair too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("kubeapi: start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	s.mu.Lock()
	s.procs = append(s.procs, p)
	s.mu.Unlock()
	return nil
}

// proc is one child; done closes when it has exited and been reaped.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

func (s *Server) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(s.caPEM)
	hc := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	defer hc.CloseIdleConnections()
	var last string
	for {
		if err := s.exited(); err != nil {
			return err
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.url+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+s.token)
		resp, err := hc.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, bytes.TrimSpace(body))
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("kubeapi: apiserver not ready (last: %s; logs in %s): %w", last, s.dir, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// exited reports a process that died during start-up.
func (s *Server) exited() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.procs {
		select {
		case <-p.done:
			return fmt.Errorf("kubeapi: %s exited during start-up (%v); logs in %s", p.name, p.err, s.dir)
		default:
		}
	}
	return nil
}

// URL is the apiserver's https address.
func (s *Server) URL() string { return s.url }

// Kubeconfig is the path of a kubeconfig file with admin rights.
func (s *Server) Kubeconfig() string { return s.kubeconfig }

// Dir is the directory holding certificates, data and logs.
func (s *Server) Dir() string { return s.dir }

// RESTConfig is an admin client configuration. QPS limits are raised because tests
// and benchmarks create objects in bulk.
func (s *Server) RESTConfig() *rest.Config {
	return &rest.Config{
		Host:            s.url,
		BearerToken:     s.token,
		TLSClientConfig: rest.TLSClientConfig{CAData: s.caPEM},
		QPS:             1000,
		Burst:           2000,
	}
}

// Client is an admin clientset.
func (s *Server) Client() (kubernetes.Interface, error) {
	c, err := kubernetes.NewForConfig(s.RESTConfig())
	if err != nil {
		return nil, fmt.Errorf("kubeapi: clientset: %w", err)
	}
	return c, nil
}

func (s *Server) kubeconfigYAML() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, `apiVersion: v1
kind: Config
clusters:
- name: kubeapi
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: admin
  user:
    token: %s
contexts:
- name: kubeapi
  context:
    cluster: kubeapi
    user: admin
current-context: kubeapi
`, s.url, filepath.Join(s.dir, "ca.crt"), s.token)
	return b.Bytes()
}

// Stop stops the apiserver, then etcd (SIGTERM, SIGKILL after five seconds), by PID,
// and removes Dir if Start created it. It is safe to call more than once.
func (s *Server) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return nil
	}
	s.stopped = true
	var errs []error
	for i := len(s.procs) - 1; i >= 0; i-- {
		stopProcess(s.procs[i])
	}
	for _, f := range s.logs {
		_ = f.Close()
	}
	if s.ownDir != "" {
		if err := os.RemoveAll(s.ownDir); err != nil {
			errs = append(errs, fmt.Errorf("kubeapi: remove %s: %w", s.ownDir, err))
		}
	}
	return errors.Join(errs...)
}

func stopProcess(p *proc) {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func freePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("kubeapi: free port on %s: %w", host, err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
