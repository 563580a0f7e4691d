// Command shardlb is the load balancer: one binary run as a DaemonSet, with the
// Kubernetes controller, the mastership elector, the BGP speaker and the eBPF datapath.
// It only wires the packages together; each package holds its own logic.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
)

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

// run dispatches the subcommands and returns the exit code: 2 for bad usage.
func run(args []string, env func(string) string, stdout, stderr io.Writer) int {
	// Flags go to run, except --version.
	cmd := "run"
	if len(args) > 0 && (args[0] == "--version" || (args[0] != "" && args[0][0] != '-')) {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "version", "--version":
		printVersion(stdout)
		return 0
	case "run":
		cfg, err := parseConfig(args, env, stdout)
		if errors.Is(err, errHelp) {
			return 0
		}
		if err != nil {
			fmt.Fprintln(stderr, "shardlb:", err)
			return 2
		}
		return serve(cfg, stderr)
	case "get":
		return get(args, stdout, stderr)
	case "cleanup":
		return cleanup(args, stdout, stderr)
	case "help":
		_, _ = parseConfig([]string{"--help"}, env, stdout)
		return 0
	}
	fmt.Fprintf(stderr, "shardlb: unknown command %q (run, get, cleanup, version, help)\n", cmd)
	return 2
}
