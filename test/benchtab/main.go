// Command benchtab turns `go test -bench` output into readable tables, one per
// benchmark group, each row with its ratio to the group's baseline measured in the same
// run.
//
// Convention: BenchmarkGroup/case rows form one group; the case named "baseline" (or
// starting with "baseline") is the baseline. The ratio compares the first metric the
// rows share (ns/op unless a benchmark reports its own unit first with b.ReportMetric).
// Lines that are not benchmark results (PASS, ok, logs) are passed through unchanged.
package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
)

type metric struct {
	unit  string
	value float64
}

type row struct {
	group, name string
	metrics     []metric
}

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "benchtab:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	var pkg string
	var rows []row
	flush := func() {
		if len(rows) > 0 {
			printTables(out, pkg, rows)
			rows = nil
		}
	}
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "pkg: ") {
			flush()
			pkg = strings.TrimPrefix(line, "pkg: ")
			continue
		}
		if r, ok := parse(line); ok {
			rows = append(rows, r)
			continue
		}
		if strings.HasPrefix(line, "ok ") || strings.HasPrefix(line, "ok\t") || strings.HasPrefix(line, "FAIL") {
			flush()
		}
		if strings.HasPrefix(line, "goos:") || strings.HasPrefix(line, "goarch:") || strings.HasPrefix(line, "cpu:") || line == "PASS" {
			continue
		}
		fmt.Fprintln(out, line)
	}
	flush()
	return sc.Err()
}

// parse reads "BenchmarkX/y-2   100   123 ns/op   4 B/op ..." lines.
func parse(line string) (row, bool) {
	f := strings.Fields(line)
	if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
		return row{}, false
	}
	if _, err := strconv.Atoi(f[1]); err != nil {
		return row{}, false
	}
	name := strings.TrimPrefix(f[0], "Benchmark")
	if i := strings.LastIndex(name, "-"); i > 0 {
		if _, err := strconv.Atoi(name[i+1:]); err == nil {
			name = name[:i]
		}
	}
	group, sub, _ := strings.Cut(name, "/")
	r := row{group: group, name: sub}
	for i := 2; i+1 < len(f); i += 2 {
		v, err := strconv.ParseFloat(f[i], 64)
		if err != nil {
			return row{}, false
		}
		r.metrics = append(r.metrics, metric{unit: f[i+1], value: v})
	}
	// Custom metrics reported by b.ReportMetric come after ns/op; they are what the
	// benchmark is about, so move them to the front.
	sort.SliceStable(r.metrics, func(i, j int) bool { return rank(r.metrics[i].unit) < rank(r.metrics[j].unit) })
	return r, true
}

func rank(unit string) int {
	switch unit {
	case "ns/op":
		return 1
	case "B/op":
		return 2
	case "allocs/op":
		return 3
	}
	return 0
}

func printTables(out io.Writer, pkg string, rows []row) {
	var order []string
	groups := map[string][]row{}
	for _, r := range rows {
		if _, ok := groups[r.group]; !ok {
			order = append(order, r.group)
		}
		groups[r.group] = append(groups[r.group], r)
	}
	for _, g := range order {
		rs := groups[g]
		fmt.Fprintf(out, "\n%s  %s\n", pkg, g)
		var units []string
		seen := map[string]bool{}
		for _, r := range rs {
			for _, m := range r.metrics {
				if !seen[m.unit] {
					seen[m.unit] = true
					units = append(units, m.unit)
				}
			}
		}
		sort.SliceStable(units, func(i, j int) bool { return rank(units[i]) < rank(units[j]) })
		var base *row
		for i := range rs {
			if strings.HasPrefix(rs[i].name, "baseline") {
				base = &rs[i]
				break
			}
		}
		tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprint(tw, "case\t")
		for _, u := range units {
			fmt.Fprintf(tw, "%s\t", u)
		}
		if base != nil {
			fmt.Fprintf(tw, "x baseline (%s)\t", units[0])
		}
		fmt.Fprintln(tw)
		for _, r := range rs {
			name := r.name
			if name == "" {
				name = g
			}
			fmt.Fprintf(tw, "%s\t", name)
			for _, u := range units {
				if v, ok := value(r, u); ok {
					fmt.Fprintf(tw, "%s\t", human(v))
				} else {
					fmt.Fprint(tw, "-\t")
				}
			}
			if base != nil {
				bv, ok1 := value(*base, units[0])
				v, ok2 := value(r, units[0])
				if ok1 && ok2 && bv != 0 {
					fmt.Fprintf(tw, "%.2fx\t", v/bv)
				} else {
					fmt.Fprint(tw, "-\t")
				}
			}
			fmt.Fprintln(tw)
		}
		tw.Flush()
	}
}

func value(r row, unit string) (float64, bool) {
	for _, m := range r.metrics {
		if m.unit == unit {
			return m.value, true
		}
	}
	return 0, false
}

func human(v float64) string {
	switch {
	case v == float64(int64(v)) && v < 1e7:
		return strconv.FormatInt(int64(v), 10)
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 1:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
	return strconv.FormatFloat(v, 'g', 3, 64)
}
