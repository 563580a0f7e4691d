package nodestack

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"time"
)

// A long-lived stream from a backend pod's /stream: streamBytes at streamRate bytes a
// second, 60 s, byte i being i mod 251.
const (
	streamBytes = 960 << 10
	streamRate  = 16 << 10
)

// stream is one /stream download through a VIP, read and checked in the background.
type stream struct {
	addr netip.AddrPort
	pod  string
	conn net.Conn
	body *bufio.Reader
	done chan struct{}

	// Set by read, valid once done is closed.
	got      int           // bytes received intact
	err      error         // why it ended early or corrupt, nil when whole
	stall    time.Duration // longest time without a byte
	stallAt  time.Time     // when that stall began
	finished time.Time
}

// openStream requests /stream through addr and returns it with the pod that serves it,
// not reading yet.
func openStream(ctx context.Context, addr netip.AddrPort) (*stream, error) {
	var c net.Conn
	err := inClient(func() error {
		var d net.Dialer
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		var err error
		c, err = d.DialContext(ctx, "tcp", addr.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := fmt.Fprintf(c, "GET /stream?bytes=%d&rate=%d HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", streamBytes, streamRate, addr); err != nil {
		c.Close()
		return nil, err
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		c.Close()
		return nil, err
	}
	if resp.StatusCode != http.StatusOK || resp.ContentLength != streamBytes {
		c.Close()
		return nil, fmt.Errorf("stream through %s: %s, %d bytes", addr, resp.Status, resp.ContentLength)
	}
	return &stream{addr: addr, pod: resp.Header.Get("X-Pod"), conn: c, body: br, done: make(chan struct{})}, nil
}

// read reads the body to its end, checking every byte, until it ends, breaks or stalls
// for 30 s, and closes the connection.
func (s *stream) read() {
	defer close(s.done)
	defer s.conn.Close()
	buf := make([]byte, 32<<10)
	last := time.Now()
	for s.got < streamBytes {
		if err := s.conn.SetReadDeadline(time.Now().Add(30 * time.Second)); err != nil {
			s.err = err
			return
		}
		n, err := s.body.Read(buf)
		now := time.Now()
		if n > 0 {
			if gap := now.Sub(last); gap > s.stall {
				s.stall, s.stallAt = gap, last
			}
			last = now
		}
		for i := range n {
			if want := byte((s.got + i) % 251); buf[i] != want {
				s.err = fmt.Errorf("byte %d is %d, want %d", s.got+i, buf[i], want)
				return
			}
		}
		s.got += n
		if err == io.EOF && s.got < streamBytes {
			s.err = fmt.Errorf("ended after %d of %d bytes", s.got, streamBytes)
			return
		}
		if err != nil && err != io.EOF {
			s.err = fmt.Errorf("after %d of %d bytes: %w", s.got, streamBytes, err)
			return
		}
	}
	s.finished = time.Now()
}
