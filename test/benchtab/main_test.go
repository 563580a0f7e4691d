package main

import (
	"strings"
	"testing"
)

func TestTablesShowRatioToBaseline(t *testing.T) {
	in := `goos: linux
pkg: github.com/shardlb/shardlb/ipam
BenchmarkAllocate/baseline-2   	 1000000	       100 ns/op	      16 B/op	       1 allocs/op
BenchmarkAllocate/unique-2     	  500000	       250 ns/op	      32 B/op	       2 allocs/op
BenchmarkFailover/clean-stop-2 	       1	  90.5 ms-median	1234 ns/op
ok  	github.com/shardlb/shardlb/ipam	3.1s
`
	var out strings.Builder
	if err := run(strings.NewReader(in), &out); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	for _, want := range []string{"ipam  Allocate", "2.50x", "1.00x", "ms-median", "90.50"} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
	if n := strings.Count(got, "x baseline"); n != 1 {
		t.Errorf("%d ratio columns, want one: only the group with a baseline gets it:\n%s", n, got)
	}
}
