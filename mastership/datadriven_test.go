package mastership

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var rewrite = flag.Bool("rewrite", false, "rewrite the expected output of the testdata scenarios")

// testCase is one command of a scenario file and the output it must give.
type testCase struct {
	line     int
	cmd      string
	args     []string
	expected string
}

// parseScenario reads a file of commands, each followed by a line "----" and its
// expected output up to the next blank line. Lines starting with # are comments.
func parseScenario(t *testing.T, path string) []testCase {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	var out []testCase
	for i := 0; i < len(lines); i++ {
		l := strings.TrimSpace(lines[i])
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		f := strings.Fields(l)
		tc := testCase{line: i + 1, cmd: f[0], args: f[1:]}
		if i+1 >= len(lines) || strings.TrimSpace(lines[i+1]) != "----" {
			t.Fatalf("%s:%d: %q: want a line ---- after the command", path, i+1, l)
		}
		i += 2
		var exp []string
		for ; i < len(lines) && strings.TrimSpace(lines[i]) != ""; i++ {
			exp = append(exp, lines[i])
		}
		tc.expected = strings.Join(exp, "\n")
		out = append(out, tc)
	}
	return out
}

// writeScenario writes the commands back with the outputs they gave.
func writeScenario(t *testing.T, path string, header string, cases []testCase, got []string) {
	t.Helper()
	var b strings.Builder
	b.WriteString(header)
	for i, tc := range cases {
		b.WriteString(strings.Join(append([]string{tc.cmd}, tc.args...), " "))
		b.WriteString("\n----\n")
		if got[i] != "" {
			b.WriteString(got[i])
			b.WriteString("\n")
		}
		b.WriteString("\n")
	}
	if err := os.WriteFile(path, []byte(strings.TrimRight(b.String(), "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// leadingComments is the comment block at the top of a scenario file.
func leadingComments(path string) string {
	b, _ := os.ReadFile(path)
	var out strings.Builder
	for _, l := range strings.Split(string(b), "\n") {
		if t := strings.TrimSpace(l); t != "" && !strings.HasPrefix(t, "#") {
			break
		}
		out.WriteString(l + "\n")
	}
	return out.String()
}

// TestScenarios runs every testdata file against the simulated cluster. Each file's
// header says which rule it guards and what breaking that rule does to its output.
// go test -run TestScenarios -rewrite regenerates the expected outputs.
func TestScenarios(t *testing.T) {
	files, err := filepath.Glob("testdata/*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no scenarios: %v", err)
	}
	for _, path := range files {
		t.Run(strings.TrimSuffix(filepath.Base(path), ".txt"), func(t *testing.T) {
			cases := parseScenario(t, path)
			s := newSim(t)
			got := make([]string, len(cases))
			for i, tc := range cases {
				out, err := s.exec(tc.cmd, tc.args)
				if err != nil {
					t.Fatalf("%s:%d: %s: %v", path, tc.line, tc.cmd, err)
				}
				got[i] = strings.TrimRight(out, "\n")
				if !*rewrite && got[i] != tc.expected {
					t.Errorf("%s:%d: %s %s:\n--- want\n%s\n--- got\n%s", path, tc.line, tc.cmd, strings.Join(tc.args, " "), tc.expected, got[i])
				}
			}
			if *rewrite {
				writeScenario(t, path, leadingComments(path), cases, got)
			}
			if v := s.violations; len(v) > 0 {
				t.Errorf("invariants broken:\n%s", strings.Join(v, "\n"))
			}
		})
	}
}

func kv(args []string) (map[string]string, []string) {
	m := map[string]string{}
	var rest []string
	for _, a := range args {
		if k, v, ok := strings.Cut(a, "="); ok {
			m[k] = v
		} else {
			rest = append(rest, a)
		}
	}
	return m, rest
}

func errf(format string, a ...any) error { return fmt.Errorf(format, a...) }
