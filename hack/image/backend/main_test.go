package main

import (
	"io"
	"net/http/httptest"
	"strconv"
	"testing"
)

func TestStream(t *testing.T) {
	rec := httptest.NewRecorder()
	stream(rec, httptest.NewRequest("GET", "/stream?bytes=2500&rate=10000", nil), "pod-a")
	body, _ := io.ReadAll(rec.Body)
	if len(body) != 2500 || rec.Header().Get("Content-Length") != strconv.Itoa(2500) || rec.Header().Get("X-Pod") != "pod-a" {
		t.Fatalf("%d bytes, headers %v; want 2500 bytes from pod-a", len(body), rec.Header())
	}
	for i, b := range body {
		if b != byte(i%251) {
			t.Fatalf("byte %d is %d, want %d", i, b, i%251)
		}
	}
}
