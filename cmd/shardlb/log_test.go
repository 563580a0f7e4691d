package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"k8s.io/klog/v2"
)

func TestParseLogFormat(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want logFormat
		ok   bool
	}{
		{"text", logText, true},
		{"json", logJSON, true},
		{" JSON ", logJSON, true},
		{"", "", false},
		{"logfmt", "", false},
	} {
		got, err := parseLogFormat(tc.in)
		if got != tc.want || (err == nil) != tc.ok {
			t.Errorf("parseLogFormat(%q) = %q, %v; want %q, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

// logLines splits what a logger wrote into lines.
func logLines(b *bytes.Buffer) []string {
	return strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
}

func TestJSONLogsCarryKlogLines(t *testing.T) {
	t.Cleanup(klog.ClearLogger)
	var buf bytes.Buffer
	log := newLogger(&buf, logJSON, slog.LevelInfo)
	log.Info("own line", "vip", "192.168.80.250")
	klog.InfoS("klog structured", "pod", "kube-system/shardlb-x")
	klog.Infof("klog printf %d", 7)
	klog.ErrorS(errors.New("connection refused"), "klog error")
	klog.V(2).InfoS("klog V(2), off by klog's own verbosity")
	klog.Background().V(1).Info("contextual V(1), below Info")

	type line struct {
		Level, Msg, Part, Err, Pod string
	}
	var got []line
	for _, l := range logLines(&buf) {
		var v map[string]any
		if err := json.Unmarshal([]byte(l), &v); err != nil {
			t.Fatalf("log line is not JSON: %v\n%s", err, l)
		}
		s := func(k string) string { x, _ := v[k].(string); return x }
		got = append(got, line{Level: s("level"), Msg: s("msg"), Part: s("part"), Err: s("err"), Pod: s("pod")})
	}
	want := []line{
		{Level: "INFO", Msg: "own line"},
		{Level: "INFO", Msg: "klog structured", Part: "client-go", Pod: "kube-system/shardlb-x"},
		{Level: "INFO", Msg: "klog printf 7", Part: "client-go"},
		{Level: "ERROR", Msg: "klog error", Part: "client-go", Err: "connection refused"},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d lines, want %d:\n%s", len(got), len(want), buf.String())
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("line %d = %+v, want %+v", i+1, got[i], want[i])
		}
	}
}

func TestDebugTextLogsCarryContextualKlogLines(t *testing.T) {
	t.Cleanup(klog.ClearLogger)
	var buf bytes.Buffer
	newLogger(&buf, logText, slog.LevelDebug)
	klog.Background().V(4).Info("contextual V(4)", "resource", "leases")
	klog.Background().V(5).Info("contextual V(5), below Debug")
	lines := logLines(&buf)
	if len(lines) != 1 {
		t.Fatalf("got %d lines, want 1:\n%s", len(lines), buf.String())
	}
	for _, want := range []string{"level=DEBUG", `msg="contextual V(4)"`, "part=client-go", "resource=leases"} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("line %q lacks %s", lines[0], want)
		}
	}
	if strings.HasPrefix(lines[0], "{") || !strings.HasPrefix(lines[0], "time=") {
		t.Errorf("line %q is not slog text", lines[0])
	}
}
