package main

import (
	"context"
	"fmt"
	"time"
)

// waitFor polls check every 50 ms until it returns nil, ctx ends or d passes; the
// error names what was awaited and the last reason it was not there yet.
func waitFor(ctx context.Context, d time.Duration, what string, check func() error) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		err := check()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w (last: %v)", what, ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
