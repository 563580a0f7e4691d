package kubeapi

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/shardlb/shardlb/internal/testenv"
)

// ForTest starts a server for one test and stops it when the test ends, also on
// failure. Missing binaries fail the test under CI=true and skip it elsewhere.
func ForTest(t testing.TB, o Options) *Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	s, err := Start(ctx, o)
	if errors.Is(err, ErrBinariesMissing) {
		testenv.Unavailable(t, "%v (set %s or run make k8s-bins)", err, BinDirEnv)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Error(err)
		}
	})
	return s
}
