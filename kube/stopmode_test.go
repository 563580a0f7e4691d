package kube

import (
	"testing"
	"time"
)

func TestAStopIsARestartOnlyWhenTheForwardingOutlivesTheProcess(t *testing.T) {
	for _, tc := range []struct {
		mode        StopMode
		restart     time.Duration
		maintenance string
		want        bool
	}{
		{StopAuto, 120 * time.Second, "", true},
		{"", 120 * time.Second, "", true}, // unset is auto
		{StopAuto, 120 * time.Second, "cordoned", false},
		{StopAuto, 0, "", false},
		{StopRestart, 120 * time.Second, "cordoned", true},
		{StopRestart, 0, "", false},
		{StopHandover, 120 * time.Second, "", false},
	} {
		if got := tc.mode.restarts(tc.restart, tc.maintenance); got != tc.want {
			t.Errorf("stop mode %q, restart time %v, maintenance %q: restart %v, want %v", tc.mode, tc.restart, tc.maintenance, got, tc.want)
		}
	}
}
