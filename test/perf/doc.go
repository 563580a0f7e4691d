// Package perf measures the load balancer against what kube-proxy users have (nftables
// DNAT with conntrack) on one machine: CPU time per packet of the load-balancer hop and
// HTTP new connections and keep-alive requests per second, in namespaces it creates.
//
// Everything lives in the package's tests and benchmarks; see perf_test.go.
package perf
