// Command backend is the lab's backend pod: an HTTP server that answers every request
// with its pod's name (the hostname Kubernetes gives a pod, or $POD_NAME), so a client
// of a load-balanced service sees which pod served it. /stream?bytes=N&rate=R sends N
// bytes (default 1 MiB) at R bytes a second (default 16 KiB, so about 64 s), byte i
// being i mod 251, for a long-lived connection a reader checks byte by byte; its
// X-Pod header names the pod. -listen (default :80) says where; the pod needs
// net.ipv4.ip_unprivileged_port_start=0 to bind :80 as non-root. Built static and
// assembled by `make lab-images`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	listen := flag.String("listen", ":80", "address to serve on")
	flag.Parse()
	name := os.Getenv("POD_NAME")
	if name == "" {
		var err error
		if name, err = os.Hostname(); err != nil {
			log.Fatalf("backend: hostname: %v", err)
		}
	}
	srv := &http.Server{
		Addr:              *listen,
		ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/stream" {
				stream(w, r, name)
				return
			}
			w.Header().Set("Content-Type", "text/plain")
			fmt.Fprintf(w, "%s\n", name)
		}),
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	log.Printf("backend %s serving on %s", name, *listen)
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatalf("backend: %v", err)
	}
}

// stream writes the /stream body: ?bytes= (default 1 MiB) at ?rate= bytes a second
// (default 16 KiB), in chunks of a tenth of a second.
func stream(w http.ResponseWriter, r *http.Request, name string) {
	n, rate := 1<<20, 16<<10
	if v, err := strconv.Atoi(r.URL.Query().Get("bytes")); err == nil && v > 0 {
		n = v
	}
	if v, err := strconv.Atoi(r.URL.Query().Get("rate")); err == nil && v > 0 {
		rate = v
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.Itoa(n))
	w.Header().Set("X-Pod", name)
	flusher, _ := w.(http.Flusher)
	chunk := max(rate/10, 1)
	buf := make([]byte, chunk)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for sent := 0; sent < n; {
		m := min(chunk, n-sent)
		for i := range m {
			buf[i] = byte((sent + i) % 251)
		}
		if _, err := w.Write(buf[:m]); err != nil {
			return
		}
		if flusher != nil {
			flusher.Flush()
		}
		sent += m
		if sent < n {
			select {
			case <-r.Context().Done():
				return
			case <-tick.C:
			}
		}
	}
}
