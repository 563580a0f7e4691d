package kube

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

func TestRenderTableLooksLikeLoxicmd(t *testing.T) {
	var b bytes.Buffer
	if err := renderTable(&b, []string{"INSTANCE", "HASTATE"}, [][]string{{"default", "BACKUP"}, {"llb-inst1", "MASTER"}}); err != nil {
		t.Fatal(err)
	}
	want := "| INSTANCE  | HASTATE |\n|-----------|---------|\n| default   | BACKUP  |\n| llb-inst1 | MASTER  |\n"
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}

func TestGetRefusesUnknownSubjectsAndFormats(t *testing.T) {
	for _, c := range []struct{ what, output string }{{"routes", "table"}, {"ha", "xml"}, {"ha", "JSON"}} {
		if err := Get(context.Background(), "127.0.0.1:1", c.what, c.output, &bytes.Buffer{}); !errors.Is(err, ErrUsage) {
			t.Errorf("Get(%q, %q) = %v, want ErrUsage", c.what, c.output, err)
		}
	}
}

func TestTransformsKeepOnlyWhatIsRead(t *testing.T) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "a", Namespace: "ns", Annotations: map[string]string{
			AnnotationLBMode: "onearm", "kubectl.kubernetes.io/last-applied-configuration": "{...}",
		}, ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "x"}}},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, LoadBalancerClass: ptr.To(DefaultClass),
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}}},
		Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: []corev1.LoadBalancerIngress{{IP: "192.168.80.250"}, {Hostname: "llb-x"}}}},
	}
	o, _ := toService(svc)
	s := o.(*service)
	if !s.ours(DefaultClass) || s.ours("other") || s.key() != "ns/a" {
		t.Errorf("class or key wrong: %+v", s)
	}
	if len(s.Annotations) != 1 || s.ManagedFields != nil {
		t.Errorf("kept foreign annotations or managed fields: %v", s.Annotations)
	}
	if len(s.Ingress) != 1 || s.Ingress[0] != netip.MustParseAddr("192.168.80.250") {
		t.Errorf("ingress %v, want the one IP", s.Ingress)
	}

	es := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "a-1", Namespace: "ns", Labels: map[string]string{discoveryv1.LabelServiceName: "a"}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.0.0.1"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}},
			{Addresses: []string{"10.0.0.2"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(false)}},
			{Addresses: []string{"10.0.0.3"}}, // unknown readiness counts as ready
		},
		Ports: []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080)}},
	}
	o, _ = toEndpointSlice(es)
	sl := o.(*endpointSlice)
	if sl.Service != "ns/a" || len(sl.Ready) != 2 || sl.Ready[1] != netip.MustParseAddr("10.0.0.3") || sl.Ports[0].Port != 8080 {
		t.Errorf("slice slimmed wrong: %+v", sl)
	}
}

func TestCheckGetNamesSubjectsAndOutputs(t *testing.T) {
	for _, c := range []struct{ what, output, want string }{
		{"ha", "table", "ha"}, {"lb", "wide", "lb"}, {"ip", "json", "ip"}, {"bgp", "yaml", "bgp"},
		{"svc", "table", "services"}, {"service", "json", "services"}, {"services", "wide", "services"},
	} {
		if got, err := CheckGet(c.what, c.output); err != nil || got != c.want {
			t.Errorf("CheckGet(%q, %q) = %q, %v; want %q", c.what, c.output, got, err, c.want)
		}
	}
	for _, c := range []struct{ what, output string }{{"lbs", "table"}, {"", "table"}, {"ha", ""}, {"ha", "yml"}} {
		if _, err := CheckGet(c.what, c.output); !errors.Is(err, ErrUsage) || strings.Contains(err.Error(), "\n") {
			t.Errorf("CheckGet(%q, %q) = %v, want one line wrapping ErrUsage", c.what, c.output, err)
		}
	}
}

func TestGetWritesYAML(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte(`[{"instance":"default","hastate":"MASTER","master":"node1"}]`))
	}))
	defer srv.Close()
	var b bytes.Buffer
	if err := Get(context.Background(), strings.TrimPrefix(srv.URL, "http://"), "ha", "yaml", &b); err != nil {
		t.Fatal(err)
	}
	if want := "- hastate: MASTER\n  instance: default\n  master: node1\n"; b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}
