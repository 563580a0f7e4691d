package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/utils/ptr"

	"github.com/shardlb/shardlb/api/v1alpha1"
	"github.com/shardlb/shardlb/config"
)

// poolEnv is a controller (one pod) and a configuration watcher (which writes the
// Accepted conditions, as every pod does) over one test's namespace.
type poolEnv struct {
	*crdEnv
	cfg   Config
	pod   *pod
	owner *testing.T // the test that started the pod, which stops it at its end
}

// newPoolEnv starts the pod with flagPools (--cidrPools syntax, "" for none).
func newPoolEnv(t *testing.T, name, flagPools string) *poolEnv {
	c := newCRDEnv(t, name)
	node := c.ns + "-node"
	cfg := c.config(t, node, flagPools, 1)
	c.watch(t, node, nil, config.Flags{Pools: cfg.Pools})
	return &poolEnv{crdEnv: c, cfg: cfg, pod: startPod(t, cfg), owner: t}
}

// restart stops the pod (its controller) and starts another with the same
// configuration, which runs until the end of the test that started the first.
func (p *poolEnv) restart(t *testing.T) {
	t.Helper()
	p.pod.stop(t)
	p.pod = startPod(p.owner, p.cfg)
}

func ipPool(name string, addrs ...string) *v1alpha1.IPPool {
	return &v1alpha1.IPPool{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1alpha1.IPPoolSpec{Addresses: addrs}}
}

// pool names are cluster-wide: each test's carry its namespace.
func (p *poolEnv) name(s string) string { return p.ns + "-" + s }

func (p *poolEnv) getPool(t testing.TB, name string) *v1alpha1.IPPool {
	t.Helper()
	u, err := p.dyn.Resource(v1alpha1.IPPools).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get IPPool %s: %v", name, err)
	}
	var out v1alpha1.IPPool
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &out); err != nil {
		t.Fatal(err)
	}
	return &out
}

// updatePool changes a pool's spec, again on a conflict with a status write.
func (p *poolEnv) updatePool(t testing.TB, name string, change func(*v1alpha1.IPPoolSpec)) {
	t.Helper()
	for range 20 {
		cur := p.getPool(t, name)
		change(&cur.Spec)
		_, err := p.dyn.Resource(v1alpha1.IPPools).Update(context.Background(), toUnstructured(t, "IPPool", cur), metav1.UpdateOptions{})
		if err == nil {
			return
		}
		if !apierrors.IsConflict(err) {
			t.Fatalf("update IPPool %s: %v", name, err)
		}
	}
	t.Fatalf("update IPPool %s: conflicts every time", name)
}

func (p *poolEnv) condition(t testing.TB, name, typ string) *metav1.Condition {
	t.Helper()
	return meta.FindStatusCondition(p.getPool(t, name).Status.Conditions, typ)
}

// vip is the service's VIPs, comma-joined ("" while it has none).
func (p *poolEnv) vip(t testing.TB, ns, name string) string {
	t.Helper()
	s, err := p.client.CoreV1().Services(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get service %s/%s: %v", ns, name, err)
	}
	return strings.Join(ingressIPs(s), ",")
}

// svc creates a service of the env's class in namespace ns.
func (p *poolEnv) svc(t testing.TB, ns, name string, opts ...svcOpt) {
	t.Helper()
	s := p.lbService(name, opts...)
	s.Namespace = ns
	if _, err := p.client.CoreV1().Services(ns).Create(context.Background(), s, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create service %s/%s: %v", ns, name, err)
	}
}

func (p *poolEnv) deleteSvc(t testing.TB, ns, name string) {
	t.Helper()
	if err := p.client.CoreV1().Services(ns).Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete service %s/%s: %v", ns, name, err)
	}
}

// svcEvents lists shardlb's Events on a service as "Type Reason: message".
func (p *poolEnv) svcEvents(t testing.TB, ns, name string) []string {
	t.Helper()
	list, err := p.client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, ev := range list.Items {
		if ev.Source.Component == "shardlb" {
			out = append(out, ev.Type+" "+ev.Reason+": "+ev.Message)
		}
	}
	return out
}

func hasEvent(events []string, prefix string) bool {
	return slices.ContainsFunc(events, func(e string) bool { return strings.HasPrefix(e, prefix) })
}

func (p *poolEnv) namespace(t testing.TB, name string, labels map[string]string) string {
	t.Helper()
	_, err := p.client.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("namespace %s: %v", name, err)
	}
	return name
}

// waitVIP waits until the service holds want.
func (p *poolEnv) waitVIP(t testing.TB, ns, name, want string) {
	t.Helper()
	waitFor(t, 15*time.Second, fmt.Sprintf("%s/%s to hold %s", ns, name, want), func() bool { return p.vip(t, ns, name) == want })
}

// stillNoVIP checks that a service waiting for a VIP has none after the controller had
// the time to decide it (an Event says it was decided).
func (p *poolEnv) stillNoVIP(t testing.TB, ns, name, reason string) {
	t.Helper()
	waitFor(t, 15*time.Second, fmt.Sprintf("%s/%s refused with %s", ns, name, reason), func() bool {
		return hasEvent(p.svcEvents(t, ns, name), "Warning "+reason)
	})
	if got := p.vip(t, ns, name); got != "" {
		t.Fatalf("%s/%s holds %s, want no VIP", ns, name, got)
	}
}

// TestIPPoolLive: a pool created, grown, shrunk and deleted under a running controller.
func TestIPPoolLive(t *testing.T) {
	p := newPoolEnv(t, "pool-live", "")
	ns, pool := p.ns, p.name("live")

	t.Run("a service waits while no pool exists", func(t *testing.T) {
		p.svc(t, ns, "a-first")
		p.stillNoVIP(t, ns, "a-first", ReasonAllocationFailed)
	})
	t.Run("a pool added live serves the waiting service and is accepted", func(t *testing.T) {
		p.mustCreate(t, "IPPool", ipPool(pool, "10.90.0.1-10.90.0.1"))
		p.waitVIP(t, ns, "a-first", "10.90.0.1")
		waitFor(t, 10*time.Second, "the pool accepted", func() bool {
			cond := p.condition(t, pool, v1alpha1.ConditionAccepted)
			return cond != nil && cond.Status == metav1.ConditionTrue
		})
	})
	t.Run("a grown pool serves the next waiting service, oldest first", func(t *testing.T) {
		p.svc(t, ns, "b-second")
		p.stillNoVIP(t, ns, "b-second", ReasonPoolExhausted)
		p.svc(t, ns, "c-third")
		p.stillNoVIP(t, ns, "c-third", ReasonPoolExhausted)
		p.updatePool(t, pool, func(s *v1alpha1.IPPoolSpec) { s.Addresses = []string{"10.90.0.1-10.90.0.2"} })
		p.waitVIP(t, ns, "b-second", "10.90.0.2")
		if got := p.vip(t, ns, "c-third"); got != "" {
			t.Fatalf("c-third got %s: the one new address is the older b-second's", got)
		}
	})
	t.Run("the status counts what the pool holds, and kubectl get shows it", func(t *testing.T) {
		waitFor(t, 10*time.Second, "assigned 2, available 0", func() bool {
			st := p.getPool(t, pool).Status
			return st.AssignedIPv4 == 2 && st.AvailableIPv4 == 0 && st.Services == 2 && st.AssignedIPv6 == 0
		})
		cols := p.printed(t, pool)
		for col, want := range map[string]string{"Assigned IPv4": "2", "Available IPv4": "0", "Accepted": "True", "Auto": "true"} {
			if cols[col] != want {
				t.Errorf("kubectl get column %q = %q, want %q (all: %v)", col, cols[col], want, cols)
			}
		}
	})
	t.Run("a pool shrunk under a VIP keeps it, with Warnings and a condition, and never hands it out twice", func(t *testing.T) {
		// .1 (a-first's) leaves the pool, .3 joins it: c-third, waiting, gets .3.
		p.updatePool(t, pool, func(s *v1alpha1.IPPoolSpec) { s.Addresses = []string{"10.90.0.2-10.90.0.3"} })
		p.waitVIP(t, ns, "c-third", "10.90.0.3")
		waitFor(t, 10*time.Second, "a Warning on a-first", func() bool {
			return hasEvent(p.svcEvents(t, ns, "a-first"), "Warning "+ReasonVIPOutsidePool)
		})
		waitFor(t, 10*time.Second, "a Warning on the pool", func() bool {
			return slices.ContainsFunc(p.warnings(t, "IPPool", pool), func(w string) bool { return strings.HasPrefix(w, ReasonVIPOutsidePool) })
		})
		waitFor(t, 10*time.Second, "VIPsOutside naming a-first", func() bool {
			cond := p.condition(t, pool, v1alpha1.ConditionVIPsOutside)
			return cond != nil && cond.Status == metav1.ConditionTrue && strings.Contains(cond.Message, ns+"/a-first (10.90.0.1)")
		})
		if got := p.vip(t, ns, "a-first"); got != "10.90.0.1" {
			t.Fatalf("a-first holds %q, want its 10.90.0.1 kept", got)
		}
		p.svc(t, ns, "d-fourth")
		p.stillNoVIP(t, ns, "d-fourth", ReasonPoolExhausted)
		// Released, .1 is outside every pool: nobody gets it.
		p.deleteSvc(t, ns, "a-first")
		waitFor(t, 10*time.Second, "VIPsOutside cleared", func() bool {
			cond := p.condition(t, pool, v1alpha1.ConditionVIPsOutside)
			return cond != nil && cond.Status == metav1.ConditionFalse
		})
		if got := p.vip(t, ns, "d-fourth"); got != "" {
			t.Fatalf("d-fourth got %s, outside the pool", got)
		}
	})
	t.Run("a pool deleted under VIPs keeps them, with Warnings", func(t *testing.T) {
		p.delete(t, "IPPool", pool)
		for _, svc := range []string{"b-second", "c-third"} {
			waitFor(t, 10*time.Second, "a Warning on "+svc, func() bool {
				return hasEvent(p.svcEvents(t, ns, svc), "Warning "+ReasonVIPOutsidePool)
			})
		}
		if b, c := p.vip(t, ns, "b-second"), p.vip(t, ns, "c-third"); b != "10.90.0.2" || c != "10.90.0.3" {
			t.Fatalf("b-second %s, c-third %s: want 10.90.0.2 and 10.90.0.3 kept", b, c)
		}
	})
	t.Run("after a controller restart, the VIPs kept outside every pool are told again", func(t *testing.T) {
		p.restart(t)
		for _, svc := range []string{"b-second", "c-third"} {
			waitFor(t, 30*time.Second, "a Warning on "+svc+" from the new term", func() bool {
				return slices.ContainsFunc(p.svcEvents(t, ns, svc), func(e string) bool {
					return strings.HasPrefix(e, "Warning "+ReasonVIPOutsidePool) && strings.Contains(e, "is in no pool")
				})
			})
		}
		if b, c := p.vip(t, ns, "b-second"), p.vip(t, ns, "c-third"); b != "10.90.0.2" || c != "10.90.0.3" {
			t.Fatalf("b-second %s, c-third %s: want 10.90.0.2 and 10.90.0.3 kept across the restart", b, c)
		}
		p.stillNoVIP(t, ns, "d-fourth", ReasonPoolExhausted)
	})
	t.Run("a pool back over kept VIPs serves the waiting service a free address only", func(t *testing.T) {
		p.mustCreate(t, "IPPool", ipPool(p.name("back"), "10.90.0.2-10.90.0.4"))
		p.waitVIP(t, ns, "d-fourth", "10.90.0.4")
		waitFor(t, 10*time.Second, "the kept VIPs counted in the pool", func() bool {
			st := p.getPool(t, p.name("back")).Status
			return st.AssignedIPv4 == 3 && st.AvailableIPv4 == 0
		})
	})
}

// printed reads the pool as kubectl get does (a server-side Table) and returns its
// columns by name.
func (p *poolEnv) printed(t testing.TB, name string) map[string]string {
	t.Helper()
	raw, err := p.client.CoreV1().RESTClient().Get().AbsPath("/apis/shardlb.io/v1alpha1/ippools/"+name).
		SetHeader("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io").Do(context.Background()).Raw()
	if err != nil {
		t.Fatalf("get table: %v", err)
	}
	var table metav1.Table
	if err := json.Unmarshal(raw, &table); err != nil {
		t.Fatal(err)
	}
	if len(table.Rows) != 1 {
		t.Fatalf("table has %d rows", len(table.Rows))
	}
	out := map[string]string{}
	for i, col := range table.ColumnDefinitions {
		if i < len(table.Rows[0].Cells) {
			out[col.Name] = fmt.Sprint(table.Rows[0].Cells[i])
		}
	}
	return out
}

// TestIPPoolAutoAssign: a pool with autoAssign false serves only the services that
// name it or one of its addresses.
func TestIPPoolAutoAssign(t *testing.T) {
	p := newPoolEnv(t, "pool-auto", "")
	ns, manual, auto := p.ns, p.name("manual"), p.name("auto")
	m := ipPool(manual, "10.91.0.1-10.91.0.4")
	m.Spec.AutoAssign = ptr.To(false)
	p.mustCreate(t, "IPPool", m)

	t.Run("a service that names no pool does not get its addresses", func(t *testing.T) {
		p.svc(t, ns, "plain")
		p.stillNoVIP(t, ns, "plain", ReasonAllocationFailed)
	})
	t.Run("a service that names it gets one", func(t *testing.T) {
		p.svc(t, ns, "named", annotate(AnnotationPoolSelect, manual))
		p.waitVIP(t, ns, "named", "10.91.0.1")
	})
	t.Run("a service that asks for one of its addresses gets it", func(t *testing.T) {
		p.svc(t, ns, "static", annotate(AnnotationStaticIP, "10.91.0.3"))
		p.waitVIP(t, ns, "static", "10.91.0.3")
	})
	t.Run("the waiting service gets an auto-assigning pool's address when one comes", func(t *testing.T) {
		p.mustCreate(t, "IPPool", ipPool(auto, "10.91.1.1-10.91.1.4"))
		p.waitVIP(t, ns, "plain", "10.91.1.1")
	})
	t.Run("a service that names a pool keeps its VIP when the pool lets it go", func(t *testing.T) {
		p.updatePool(t, manual, func(s *v1alpha1.IPPoolSpec) { s.Addresses = []string{"10.91.0.2-10.91.0.4"} })
		waitFor(t, 10*time.Second, "a Warning on named", func() bool {
			return hasEvent(p.svcEvents(t, ns, "named"), "Warning "+ReasonVIPOutsidePool)
		})
		// Its next decision (any change of the service) keeps it too.
		s, err := p.client.CoreV1().Services(ns).Get(context.Background(), "named", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.Labels = map[string]string{"touched": "yes"}
		if _, err := p.client.CoreV1().Services(ns).Update(context.Background(), s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		p.svc(t, ns, "named-later", annotate(AnnotationPoolSelect, manual))
		p.waitVIP(t, ns, "named-later", "10.91.0.2")
		if got := p.vip(t, ns, "named"); got != "10.91.0.1" {
			t.Fatalf("named holds %q, want its 10.91.0.1 kept", got)
		}
	})
	t.Run("it keeps it when another pool takes the address in", func(t *testing.T) {
		other := p.name("other")
		o := ipPool(other, "10.91.0.1-10.91.0.1")
		o.Spec.AutoAssign = ptr.To(false)
		p.mustCreate(t, "IPPool", o)
		waitFor(t, 10*time.Second, "the kept VIP counted in the other pool", func() bool {
			return p.getPool(t, other).Status.AssignedIPv4 == 1
		})
		s, err := p.client.CoreV1().Services(ns).Get(context.Background(), "named", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.Labels = map[string]string{"touched": "twice"}
		if _, err := p.client.CoreV1().Services(ns).Update(context.Background(), s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		p.svc(t, ns, "named-last", annotate(AnnotationPoolSelect, manual))
		p.waitVIP(t, ns, "named-last", "10.91.0.4")
		if got := p.vip(t, ns, "named"); got != "10.91.0.1" {
			t.Fatalf("named holds %q, want its 10.91.0.1 kept", got)
		}
		if ev := p.svcEvents(t, ns, "named"); hasEvent(ev, "Warning "+ReasonInvalidAnnotation) || hasEvent(ev, "Normal "+ReasonIPReleased) {
			t.Fatalf("named's events %q: its VIP must not be released", ev)
		}
	})
}

// TestIPPoolServiceAllocation: namespaces, namespace and service selectors, and
// priority decide which pool serves a service.
func TestIPPoolServiceAllocation(t *testing.T) {
	p := newPoolEnv(t, "pool-alloc", "")
	nsA := p.ns
	nsB := p.namespace(t, p.ns+"-b", nil)
	nsBlue := p.namespace(t, p.ns+"-blue", map[string]string{"team": "blue"})

	general := ipPool(p.name("general"), "10.92.1.1-10.92.1.9")
	tenant := ipPool(p.name("tenant"), "10.92.2.1-10.92.2.9")
	tenant.Spec.ServiceAllocation = &v1alpha1.ServiceAllocation{Namespaces: []string{nsA}}
	// Names that sort after the pools they must win over: priority decides, not the name.
	gold := ipPool(p.name("x-gold"), "10.92.3.1-10.92.3.9")
	gold.Spec.ServiceAllocation = &v1alpha1.ServiceAllocation{Priority: 5,
		ServiceSelectors: []metav1.LabelSelector{{MatchLabels: map[string]string{"tier": "gold"}}}}
	blue := ipPool(p.name("blue"), "10.92.4.1-10.92.4.9")
	blue.Spec.ServiceAllocation = &v1alpha1.ServiceAllocation{
		NamespaceSelectors: []metav1.LabelSelector{{MatchLabels: map[string]string{"team": "blue"}}}}
	for _, pool := range []*v1alpha1.IPPool{general, tenant, gold, blue} {
		p.mustCreate(t, "IPPool", pool)
	}
	for _, pool := range []*v1alpha1.IPPool{general, tenant, gold, blue} {
		waitFor(t, 10*time.Second, pool.Name+" accepted", func() bool {
			cond := p.condition(t, pool.Name, v1alpha1.ConditionAccepted)
			return cond != nil && cond.Status == metav1.ConditionTrue
		})
	}
	gold3 := func(s *corev1.Service) { s.Labels = map[string]string{"tier": "gold"} }

	for _, tc := range []struct {
		desc, ns, name string
		opts           []svcOpt
		want           string
	}{
		{"a service of a listed namespace takes the pool reserved to it before the general one", nsA, "in-a", nil, "10.92.2.1"},
		{"a service of another namespace takes the general pool", nsB, "in-b", nil, "10.92.1.1"},
		{"a service whose labels a selector matches takes that pool, first by priority", nsA, "golden", []svcOpt{gold3}, "10.92.3.1"},
		{"a service of a namespace a selector matches takes that pool", nsBlue, "in-blue", nil, "10.92.4.1"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			p.svc(t, tc.ns, tc.name, tc.opts...)
			p.waitVIP(t, tc.ns, tc.name, tc.want)
		})
	}
	t.Run("a service naming a pool that does not admit it is refused", func(t *testing.T) {
		p.svc(t, nsB, "intruder", annotate(AnnotationPoolSelect, tenant.Name))
		p.stillNoVIP(t, nsB, "intruder", ReasonPoolNotAllowed)
		p.svc(t, nsB, "static-intruder", annotate(AnnotationStaticIP, "10.92.2.7"))
		p.stillNoVIP(t, nsB, "static-intruder", ReasonPoolNotAllowed)
	})
	t.Run("a pool of a better priority is taken first, then the next one", func(t *testing.T) {
		fast := ipPool(p.name("zz-fast"), "10.92.5.1-10.92.5.1")
		fast.Spec.ServiceAllocation = &v1alpha1.ServiceAllocation{Priority: 1}
		p.mustCreate(t, "IPPool", fast)
		waitFor(t, 10*time.Second, "fast accepted", func() bool {
			cond := p.condition(t, fast.Name, v1alpha1.ConditionAccepted)
			return cond != nil && cond.Status == metav1.ConditionTrue
		})
		p.svc(t, nsB, "quick")
		p.waitVIP(t, nsB, "quick", "10.92.5.1")
		// fast is full; gold (priority 5) does not admit an unlabelled service.
		p.svc(t, nsB, "after")
		p.waitVIP(t, nsB, "after", "10.92.1.2")
	})
	t.Run("a serviceAllocation changed serves the services it now admits, and moves no VIP held", func(t *testing.T) {
		p.updatePool(t, tenant.Name, func(s *v1alpha1.IPPoolSpec) { s.ServiceAllocation.Namespaces = []string{nsB} })
		// The services refused before are admitted now, and served.
		p.waitVIP(t, nsB, "intruder", "10.92.2.2")
		p.waitVIP(t, nsB, "static-intruder", "10.92.2.7")
		s, err := p.client.CoreV1().Services(nsA).Get(context.Background(), "in-a", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.Annotations = map[string]string{AnnotationPoolSelect: tenant.Name}
		if _, err := p.client.CoreV1().Services(nsA).Update(context.Background(), s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		p.svc(t, nsA, "in-a-later")
		p.waitVIP(t, nsA, "in-a-later", "10.92.1.3")
		if got := p.vip(t, nsA, "in-a"); got != "10.92.2.1" {
			t.Fatalf("in-a holds %q, want its 10.92.2.1 kept", got)
		}
		if ev := p.svcEvents(t, nsA, "in-a"); hasEvent(ev, "Warning "+ReasonPoolNotAllowed) {
			t.Fatalf("in-a's events %q: a VIP held is not refused", ev)
		}
	})
	t.Run("a label added to a waiting service lets the pool that selects it serve it", func(t *testing.T) {
		only := ipPool(p.name("only-red"), "10.92.6.1-10.92.6.1")
		only.Spec.AutoAssign = ptr.To(true)
		only.Spec.ServiceAllocation = &v1alpha1.ServiceAllocation{ServiceSelectors: []metav1.LabelSelector{{MatchLabels: map[string]string{"color": "red"}}}}
		p.mustCreate(t, "IPPool", only)
		p.svc(t, nsB, "wants-red", annotate(AnnotationPoolSelect, only.Name))
		p.stillNoVIP(t, nsB, "wants-red", ReasonPoolNotAllowed)
		s, err := p.client.CoreV1().Services(nsB).Get(context.Background(), "wants-red", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.Labels = map[string]string{"color": "red"}
		if _, err := p.client.CoreV1().Services(nsB).Update(context.Background(), s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		p.waitVIP(t, nsB, "wants-red", "10.92.6.1")
	})
}

// TestIPPoolRefused: objects that overlap a flag pool or another object, or hold an
// invalid range, are refused with a condition and an Event, and change nothing else.
func TestIPPoolRefused(t *testing.T) {
	p := newPoolEnv(t, "pool-refused", "pool-refused-flag=10.93.0.1-10.93.0.4")
	ns := p.ns
	p.svc(t, ns, "before")
	p.waitVIP(t, ns, "before", "10.93.0.1")
	good := p.name("good")
	p.mustCreate(t, "IPPool", ipPool(good, "10.93.1.0/30"))
	named := ipPool(p.name("named"), "10.93.1.2-10.93.1.2")
	named.Spec.AutoAssign = ptr.To(false)
	p.mustCreate(t, "IPPool", named)
	// named overlaps good, which wins (first by name): no second pool holds .2.
	p.svc(t, ns, "good-user", annotate(AnnotationPoolSelect, good))
	p.waitVIP(t, ns, "good-user", "10.93.1.1")

	for _, tc := range []struct {
		desc   string
		pool   *v1alpha1.IPPool
		reason string
		say    string
	}{
		{"a pool overlapping a flag pool", ipPool(p.name("over-flag"), "10.93.0.3-10.93.0.9"), v1alpha1.ReasonConflict, "--cidrPools"},
		{"a pool overlapping another object", ipPool(p.name("zz-over-good"), "10.93.1.1-10.93.1.1"), v1alpha1.ReasonConflict, "IPPool " + good},
		{"a pool named as a flag pool", ipPool("pool-refused-flag", "10.93.5.1-10.93.5.1"), v1alpha1.ReasonConflict, "--cidrPools"},
		{"a range that ends before it starts", ipPool(p.name("backwards"), "10.93.2.9-10.93.2.1"), v1alpha1.ReasonInvalid, "ends before it starts"},
		{"a CIDR written at its broadcast address", ipPool(p.name("broadcast"), "10.93.3.255/24"), v1alpha1.ReasonInvalid, "no usable address"},
	} {
		t.Run(tc.desc+" is refused", func(t *testing.T) {
			p.mustCreate(t, "IPPool", tc.pool)
			waitFor(t, 10*time.Second, "the refusal", func() bool {
				cond := p.condition(t, tc.pool.Name, v1alpha1.ConditionAccepted)
				return cond != nil && cond.Status == metav1.ConditionFalse && cond.Reason == tc.reason && strings.Contains(cond.Message, tc.say)
			})
			waitFor(t, 10*time.Second, "a Warning Event", func() bool {
				return slices.ContainsFunc(p.warnings(t, "IPPool", tc.pool.Name), func(w string) bool { return strings.HasPrefix(w, tc.reason) })
			})
		})
	}
	if cond := p.condition(t, named.Name, v1alpha1.ConditionAccepted); cond == nil || cond.Reason != v1alpha1.ReasonConflict {
		t.Errorf("named's Accepted = %+v, want a Conflict with %s", cond, good)
	}
	t.Run("the refused pools serve nobody and the others are untouched", func(t *testing.T) {
		p.svc(t, ns, "wants-over-flag", annotate(AnnotationPoolSelect, p.name("over-flag")))
		p.stillNoVIP(t, ns, "wants-over-flag", ReasonInvalidAnnotation)
		p.svc(t, ns, "after")
		p.waitVIP(t, ns, "after", "10.93.0.2")
		p.svc(t, ns, "good-next", annotate(AnnotationPoolSelect, good))
		p.waitVIP(t, ns, "good-next", "10.93.1.2")
		if got := p.vip(t, ns, "before"); got != "10.93.0.1" {
			t.Errorf("before holds %s, want 10.93.0.1", got)
		}
		if got := p.vip(t, ns, "good-user"); got != "10.93.1.1" {
			t.Errorf("good-user holds %s, want 10.93.1.1", got)
		}
		if st := p.getPool(t, p.name("over-flag")).Status; st.AssignedIPv4 != 0 || st.AvailableIPv4 != 0 {
			t.Errorf("a refused pool counts %+v, want nothing", st)
		}
		waitFor(t, 10*time.Second, "good's counts", func() bool {
			st := p.getPool(t, good).Status
			return st.AssignedIPv4 == 2 && st.AvailableIPv4 == 0
		})
	})
}
