package main

import (
	"fmt"
	"io"
	"runtime/debug"
)

// version is set by the build: -ldflags "-X main.version=..." (make build, make image:
// `git describe --tags --always --dirty`, the image's tag).
var version = "dev"

// printVersion answers `shardlb version` and `shardlb --version`.
func printVersion(w io.Writer) {
	bi, _ := debug.ReadBuildInfo()
	fmt.Fprintln(w, "shardlb", versionOf(version, bi))
}

// versionOf is the stamped version or, for a binary built without the flag by
// `go install github.com/shardlb/shardlb/cmd/shardlb@v1.2.3`, the module version the Go
// command recorded.
func versionOf(stamped string, bi *debug.BuildInfo) string {
	if stamped != "dev" || bi == nil {
		return stamped
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	return stamped
}
