package bgp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/shardlb/shardlb/internal/testenv"
	"github.com/shardlb/shardlb/shard"
	"github.com/shardlb/shardlb/test/frr"
)

// The FRR tests run each speaker as its own process inside its own network
// namespace (a Go process cannot keep GoBGP's goroutines in one namespace), so a
// speaker can also be SIGKILLed. That process is this test binary, re-executed with
// speakerEnv holding its Config as JSON; it reads one command per line on stdin.
const speakerEnv = "SHARDLB_BGP_TEST_SPEAKER"

func TestMain(m *testing.M) {
	if cfg := os.Getenv(speakerEnv); cfg != "" {
		os.Exit(runSpeakerProcess(cfg))
	}
	os.Exit(m.Run())
}

// runSpeakerProcess is the main of a speaker process. Commands on stdin:
// a JSON array of advertisements (SetAdvertisements), "peers" (Peers as JSON),
// "inject PREFIX LOCAL_PREF" (a path added through the speaker's own gRPC API, as
// another process on the node would), "setpeers JSON" (SetPeers), "poolcommunities
// JSON" (SetPoolCommunities), "resume" (Resume), "suspend" (Suspend, then exit) and
// "shutdown". Each is answered with one line:
// "ok", JSON, or "error: ...".
// SIGTERM shuts down cleanly, as the DaemonSet's pod would.
func runSpeakerProcess(cfgJSON string) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	var cfg Config
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		log.Error("bad speaker config", "err", err)
		return 2
	}
	ctx := context.Background()
	s, err := New(ctx, cfg, log)
	if err != nil {
		log.Error("start speaker", "err", err)
		return 1
	}
	var outMu sync.Mutex
	reply := func(line string) {
		outMu.Lock()
		defer outMu.Unlock()
		fmt.Println(line)
	}
	shutdown := func() int {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := s.Shutdown(sctx); err != nil {
			log.Error("shutdown", "err", err)
			return 1
		}
		return 0
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	reply("ready")
	for {
		select {
		case <-term:
			return shutdown()
		case line, ok := <-lines:
			switch {
			case !ok || line == "shutdown":
				code := shutdown()
				reply("ok")
				return code
			case line == "suspend":
				sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				err := s.Suspend(sctx)
				cancel()
				if err != nil {
					log.Error("suspend", "err", err)
					return 1
				}
				reply("ok")
				return 0
			case line == "resume":
				if err := s.Resume(ctx); err != nil {
					reply("error: " + err.Error())
					continue
				}
				reply("ok")
			case line == "peers":
				b, _ := json.Marshal(s.Peers())
				reply(string(b))
			case strings.HasPrefix(line, "setpeers "):
				var peers []Peer
				if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "setpeers ")), &peers); err != nil {
					reply("error: " + err.Error())
					continue
				}
				if err := s.SetPeers(ctx, peers); err != nil {
					reply("error: " + err.Error())
					continue
				}
				reply("ok")
			case strings.HasPrefix(line, "poolcommunities "):
				var pcs []PoolCommunities
				if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "poolcommunities ")), &pcs); err != nil {
					reply("error: " + err.Error())
					continue
				}
				if err := s.SetPoolCommunities(ctx, pcs); err != nil {
					reply("error: " + err.Error())
					continue
				}
				reply("ok")
			case strings.HasPrefix(line, "inject "):
				if err := injectCommand(ctx, cfg.GRPCListen, strings.Fields(line)[1:]); err != nil {
					reply("error: " + err.Error())
					continue
				}
				reply("ok")
			default:
				var advs []shard.Advertisement
				if err := json.Unmarshal([]byte(line), &advs); err != nil {
					reply("error: " + err.Error())
					continue
				}
				if err := s.SetAdvertisements(ctx, advs); err != nil {
					reply("error: " + err.Error())
					continue
				}
				reply("ok")
			}
		}
	}
}

// injectCommand runs "inject PREFIX LOCAL_PREF" against the gRPC API at addr.
func injectCommand(ctx context.Context, addr string, args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("want inject PREFIX LOCAL_PREF, got %q", args)
	}
	prefix, err := netip.ParsePrefix(args[0])
	if err != nil {
		return err
	}
	lp, err := strconv.ParseUint(args[1], 10, 32)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return grpcAddPath(ctx, addr, prefix, uint32(lp))
}

// speakerProc is a speaker process seen from the test.
type speakerProc struct {
	name string
	ns   testenv.NetNS
	addr netip.Addr
	cfg  Config

	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout *bufio.Reader
	stderr *bytes.Buffer
	exited chan struct{}
}

// start runs the speaker process; it returns once the speaker is up (not its
// sessions).
func (p *speakerProc) start(t testing.TB) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cfgJSON, _ := json.Marshal(p.cfg)
	cmd := exec.Command("ip", "netns", "exec", p.ns.Name, exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), speakerEnv+"="+string(cfgJSON))
	p.stderr = new(bytes.Buffer)
	cmd.Stderr = &lockedWriter{w: p.stderr}
	p.stdin, _ = cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	p.stdout = bufio.NewReaderSize(out, 1<<20)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start speaker %s: %v", p.name, err)
	}
	p.cmd = cmd
	p.exited = make(chan struct{})
	go func() { _ = cmd.Wait(); close(p.exited) }()
	if line := p.readLine(); line != "ready" {
		t.Fatalf("speaker %s did not start: %q\n%s", p.name, line, p.logs())
	}
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func (p *speakerProc) logs() string {
	if w, ok := p.cmd.Stderr.(*lockedWriter); ok {
		w.mu.Lock()
		defer w.mu.Unlock()
	}
	return p.stderr.String()
}

func (p *speakerProc) readLine() string {
	line, err := p.stdout.ReadString('\n')
	if err != nil && line == "" {
		return "EOF: " + err.Error()
	}
	return strings.TrimSuffix(line, "\n")
}

func (p *speakerProc) send(t testing.TB, line string) string {
	t.Helper()
	if _, err := io.WriteString(p.stdin, line+"\n"); err != nil {
		t.Fatalf("speaker %s: write command: %v\n%s", p.name, err, p.logs())
	}
	return p.readLine()
}

// inject adds a path through the speaker's gRPC API from inside its namespace.
func (p *speakerProc) inject(t testing.TB, prefix netip.Prefix, localPref uint32) {
	t.Helper()
	if got := p.send(t, fmt.Sprintf("inject %s %d", prefix, localPref)); got != "ok" {
		t.Fatalf("speaker %s: inject %v: %s\n%s", p.name, prefix, got, p.logs())
	}
}

// set applies advertisements in the speaker process.
func (p *speakerProc) set(t testing.TB, advs ...shard.Advertisement) {
	t.Helper()
	b, _ := json.Marshal(advs)
	if got := p.send(t, string(b)); got != "ok" {
		t.Fatalf("speaker %s: SetAdvertisements: %s\n%s", p.name, got, p.logs())
	}
}

// setPeers calls SetPeers in the speaker process.
func (p *speakerProc) setPeers(t testing.TB, peers ...Peer) {
	t.Helper()
	b, _ := json.Marshal(peers)
	if got := p.send(t, "setpeers "+string(b)); got != "ok" {
		t.Fatalf("speaker %s: SetPeers: %s\n%s", p.name, got, p.logs())
	}
}

// setPoolCommunities calls SetPoolCommunities in the speaker process.
func (p *speakerProc) setPoolCommunities(t testing.TB, pcs ...PoolCommunities) {
	t.Helper()
	b, _ := json.Marshal(pcs)
	if got := p.send(t, "poolcommunities "+string(b)); got != "ok" {
		t.Fatalf("speaker %s: SetPoolCommunities: %s\n%s", p.name, got, p.logs())
	}
}

func (p *speakerProc) peers(t testing.TB) []PeerStatus {
	t.Helper()
	var ps []PeerStatus
	if err := json.Unmarshal([]byte(p.send(t, "peers")), &ps); err != nil {
		t.Fatalf("speaker %s: peers: %v", p.name, err)
	}
	return ps
}

func (p *speakerProc) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal speaker %s: %v", p.name, err)
	}
}

// wait waits for the process to exit.
func (p *speakerProc) wait(t testing.TB) {
	t.Helper()
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		t.Fatalf("speaker %s did not exit\n%s", p.name, p.logs())
	}
}

// stop kills the process by PID if it still runs.
func (p *speakerProc) stop() {
	if p.cmd == nil {
		return
	}
	select {
	case <-p.exited:
	default:
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// rssMiB is the resident set size of the speaker process.
func (p *speakerProc) rssMiB(t testing.TB) float64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		t.Fatalf("read speaker RSS: %v", err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.Atoi(f[1])
			return float64(kb) / 1024
		}
	}
	t.Fatal("no VmRSS in /proc status")
	return 0
}

// setLink brings the speaker's uplink down or up through netlink, so the moment
// of the cut is known to the microsecond.
func (p *speakerProc) setLink(t testing.TB, up bool) {
	t.Helper()
	h, err := netns.GetFromName(p.ns.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	link, err := nl.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if up {
		err = nl.LinkSetUp(link)
	} else {
		err = nl.LinkSetDown(link)
	}
	if err != nil {
		t.Fatalf("set %s eth0 up=%v: %v", p.name, up, err)
	}
}

// lab is an FRR router on a bridge (10.0.0.1/24) with speakers behind it
// (10.0.0.11, .12, ...), each in its own namespace. The bridge keeps the router's
// interface up when one speaker's link goes down, as a switch would, so only BFD
// or the hold timer can notice.
type lab struct {
	routerNS testenv.NetNS
	router   *frr.Router
	speakers []*speakerProc
}

type labConfig struct {
	routerASN, speakerASN uint32
	speakers              int
	bfd                   time.Duration // 0: no BFD
	hold                  time.Duration // speaker's hold time; 0: default 9 s
	// gracefulRestart is the speakers' restart time, with FRR's graceful restart on;
	// 0: off on both sides.
	gracefulRestart time.Duration
	maximumPaths    int
}

func requireLab(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "ip", "vtysh", frr.Dir+"/zebra", frr.Dir+"/bgpd", frr.Dir+"/bfdd")
}

var routerAddr = netip.MustParseAddr("10.0.0.1")

// labPools is the speakers' VIP pool: every VIP of the FRR tests but the static one.
var labPools = []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16")}

func speakerAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 0, 0, byte(11 + i)}) }

func newLab(t testing.TB, lc labConfig) *lab {
	t.Helper()
	requireLab(t)
	l := &lab{routerNS: testenv.NewNetNS(t, "bgpr")}
	l.routerNS.Run(t, "ip", "link", "add", "br0", "type", "bridge")
	l.routerNS.Run(t, "ip", "addr", "add", routerAddr.String()+"/24", "dev", "br0")
	l.routerNS.Run(t, "ip", "link", "set", "br0", "up")
	fc := frr.Config{ASN: lc.routerASN, RouterID: routerAddr, MaximumPaths: lc.maximumPaths, GracefulRestart: lc.gracefulRestart > 0}
	if lc.bfd > 0 {
		fc.BFD = frr.BFDTimers{Interval: lc.bfd, Multiplier: 3}
	}
	for i := range lc.speakers {
		name := fmt.Sprintf("s%d", i+1)
		ns := testenv.NewNetNS(t, "bgp"+name)
		testenv.Veth(t, ns, "eth0", speakerAddr(i).String()+"/24", l.routerNS, name, "")
		l.routerNS.Run(t, "ip", "link", "set", name, "master", "br0")
		fc.Neighbors = append(fc.Neighbors, frr.Neighbor{Addr: speakerAddr(i), ASN: lc.speakerASN, BFD: lc.bfd > 0})

		cfg := DefaultConfig()
		cfg.LocalASN = lc.speakerASN
		cfg.RouterID = speakerAddr(i)
		cfg.NextHop4 = speakerAddr(i)
		cfg.Pools = labPools
		cfg.Peers = []Peer{{Addr: routerAddr, ASN: lc.routerASN}}
		if lc.bfd > 0 {
			cfg.BFD = BFDConfig{Enabled: true, Interval: lc.bfd, Multiplier: 3}
		}
		if lc.hold > 0 {
			cfg.HoldTime, cfg.KeepaliveInterval = lc.hold, lc.hold/3
		}
		cfg.GracefulRestart = lc.gracefulRestart
		p := &speakerProc{name: name, ns: ns, addr: speakerAddr(i), cfg: cfg}
		l.speakers = append(l.speakers, p)
	}
	l.router = frr.StartT(t, l.routerNS.Name, fc)
	for _, p := range l.speakers {
		p.start(t)
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("speaker %s log:\n%s", p.name, p.logs())
			}
			p.stop()
		})
	}
	for _, p := range l.speakers {
		l.waitEstablished(t, p)
	}
	return l
}

// waitEstablished waits until FRR has the session with p up (and BFD up, if on).
func (l *lab) waitEstablished(t testing.TB, p *speakerProc) {
	t.Helper()
	l.eventually(t, 30*time.Second, "session with "+p.name, func(ctx context.Context) bool {
		sum, err := l.router.Summary(ctx)
		if err != nil || sum[p.addr].State != "Established" {
			return false
		}
		if !p.cfg.BFD.Enabled {
			return true
		}
		peers, err := l.router.BFDPeers(ctx)
		return err == nil && slices.ContainsFunc(peers, func(b frr.BFDPeer) bool { return b.Peer == p.addr && b.Status == "up" })
	})
}

func (l *lab) eventually(t testing.TB, timeout time.Duration, what string, cond func(ctx context.Context) bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	for !cond(ctx) {
		select {
		case <-ctx.Done():
			t.Fatalf("%s: not within %v", what, timeout)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// waitRoute waits until FRR's kernel route for prefix has exactly the next hops
// want (none: no route) and returns when that was first seen.
func (l *lab) waitRoute(t testing.TB, prefix netip.Prefix, timeout time.Duration, want ...netip.Addr) time.Time {
	t.Helper()
	slices.SortFunc(want, netip.Addr.Compare)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	at, err := l.router.WaitKernelRoute(ctx, prefix, func(h []netip.Addr) bool { return slices.Equal(h, want) })
	if err != nil {
		t.Fatalf("kernel route for %v via %v: %v", prefix, want, err)
	}
	return at
}
