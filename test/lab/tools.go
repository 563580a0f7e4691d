package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// cacheDir is where built tools are kept between runs ($HOME/.cache/shardlb).
func cacheDir() string {
	if d := os.Getenv("SHARDLB_CACHE"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "shardlb-cache")
	}
	return filepath.Join(home, ".cache", "shardlb")
}

// gobgpCLI returns the GoBGP v4 CLI at the version go.mod pins, building it into the
// cache the first time (about 40 s). It is installed by module path and version
// rather than built inside shardlb's module, whose go.sum does not carry the CLI's
// own dependencies (cobra, viper).
func gobgpCLI() (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Version}}", "github.com/osrg/gobgp/v4")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("GoBGP version from go.mod: %w", err)
	}
	version := strings.TrimSpace(string(out))
	dir := filepath.Join(cacheDir(), "gobgp-"+version)
	bin := filepath.Join(dir, "gobgp")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	cmd = exec.Command("go", "install", "github.com/osrg/gobgp/v4/cmd/gobgp@"+version)
	cmd.Env = append(os.Environ(), "GOBIN="+dir, "CGO_ENABLED=0")
	cmd.Dir = os.TempDir() // outside any module: install resolves the CLI's own go.mod
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go install gobgp@%s: %w\n%s", version, err, out)
	}
	return bin, nil
}
