// Command shardlb is the load balancer: one binary run as a DaemonSet, with the
// Kubernetes controller, the mastership elector, the BGP speaker and the eBPF datapath.
// It only wires the packages together; each package holds its own logic.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/pflag"

	"github.com/shardlb/shardlb/kube"
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
		canonical, err := parseGet(args)
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintln(stdout, "usage:", getUsage)
			return 0
		}
		if err != nil {
			fmt.Fprintf(stderr, "shardlb get: %s; usage: %s\n", strings.TrimPrefix(err.Error(), kube.ErrUsage.Error()+": "), getUsage)
			return 2
		}
		return get(canonical, stdout, stderr)
	case "cleanup":
		return cleanup(args, stdout, stderr)
	case "help":
		_, _ = parseConfig([]string{"--help"}, env, stdout)
		return 0
	}
	fmt.Fprintf(stderr, "shardlb: unknown command %q (run, get, cleanup, version, help)\n", cmd)
	return 2
}

const getUsage = "shardlb get ha|ip|lb|bgp|services [-o table|wide|json|yaml] [--api ADDRESS:PORT]"

// parseGet reads `shardlb get` as kubectl does: the subject anywhere, -o json, -ojson,
// -o=json, --output json or --output=json, and --api. It checks everything a usage
// error can be and returns the arguments in the one form get takes.
func parseGet(args []string) ([]string, error) {
	fs := pflag.NewFlagSet("get", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	out := fs.StringP("output", "o", "table", "table, wide, json or yaml")
	api := fs.String("api", kube.DefaultAPIAddress, "the local shardlb API")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	switch fs.NArg() {
	case 0:
		return nil, fmt.Errorf("no subject")
	case 1:
	default:
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(1))
	}
	what, err := kube.CheckGet(fs.Arg(0), *out)
	if err != nil {
		return nil, err
	}
	return []string{what, "-o", *out, "-api", *api}, nil
}
