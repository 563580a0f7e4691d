package main

import (
	"fmt"
	"io"
	"log/slog"
	"strings"

	"k8s.io/klog/v2"
)

// logFormat is how log lines are written (--logFormat).
type logFormat string

const (
	logText logFormat = "text" // slog's key=value lines
	logJSON logFormat = "json" // one JSON object per line
)

// parseLogFormat reads --logFormat: text or json.
func parseLogFormat(s string) (logFormat, error) {
	switch f := logFormat(strings.ToLower(strings.TrimSpace(s))); f {
	case logText, logJSON:
		return f, nil
	}
	return "", fmt.Errorf("log format %q: want text or json", s)
}

// newLogger returns the daemon's logger, writing lines of format at level to w, and
// routes klog, which client-go and apimachinery log through, into the same handler
// (their lines carry part=client-go), so that a pod's log is in one format. Verbosity
// levels of contextual logging map to slog levels below Info (V(1) is -1, V(4) is
// Debug), so --logLevel=debug shows client-go's V(1) to V(4) lines of that kind and
// info none; klog's own verbosity (0) still drops its plain klog.V(n) calls.
// Routing klog is process-wide: call newLogger once, before any client starts.
func newLogger(w io.Writer, format logFormat, level slog.Leveler) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(w, opts)
	if format == logJSON {
		h = slog.NewJSONHandler(w, opts)
	}
	log := slog.New(h)
	klog.SetSlogLogger(log.With("part", "client-go"))
	return log
}
