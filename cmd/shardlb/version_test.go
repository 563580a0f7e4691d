package main

import (
	"bytes"
	"runtime/debug"
	"testing"
)

func TestVersionAndDashDashVersionPrintTheStampedVersion(t *testing.T) {
	saved := version
	t.Cleanup(func() { version = saved })
	// What make build and make image stamp: git describe --tags --always --dirty.
	version = "v1.2.3-4-gabcdef0-dirty"
	for _, args := range [][]string{{"version"}, {"--version"}} {
		var out, errOut bytes.Buffer
		code := run(args, func(string) string { return "" }, &out, &errOut)
		if code != 0 || out.String() != "shardlb v1.2.3-4-gabcdef0-dirty\n" || errOut.Len() != 0 {
			t.Errorf("shardlb %s: exit %d, stdout %q, stderr %q; want exit 0 and \"shardlb v1.2.3-4-gabcdef0-dirty\\n\"",
				args[0], code, out.String(), errOut.String())
		}
	}
}

func TestVersionOfAnUnstampedBuild(t *testing.T) {
	info := func(v string) *debug.BuildInfo {
		return &debug.BuildInfo{Main: debug.Module{Path: "github.com/shardlb/shardlb", Version: v}}
	}
	cases := []struct {
		name    string
		stamped string
		bi      *debug.BuildInfo
		want    string
	}{
		{"the stamped version wins over the module version", "v1.2.3", info("v1.2.0"), "v1.2.3"},
		{"go install of a release reports the release", "dev", info("v1.2.0"), "v1.2.0"},
		{"a build from a work tree without the flag says dev", "dev", info("(devel)"), "dev"},
		{"no build information says dev", "dev", nil, "dev"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := versionOf(c.stamped, c.bi); got != c.want {
				t.Errorf("versionOf(%q, %v) = %q, want %q", c.stamped, c.bi, got, c.want)
			}
		})
	}
}
