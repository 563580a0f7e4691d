package main

import (
	"fmt"
	"io"
)

// serve runs the load balancer until SIGTERM.
func serve(cfg config, stderr io.Writer) int {
	fmt.Fprintln(stderr, "shardlb: run is wired once the kube package lands")
	_ = cfg
	return 1
}

func get(args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stderr, "shardlb: get is wired once the kube package lands")
	_, _ = args, stdout
	return 1
}
