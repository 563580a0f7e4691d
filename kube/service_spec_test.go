package kube

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"

	"github.com/shardlb/shardlb/shard"
)

// datapathRecorder is a Datapath that refuses the frontends refuse returns an error
// for, worded as the datapath package words them, applies the others, and remembers
// every service it was ever given.
type datapathRecorder struct {
	mu      sync.Mutex
	refuse  func(shard.Frontend) error
	calls   int
	given   map[string]bool
	applied []shard.Frontend
}

func (d *datapathRecorder) SetServices(desired []shard.Frontend) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.calls++
	if d.given == nil {
		d.given = map[string]bool{}
	}
	var errs []error
	d.applied = d.applied[:0]
	for _, fe := range desired {
		d.given[fe.Service] = true
		if d.refuse != nil {
			if err := d.refuse(fe); err != nil {
				errs = append(errs, fmt.Errorf("frontend %s/%s of %s: %w", netip.AddrPortFrom(fe.VIP, fe.Port), fe.Protocol, fe.Service, err))
				continue
			}
		}
		d.applied = append(d.applied, fe)
	}
	return errors.Join(errs...)
}

func (d *datapathRecorder) setRefuse(f func(shard.Frontend) error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.refuse = f
}

// frontends are the applied frontends of one service.
func (d *datapathRecorder) frontends(key string) []shard.Frontend {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []shard.Frontend
	for _, fe := range d.applied {
		if fe.Service == key {
			out = append(out, fe)
		}
	}
	return out
}

func (d *datapathRecorder) wasGiven(key string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.given[key]
}

func (d *datapathRecorder) callCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.calls
}

// startPodOn runs a pod whose Router is rec and whose Datapath is dp.
func startPodOn(tb testing.TB, cfg Config, rec *recorder, dp Datapath) *pod {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	p := &pod{rec: rec, cancel: cancel, done: make(chan error, 1)}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("pod", cfg.NodeName)
	}
	go func() { p.done <- Run(ctx, cfg, Deps{Router: rec, Datapath: dp, Logger: log}) }()
	tb.Cleanup(func() { p.stop(tb) })
	return p
}

// update changes a service as a user would, retrying on conflicts with shardlb's writes.
func (e *env) update(tb testing.TB, name string, change func(*corev1.Service)) {
	tb.Helper()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		s, err := e.client.CoreV1().Services(e.ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		change(s)
		_, err = e.client.CoreV1().Services(e.ns).Update(context.Background(), s, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		tb.Fatalf("update service %s: %v", name, err)
	}
}

// served makes a service look as an earlier shardlb left it: a VIP in its status and an
// instance recorded.
func (e *env) served(tb testing.TB, name, vip string) {
	tb.Helper()
	s := e.get(tb, name)
	s.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: vip}}
	if _, err := e.client.CoreV1().Services(e.ns).UpdateStatus(context.Background(), s, metav1.UpdateOptions{}); err != nil {
		tb.Fatal(err)
	}
	e.update(tb, name, func(s *corev1.Service) { s.Annotations[AnnotationInstance] = shard.DefaultInstance })
}

// told is how many times shardlb recorded reason on a service (an Event's count
// included), and the messages.
func (e *env) told(tb testing.TB, name, reason string) (int, []string) {
	tb.Helper()
	list, err := e.client.CoreV1().Events(e.ns).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err != nil {
		tb.Fatal(err)
	}
	n, msgs := 0, []string(nil)
	for _, ev := range list.Items {
		if ev.Source.Component == "shardlb" && ev.Reason == reason {
			n += int(max(ev.Count, 1))
			msgs = append(msgs, ev.Message)
		}
	}
	return n, msgs
}

// waitTold waits until reason was recorded on a service, and returns its messages.
func (e *env) waitTold(tb testing.TB, name, reason string) []string {
	tb.Helper()
	var msgs []string
	waitFor(tb, 10*time.Second, name+"'s "+reason+" event", func() bool {
		var n int
		n, msgs = e.told(tb, name, reason)
		return n > 0
	})
	return msgs
}

// announced reports whether a VIP is among the pod's advertisements.
func announced(rec *recorder, vip string) bool {
	for _, a := range rec.advertisements() {
		if a.Prefix.Addr().String() == vip {
			return true
		}
	}
	return false
}

func rangesOf(fes []shard.Frontend) string {
	if len(fes) == 0 {
		return "no frontend"
	}
	var out []string
	for _, p := range fes[0].SourceRanges {
		out = append(out, p.String())
	}
	return "[" + strings.Join(out, " ") + "]"
}

func withRanges(r ...string) svcOpt {
	return func(s *corev1.Service) { s.Spec.LoadBalancerSourceRanges = r }
}

// readyz is the pod's /readyz status code.
func readyz(addr string) int {
	resp, err := http.Get("http://" + addr + "/readyz")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// Source ranges, from spec.loadBalancerSourceRanges or else the legacy annotation,
// reach every frontend of their service; unreadable ones keep the last valid set, and a
// service that never had one is not served at all. Nothing else moves.
func TestSourceRangesReachTheFrontends(t *testing.T) {
	e := newEnv(t, "sourceranges")
	cfg := e.config(t, "node-a", "defaultPool=10.20.0.1-10.20.0.20", 1)
	cfg.APIAddress = freeAddr(t)

	// Before any shardlb runs: a service whose ranges were never readable, and one
	// served open by an earlier shardlb whose ranges became unreadable. The API server
	// takes an invalid legacy annotation while the field is set, and keeps it when the
	// field is emptied.
	invalidLater := func(name string) {
		e.create(t, e.lbService(name, withRanges("10.9.0.0/16"), annotate(AnnotationLegacySourceRanges, "10.0.0.1/33")))
		e.createSlice(t, name, "10.244.0.9")
		e.update(t, name, func(s *corev1.Service) { s.Spec.LoadBalancerSourceRanges = nil })
	}
	invalidLater("never-valid")
	invalidLater("was-open")
	e.served(t, "was-open", "10.20.0.20")

	rec, dp := &recorder{}, &datapathRecorder{}
	startPodOn(t, cfg, rec, dp)
	for _, c := range []struct {
		name string
		opts []svcOpt
	}{
		{"ranged", []svcOpt{withRanges(" 192.168.0.0/16 ", "10.1.0.0/16", "10.1.0.0/16")}},
		{"legacy", []svcOpt{annotate(AnnotationLegacySourceRanges, "10.3.0.0/16, 10.2.0.0/16")}},
		{"both", []svcOpt{withRanges("10.4.0.0/16"), annotate(AnnotationLegacySourceRanges, "10.5.0.0/16")}},
		{"open", nil},
	} {
		e.createSlice(t, c.name, "10.244.0.1")
		e.create(t, e.lbService(c.name, c.opts...))
	}
	expect := func(name, want, record string) {
		t.Helper()
		key := e.ns + "/" + name
		waitFor(t, 10*time.Second, fmt.Sprintf("%s's frontends with ranges %s", name, want), func() bool {
			return rangesOf(dp.frontends(key)) == want
		})
		waitFor(t, 10*time.Second, fmt.Sprintf("%s's record %q", name, record), func() bool {
			return e.get(t, name).Annotations[AnnotationSourceRanges] == record
		})
	}
	t.Run("set ranges are sorted, deduplicated and the field wins over the legacy annotation", func(t *testing.T) {
		expect("ranged", "[10.1.0.0/16 192.168.0.0/16]", "10.1.0.0/16,192.168.0.0/16")
		expect("legacy", "[10.2.0.0/16 10.3.0.0/16]", "10.2.0.0/16,10.3.0.0/16")
		expect("both", "[10.4.0.0/16]", "10.4.0.0/16")
		expect("open", "[]", "")
		var out strings.Builder
		if err := Get(context.Background(), cfg.APIAddress, "lb", "wide", &out); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out.String(), "| 10.1.0.0/16,192.168.0.0/16 |") || !strings.Contains(out.String(), "| any ") {
			t.Errorf("get lb -o wide does not show the ranges:\n%s", out.String())
		}
	})
	waitFor(t, 10*time.Second, "open's VIP announced", func() bool {
		ips := ingressIPs(e.get(t, "open"))
		return len(ips) == 1 && announced(rec, ips[0])
	})
	open := e.get(t, "open")
	openFrontends := dp.frontends(e.ns + "/open")

	t.Run("changed ranges replace the old ones", func(t *testing.T) {
		e.update(t, "ranged", func(s *corev1.Service) { s.Spec.LoadBalancerSourceRanges = []string{"10.6.0.0/16"} })
		expect("ranged", "[10.6.0.0/16]", "10.6.0.0/16")
	})
	t.Run("removed ranges open the service and clear the record", func(t *testing.T) {
		e.update(t, "legacy", func(s *corev1.Service) { delete(s.Annotations, AnnotationLegacySourceRanges) })
		expect("legacy", "[]", "")
	})
	t.Run("unreadable ranges keep the last valid set", func(t *testing.T) {
		e.update(t, "ranged", func(s *corev1.Service) { s.Annotations[AnnotationLegacySourceRanges] = "banana" })
		e.update(t, "ranged", func(s *corev1.Service) { s.Spec.LoadBalancerSourceRanges = nil })
		msgs := e.waitTold(t, "ranged", ReasonInvalidSourceRanges)
		if !strings.Contains(msgs[0], "keeps its last valid ranges 10.6.0.0/16") {
			t.Errorf("warning %q does not say which ranges stay", msgs[0])
		}
		time.Sleep(500 * time.Millisecond) // the node's apply of the change, which must change nothing
		expect("ranged", "[10.6.0.0/16]", "10.6.0.0/16")
		if ips := ingressIPs(e.get(t, "ranged")); len(ips) != 1 || !announced(rec, ips[0]) {
			t.Errorf("ranged's VIP %v is no longer announced", ips)
		}
	})
	t.Run("a service never seen with valid ranges gets no VIP and is not served", func(t *testing.T) {
		msgs := e.waitTold(t, "never-valid", ReasonInvalidSourceRanges)
		if !strings.Contains(msgs[0], "not served") {
			t.Errorf("warning %q does not say the service is not served", msgs[0])
		}
		if ips := ingressIPs(e.get(t, "never-valid")); len(ips) != 0 {
			t.Errorf("never-valid got VIP %v", ips)
		}
		if dp.wasGiven(e.ns + "/never-valid") {
			t.Errorf("never-valid was given to the datapath")
		}
	})
	t.Run("a service served open whose ranges become unreadable keeps its VIP, unserved", func(t *testing.T) {
		msgs := e.waitTold(t, "was-open", ReasonInvalidSourceRanges)
		if !strings.Contains(msgs[0], "not served until they are fixed (it keeps 10.20.0.20, unannounced)") {
			t.Errorf("warning %q does not say the service keeps its VIP unserved", msgs[0])
		}
		if dp.wasGiven(e.ns+"/was-open") || announced(rec, "10.20.0.20") {
			t.Errorf("was-open was served or announced")
		}
		if ips := ingressIPs(e.get(t, "was-open")); !slices.Equal(ips, []string{"10.20.0.20"}) {
			t.Errorf("was-open's VIP moved: %v", ips)
		}
	})
	t.Run("fixed, the service is served with its ranges", func(t *testing.T) {
		e.update(t, "never-valid", func(s *corev1.Service) { s.Spec.LoadBalancerSourceRanges = []string{"10.7.0.0/16"} })
		expect("never-valid", "[10.7.0.0/16]", "10.7.0.0/16")
	})
	for _, name := range []string{"ranged", "legacy", "both", "open"} {
		if n, msgs := e.told(t, name, ReasonInvalidSourceRanges); name != "ranged" && n > 0 {
			t.Errorf("%s was warned: %v", name, msgs)
		}
	}
	if now := e.get(t, "open"); now.ResourceVersion != open.ResourceVersion {
		t.Errorf("open was written to while the others changed")
	}
	if now := dp.frontends(e.ns + "/open"); !slices.EqualFunc(now, openFrontends, func(a, b shard.Frontend) bool { return fmt.Sprint(a) == fmt.Sprint(b) }) {
		t.Errorf("open's frontends changed: %v -> %v", openFrontends, now)
	}
}

// sessionAffinity ClientIP selects endpoints by client address (persist) unless
// loxilb.io/epselect says otherwise; a timeout the datapath cannot apply is said once.
func TestSessionAffinityMapsToPersist(t *testing.T) {
	e := newEnv(t, "affinity")
	cfg := e.config(t, "node-a", "defaultPool=10.21.0.1-10.21.0.20", 1)
	rec, dp := &recorder{}, &datapathRecorder{}
	startPodOn(t, cfg, rec, dp)
	clientIP := func(timeout int32) svcOpt {
		return func(s *corev1.Service) {
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			if timeout > 0 {
				s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To(timeout)}}
			}
		}
	}
	for _, c := range []struct {
		name string
		opts []svcOpt
	}{
		{"sticky", []svcOpt{clientIP(0)}},
		{"sticky-timeout", []svcOpt{clientIP(600)}},
		{"sticky-rr", []svcOpt{clientIP(0), annotate(AnnotationEPSelect, "rr")}},
		{"plain", nil},
		{"sticky-bad", []svcOpt{clientIP(0), annotate(AnnotationEPSelect, "sideways")}},
	} {
		e.createSlice(t, c.name, "10.244.0.1")
		e.create(t, e.lbService(c.name, c.opts...))
	}
	selection := func(name string, want shard.Select) {
		t.Helper()
		waitFor(t, 10*time.Second, fmt.Sprintf("%s to select by %v", name, want), func() bool {
			fes := dp.frontends(e.ns + "/" + name)
			return len(fes) == 1 && fes[0].Select == want
		})
	}
	t.Run("ClientIP selects persist, epselect wins over it", func(t *testing.T) {
		selection("sticky", shard.SelectPersist)
		selection("sticky-timeout", shard.SelectPersist)
		selection("sticky-rr", shard.SelectRoundRobin)
		selection("plain", shard.SelectHash)
	})
	t.Run("a timeout other than the default and an overridden affinity are said once", func(t *testing.T) {
		msgs := e.waitTold(t, "sticky-timeout", ReasonSessionAffinityIgnored)
		if !strings.Contains(msgs[0], "timeoutSeconds 600 is not applied") {
			t.Errorf("message %q", msgs[0])
		}
		msgs = e.waitTold(t, "sticky-rr", ReasonSessionAffinityIgnored)
		if !strings.Contains(msgs[0], "loxilb.io/epselect rr wins") {
			t.Errorf("message %q", msgs[0])
		}
		for i := range 3 {
			e.update(t, "sticky-timeout", func(s *corev1.Service) { s.Labels = map[string]string{"round": fmt.Sprint(i)} })
		}
		time.Sleep(time.Second)
		if n, msgs := e.told(t, "sticky-timeout", ReasonSessionAffinityIgnored); n != 1 {
			t.Errorf("told %d times, want once: %v", n, msgs)
		}
		for _, name := range []string{"sticky", "plain"} {
			if n, msgs := e.told(t, name, ReasonSessionAffinityIgnored); n != 0 {
				t.Errorf("%s: told %v", name, msgs)
			}
		}
	})
	t.Run("an unreadable epselect is refused", func(t *testing.T) {
		e.waitTold(t, "sticky-bad", ReasonInvalidAnnotation)
		if ips := ingressIPs(e.get(t, "sticky-bad")); len(ips) != 0 {
			t.Errorf("sticky-bad got VIP %v", ips)
		}
	})
	sticky := e.get(t, "sticky")
	t.Run("affinity removed, the service selects by hash again", func(t *testing.T) {
		e.update(t, "sticky-timeout", func(s *corev1.Service) {
			s.Spec.SessionAffinity, s.Spec.SessionAffinityConfig = corev1.ServiceAffinityNone, nil
		})
		selection("sticky-timeout", shard.SelectHash)
	})
	if now := e.get(t, "sticky"); now.ResourceVersion != sticky.ResourceVersion {
		t.Errorf("sticky was written to while another service changed")
	}
}

// spec.loadBalancerIP asks for a static VIP as loxilb.io/staticIP does, which wins when
// both are set and differ.
func TestLoadBalancerIPIsAStaticIP(t *testing.T) {
	e := newEnv(t, "lbip")
	cfg := e.config(t, "node-a", "defaultPool=10.22.0.1-10.22.0.20", 1)
	startPodOn(t, cfg, &recorder{}, &datapathRecorder{})
	lbIP := func(ip string) svcOpt { return func(s *corev1.Service) { s.Spec.LoadBalancerIP = ip } }
	e.create(t, e.lbService("bystander"))
	waitFor(t, 10*time.Second, "bystander's VIP", func() bool { return len(ingressIPs(e.get(t, "bystander"))) > 0 })
	bystander := e.get(t, "bystander")

	vip := func(name, want string) {
		t.Helper()
		waitFor(t, 10*time.Second, name+"'s VIP "+want, func() bool {
			return slices.Equal(ingressIPs(e.get(t, name)), []string{want})
		})
	}
	e.create(t, e.lbService("asks", lbIP("10.22.0.7")))
	e.create(t, e.lbService("both", lbIP("10.22.0.10"), annotate(AnnotationStaticIP, "10.22.0.9")))
	e.create(t, e.lbService("same", lbIP("10.22.0.11"), annotate(AnnotationStaticIP, "10.22.0.11")))
	e.create(t, e.lbService("bad", lbIP("banana")))
	e.create(t, e.lbService("zeros", lbIP("010.22.0.12")))
	t.Run("set: the service gets the address", func(t *testing.T) { vip("asks", "10.22.0.7") })
	t.Run("changed: the VIP moves", func(t *testing.T) {
		e.update(t, "asks", func(s *corev1.Service) { s.Spec.LoadBalancerIP = "10.22.0.8" })
		vip("asks", "10.22.0.8")
	})
	t.Run("removed: the service keeps its VIP", func(t *testing.T) {
		e.update(t, "asks", func(s *corev1.Service) { s.Spec.LoadBalancerIP = "" })
		time.Sleep(500 * time.Millisecond)
		vip("asks", "10.22.0.8")
	})
	t.Run("staticIP wins over a different loadBalancerIP, with a warning", func(t *testing.T) {
		vip("both", "10.22.0.9")
		msgs := e.waitTold(t, "both", ReasonLoadBalancerIPIgnored)
		if !strings.Contains(msgs[0], "10.22.0.10 is ignored") {
			t.Errorf("message %q", msgs[0])
		}
		vip("same", "10.22.0.11")
		if n, msgs := e.told(t, "same", ReasonLoadBalancerIPIgnored); n != 0 {
			t.Errorf("same was warned: %v", msgs)
		}
	})
	for _, name := range []string{"bad", "zeros"} {
		t.Run("invalid "+name+": a warning and no VIP", func(t *testing.T) {
			e.waitTold(t, name, ReasonInvalidLoadBalancerIP)
			if ips := ingressIPs(e.get(t, name)); len(ips) != 0 {
				t.Errorf("%s got VIP %v", name, ips)
			}
		})
	}
	if now := e.get(t, "bystander"); now.ResourceVersion != bystander.ResourceVersion {
		t.Errorf("bystander was written to while others were refused")
	}
}

// What the datapath refuses of one service is that service's problem alone: a Warning
// on it from the node, its VIP not announced, and the rest of the Plan applied, with
// no retry.
func TestDatapathRefusalIsPerService(t *testing.T) {
	e := newEnv(t, "dprefusal")
	cfg := e.config(t, "node-a", "defaultPool=10.24.0.1-10.24.0.20", 1)
	cfg.MetricsAddress = freeAddr(t)
	rec, dp := &recorder{}, &datapathRecorder{}
	dp.refuse = func(fe shard.Frontend) error {
		if strings.HasSuffix(fe.Service, "/refused") {
			return errors.New("mode onearm needs the node's address of the VIP's family")
		}
		return nil
	}
	startPodOn(t, cfg, rec, dp)
	for _, name := range []string{"good", "refused"} {
		e.createSlice(t, name, "10.244.0.1")
		e.create(t, e.lbService(name, annotate(AnnotationLBMode, "onearm")))
	}
	waitFor(t, 10*time.Second, "both VIPs", func() bool {
		return len(ingressIPs(e.get(t, "good"))) == 1 && len(ingressIPs(e.get(t, "refused"))) == 1
	})
	goodVIP, refusedVIP := ingressIPs(e.get(t, "good"))[0], ingressIPs(e.get(t, "refused"))[0]

	t.Run("the refused service is warned by the node and not announced; the rest is applied", func(t *testing.T) {
		msgs := e.waitTold(t, "refused", ReasonDatapathRefused)
		if !strings.Contains(msgs[0], "node-a") || !strings.Contains(msgs[0], "onearm needs the node's address") {
			t.Errorf("message %q", msgs[0])
		}
		waitFor(t, 10*time.Second, "good announced", func() bool { return announced(rec, goodVIP) })
		if announced(rec, refusedVIP) {
			t.Errorf("refused's VIP %s is announced", refusedVIP)
		}
		if code := readyz(cfg.MetricsAddress); code != http.StatusOK {
			t.Errorf("/readyz %d", code)
		}
	})
	t.Run("a refusal is not retried until the service changes, nor told twice", func(t *testing.T) {
		calls := dp.callCount()
		time.Sleep(time.Second)
		if n := dp.callCount(); n != calls {
			t.Errorf("the datapath was called %d more times with nothing changed", n-calls)
		}
		e.update(t, "refused", func(s *corev1.Service) { s.Labels = map[string]string{"changed": "yes"} })
		e.update(t, "refused", func(s *corev1.Service) { s.Spec.Ports[0].Port = 57003 })
		waitFor(t, 10*time.Second, "the changed service to be given again", func() bool { return dp.callCount() > calls })
		time.Sleep(500 * time.Millisecond)
		if n, msgs := e.told(t, "refused", ReasonDatapathRefused); n != 2 {
			// The message names the frontend, whose port changed: told again, once.
			t.Errorf("told %d times, want 2: %v", n, msgs)
		}
	})
	t.Run("accepted after a change, the service is served and announced", func(t *testing.T) {
		dp.setRefuse(nil)
		e.update(t, "refused", func(s *corev1.Service) { s.Spec.Ports[0].Port = 57002 })
		waitFor(t, 10*time.Second, "refused announced", func() bool { return announced(rec, refusedVIP) })
	})
}

// A VIP not announced says why, once per change, from the controller alone however
// many nodes run.
func TestVIPAnnouncementIsTold(t *testing.T) {
	e := newEnv(t, "announce")
	cfg := e.config(t, "node-a", "defaultPool=10.25.0.1-10.25.0.20", 1)
	cfg.MetricsAddress = freeAddr(t)
	startPodOn(t, cfg, &recorder{}, &datapathRecorder{})
	waitFor(t, 30*time.Second, "node-a to lead", func() bool {
		return metricValue(t, cfg.MetricsAddress, "shardlb_controller_leader") == 1
	})
	startPodOn(t, e.config(t, "node-b", "defaultPool=10.25.0.1-10.25.0.20", 1), &recorder{}, &datapathRecorder{})

	e.createSlice(t, "ready-first", "10.244.0.1")
	waitFor(t, 10*time.Second, "the slice in node-a's cache", func() bool {
		return metricValue(t, cfg.MetricsAddress, `shardlb_reconcile_duration_seconds_count{loop="controller"}`) >= 1
	})
	e.create(t, e.lbService("ready-first"))
	e.create(t, e.lbService("waiting"))
	msgs := e.waitTold(t, "waiting", ReasonVIPWithdrawn)
	if !strings.Contains(msgs[0], "no ready endpoint") {
		t.Errorf("message %q", msgs[0])
	}
	e.createSlice(t, "waiting", "10.244.0.2")
	e.waitTold(t, "waiting", ReasonVIPAnnounced)
	notReady := e.slice("waiting", "10.244.0.2")
	notReady.Endpoints[0].Conditions.Ready = ptr.To(false)
	if _, err := e.client.DiscoveryV1().EndpointSlices(e.ns).Update(context.Background(), notReady, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "a second VIPWithdrawn", func() bool {
		n, _ := e.told(t, "waiting", ReasonVIPWithdrawn)
		return n >= 2
	})
	time.Sleep(time.Second)
	for reason, want := range map[string]int{ReasonVIPWithdrawn: 2, ReasonVIPAnnounced: 1} {
		if n, msgs := e.told(t, "waiting", reason); n != want {
			t.Errorf("%s told %d times, want %d (one per change, one writer): %v", reason, n, want, msgs)
		}
	}
	list, err := e.client.CoreV1().Events(e.ns).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=waiting"})
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range list.Items {
		if ev.Source.Component == "shardlb" && ev.Source.Host != "node-a" {
			t.Errorf("%s recorded by %s, not the controller's node-a", ev.Reason, ev.Source.Host)
		}
	}
	for _, reason := range []string{ReasonVIPWithdrawn, ReasonVIPAnnounced} {
		if n, msgs := e.told(t, "ready-first", reason); n != 0 {
			t.Errorf("ready-first, announced from the start, was told %s: %v", reason, msgs)
		}
	}
}

// Each loxilb.io/ annotation shardlb does not implement is named once per service.
func TestUnsupportedAnnotationsAreNamedOnce(t *testing.T) {
	e := newEnv(t, "unsupported")
	cfg := e.config(t, "node-a", "defaultPool=10.26.0.1-10.26.0.20", 1)
	startPodOn(t, cfg, &recorder{}, &datapathRecorder{})
	e.create(t, e.lbService("implemented", annotate(AnnotationLBMode, "fullnat"), annotate(AnnotationEPSelect, "rr"),
		annotate(AnnotationPoolSelect, "defaultPool"), annotate(AnnotationZoneInstance, "default"), annotate(AnnotationStaticIP, "10.26.0.5"),
		annotate(AnnotationLiveness, "yes"), annotate(AnnotationProbeType, "ping")))
	e.create(t, e.lbService("extras", annotate("loxilb.io/timeout", "30"), annotate("loxilb.io/usepodnetwork", "yes"),
		annotate("loxilb.io/staticip", "10.26.0.6")))
	waitFor(t, 10*time.Second, "three UnsupportedAnnotation events", func() bool {
		_, msgs := e.told(t, "extras", ReasonUnsupportedAnnotation)
		return len(msgs) == 3
	})
	for i := range 3 {
		e.update(t, "extras", func(s *corev1.Service) { s.Labels = map[string]string{"round": fmt.Sprint(i)} })
	}
	e.update(t, "extras", func(s *corev1.Service) { s.Annotations["loxilb.io/secondaryIPs"] = "10.26.0.7" })
	waitFor(t, 10*time.Second, "the added annotation named", func() bool {
		_, msgs := e.told(t, "extras", ReasonUnsupportedAnnotation)
		return len(msgs) == 4
	})
	time.Sleep(time.Second)
	n, msgs := e.told(t, "extras", ReasonUnsupportedAnnotation)
	slices.Sort(msgs)
	var keys []string
	for _, m := range msgs {
		k, _, _ := strings.Cut(m, " ")
		keys = append(keys, k)
	}
	if want := []string{"loxilb.io/secondaryIPs", "loxilb.io/staticip", "loxilb.io/timeout", "loxilb.io/usepodnetwork"}; n != 4 || !slices.Equal(keys, want) {
		t.Errorf("told %d times about %v, want once each about %v", n, keys, want)
	}
	if ips := ingressIPs(e.get(t, "extras")); len(ips) != 1 {
		t.Errorf("extras, whose unsupported annotations are ignored, has VIPs %v", ips)
	}
	waitFor(t, 10*time.Second, "implemented's VIP", func() bool {
		return slices.Equal(ingressIPs(e.get(t, "implemented")), []string{"10.26.0.5"})
	})
	if n, msgs := e.told(t, "implemented", ReasonUnsupportedAnnotation); n != 0 {
		t.Errorf("implemented annotations named unsupported: %v", msgs)
	}
}

func TestParseSourceRanges(t *testing.T) {
	for _, c := range []struct {
		name       string
		field      []string
		annotation string
		want       string // formatSourceRanges, or "error"
	}{
		{"nothing allows every client", nil, "", ""},
		{"a blank annotation allows every client", nil, "  ", ""},
		{"the field, trimmed, sorted, deduplicated", []string{" 192.168.0.0/16", "10.0.0.0/8 ", "10.0.0.0/8"}, "", "10.0.0.0/8,192.168.0.0/16"},
		{"host bits are masked", []string{"10.1.2.3/8", "10.0.0.0/8"}, "", "10.0.0.0/8"},
		{"the field wins over the annotation", []string{"10.0.0.0/8"}, "banana", "10.0.0.0/8"},
		{"the annotation when the field is empty", []string{}, "2001:db8::/32, 10.0.0.0/8", "10.0.0.0/8,2001:db8::/32"},
		{"a word", []string{"banana"}, "", "error"},
		{"an address without a length", []string{"10.0.0.1"}, "", "error"},
		{"an IPv4-mapped IPv6 prefix", []string{"::ffff:10.0.0.0/104"}, "", "error"},
		{"leading zeros", nil, "010.0.0.0/8", "error"},
		{"an empty entry", nil, "10.0.0.0/8,", "error"},
		{"a length too long", nil, "10.0.0.0/33", "error"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := parseSourceRanges(c.field, c.annotation)
			s := formatSourceRanges(got)
			if err != nil {
				s = "error"
				if got != nil {
					t.Errorf("ranges %v with the error %v", got, err)
				}
			}
			if s != c.want {
				t.Errorf("parseSourceRanges(%q, %q) = %q (%v), want %q", c.field, c.annotation, s, err, c.want)
			}
		})
	}
}

type refusalError struct{ service string }

func (e refusalError) Error() string          { return "refused for a reason of its own" }
func (e refusalError) RefusedService() string { return e.service }

func TestRefusedServicesAreReadFromTheDatapathsError(t *testing.T) {
	fes := []shard.Frontend{{Service: "ns/a"}, {Service: "ns/b"}}
	named := func(svc string) error {
		return fmt.Errorf("frontend 10.0.0.1:80/TCP of %s: mode dsr is not implemented by the datapath", svc)
	}
	for _, c := range []struct {
		name string
		err  error
		want []string // nil: the apply failed as a whole
	}{
		{"one named by the datapath's wording", errors.Join(named("ns/a")), []string{"ns/a"}},
		{"two, one by a RefusedService method", errors.Join(named("ns/a"), refusalError{"ns/b"}), []string{"ns/a", "ns/b"}},
		{"nested joins", errors.Join(errors.Join(named("ns/b")), named("ns/b")), []string{"ns/b"}},
		{"a service not given", errors.Join(named("ns/c")), nil},
		{"one error naming nothing", errors.Join(named("ns/a"), errors.New("remove frontend 10.0.0.1:80/TCP: map full")), nil},
		{"a closed datapath", errors.New("set services: datapath is closed"), nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := refusedServices(c.err, fes)
			var keys []string
			for k := range got {
				keys = append(keys, k)
			}
			slices.Sort(keys)
			if !slices.Equal(keys, c.want) || (c.want == nil) != (got == nil) {
				t.Errorf("refused %v, want %v", got, c.want)
			}
		})
	}
}

func TestTransformReadsTheSpecFieldsUsed(t *testing.T) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "a", Namespace: "ns", Annotations: map[string]string{AnnotationLegacySourceRanges: "10.9.0.0/16"}},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, LoadBalancerIP: "10.1.2.3",
			LoadBalancerSourceRanges: []string{"10.1.0.0/16", "10.0.0.7/8"},
			SessionAffinity:          corev1.ServiceAffinityClientIP,
			SessionAffinityConfig:    &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](60)}}},
	}
	o, _ := toService(svc)
	s := o.(*service)
	if got := formatSourceRanges(s.SourceRanges); got != "10.0.0.0/8,10.1.0.0/16" || s.SourceRangesErr != nil {
		t.Errorf("ranges %s (%v)", got, s.SourceRangesErr)
	}
	if !s.AffinityClientIP || s.AffinityTimeout != 60 || s.LoadBalancerIP != "10.1.2.3" {
		t.Errorf("affinity %v/%d, loadBalancerIP %q", s.AffinityClientIP, s.AffinityTimeout, s.LoadBalancerIP)
	}
	if len(s.Annotations) != 0 {
		t.Errorf("kept the legacy annotation: %v", s.Annotations)
	}
	c := s.DeepCopyObject().(*service)
	c.SourceRanges[0] = netip.MustParsePrefix("203.0.113.0/24")
	if s.SourceRanges[0] == c.SourceRanges[0] {
		t.Errorf("DeepCopyObject shares the source ranges")
	}
}
