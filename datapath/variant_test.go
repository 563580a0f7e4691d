package datapath

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"unicode"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/shardlb/shardlb/internal/testenv"
)

// variants are the program's compiled forms. Tests that send packets through the
// program run each, forced: this kernel has the kfunc, so auto would take only one.
var variants = []variant{variantKfunc, variantCompat}

// forEachVariant runs test once per program variant; the kfunc variant needs a kernel
// with the kfunc (testenv.Unavailable otherwise).
func forEachVariant(t *testing.T, test func(t *testing.T, v variant)) {
	for _, v := range variants {
		t.Run("variant "+string(v), func(t *testing.T) {
			requireVariant(t, v)
			test(t, v)
		})
	}
}

// requireVariant reports a variant this kernel cannot run as unavailable.
func requireVariant(t *testing.T, v variant) {
	t.Helper()
	if v == variantKfunc {
		if auto, why := chooseVariant(variantAuto); auto != variantKfunc {
			testenv.Unavailable(t, "the %s variant: %s", v, why)
		}
	}
}

// kernelTableRow is a row of the package doc's table of helpers and kfuncs.
type kernelTableRow struct {
	linux    string // the version that brings it
	variants string // both, kfunc or compat
}

// kernelTable reads the table of helpers and kfuncs in the package doc ("Kernels").
func kernelTable(t *testing.T) map[string]kernelTableRow {
	t.Helper()
	doc, err := os.ReadFile("doc.go")
	if err != nil {
		t.Fatal(err)
	}
	row := regexp.MustCompile(`(?m)^//\t(bpf_\w+)\s+(\d+\.\d+)\s+(both|kfunc|compat)\s`)
	table := map[string]kernelTableRow{}
	for _, m := range row.FindAllSubmatch(doc, -1) {
		table[string(m[1])] = kernelTableRow{linux: string(m[2]), variants: string(m[3])}
	}
	if len(table) == 0 {
		t.Fatal("no table of helpers and kfuncs in doc.go")
	}
	return table
}

// helperName is a helper's name as the kernel and the package doc spell it:
// asm.FnL4CsumReplace is bpf_l4_csum_replace.
func helperName(fn asm.BuiltinFunc) string {
	var b strings.Builder
	b.WriteString("bpf")
	for _, r := range strings.TrimPrefix(fn.String(), "Fn") {
		if unicode.IsUpper(r) {
			b.WriteByte('_')
		}
		b.WriteRune(unicode.ToLower(r))
	}
	return b.String()
}

// versionAfter tells whether Linux version a (major.minor) is newer than b.
func versionAfter(t *testing.T, a, b string) bool {
	t.Helper()
	parse := func(s string) (int, int) {
		maj, min, _ := strings.Cut(s, ".")
		x, err1 := strconv.Atoi(maj)
		y, err2 := strconv.Atoi(min)
		if err1 != nil || err2 != nil {
			t.Fatalf("version %q", s)
		}
		return x, y
	}
	am, an := parse(a)
	bm, bn := parse(b)
	return am > bm || am == bm && an > bn
}

// TestKernelTableMatchesTheObjects reads every helper and kfunc call from each variant's
// compiled instructions: each must be in the package doc's table, for that variant, and
// every row of the table must be called by the variants it names. The compat variant
// must need nothing newer than minKernelProgram, no kfunc and no kernel BTF (no CO-RE
// relocation); the kfunc variant has both, which shows that the test sees them.
func TestKernelTableMatchesTheObjects(t *testing.T) {
	table := kernelTable(t)
	used := map[string]map[variant]bool{}
	reported := map[string]bool{}
	errorf := func(format string, args ...any) {
		if msg := fmt.Sprintf(format, args...); !reported[msg] {
			reported[msg] = true
			t.Error(msg)
		}
	}
	for _, v := range variants {
		relocations, kfuncs := 0, 0
		spec, err := loadVariant(v)
		if err != nil {
			t.Fatal(err)
		}
		for name, prog := range spec.Programs {
			for _, ins := range prog.Instructions {
				var fn string
				switch {
				case ins.IsBuiltinCall():
					fn = helperName(asm.BuiltinFunc(ins.Constant))
				case ins.IsKfuncCall():
					kfuncs++
					fn = ins.Reference()
					if f := btf.FuncMetadata(&ins); f != nil {
						fn = f.Name
					}
				default:
					if btf.CORERelocationMetadata(&ins) != nil {
						relocations++
					}
					continue
				}
				if used[fn] == nil {
					used[fn] = map[variant]bool{}
				}
				used[fn][v] = true
				row, ok := table[fn]
				switch {
				case !ok:
					errorf("variant %s, %s calls %s, which the table in doc.go does not list", v, name, fn)
				case row.variants != "both" && row.variants != string(v):
					errorf("variant %s, %s calls %s, which the table lists for the %s variant only", v, name, fn, row.variants)
				case v == variantCompat && versionAfter(t, row.linux, minKernelProgram):
					errorf("variant %s calls %s, of Linux %s: newer than the minimum, %s", v, fn, row.linux, minKernelProgram)
				}
			}
		}
		switch {
		case v == variantCompat && (kfuncs > 0 || relocations > 0):
			t.Errorf("variant %s: %d kfunc calls and %d CO-RE relocations, want none: it must load without kernel BTF", v, kfuncs, relocations)
		case v == variantKfunc && (kfuncs == 0 || relocations == 0):
			t.Errorf("variant %s: %d kfunc calls and %d CO-RE relocations, want some of each (does the test still see them?)", v, kfuncs, relocations)
		}
	}
	for fn, row := range table {
		for _, v := range variants {
			want := row.variants == "both" || row.variants == string(v)
			if want != used[fn][v] {
				t.Errorf("the table in doc.go lists %s for %s, the %s variant calls it: %v", fn, row.variants, v, used[fn][v])
			}
		}
	}
	t.Logf("%d helpers and kfuncs, each in the table", len(used))
}

// TestVariantChosen: on a kernel with the kfunc, auto loads the kfunc variant; a forced
// variant is loaded whatever the kernel has; each says so in one log line.
func TestVariantChosen(t *testing.T) {
	testenv.RequireRoot(t)
	requireVariant(t, variantKfunc)
	for _, c := range []struct {
		forced     variant
		want       variant
		wantReason string
	}{
		{variantAuto, variantKfunc, "the kernel has the bpf_cast_to_kern_ctx kfunc"},
		{variantKfunc, variantKfunc, "forced by the configuration"},
		{variantCompat, variantCompat, "forced by the configuration"},
	} {
		t.Run("forced "+strconv.Quote(string(c.forced)), func(t *testing.T) {
			var logs bytes.Buffer
			d, err := New(Config{ConntrackSize: 1024, MaxServices: 4, MaxEndpoints: 16, variant: c.forced},
				slog.New(slog.NewTextHandler(&logs, nil)))
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if d.variant != c.want {
				t.Errorf("variant %s loaded, want %s", d.variant, c.want)
			}
			lines := linesWith(logs.String(), "datapath program variant chosen")
			if len(lines) != 1 || !strings.Contains(lines[0], "variant="+string(c.want)) || !strings.Contains(lines[0], c.wantReason) {
				t.Errorf("log lines naming the variant: %q; want one naming %s and %q", lines, c.want, c.wantReason)
			}
		})
	}
}

// breakProgram makes the kernel refuse the program: its first instruction becomes a
// call of a helper no kernel has.
func breakProgram(spec *ebpf.CollectionSpec) {
	prog := spec.Programs["lb_ingress"]
	ins := asm.BuiltinFunc(0x7fff).Call()
	ins.Metadata = prog.Instructions[0].Metadata
	prog.Instructions[0] = ins
}

// TestVariantRefused: when the kernel refuses the kfunc variant auto chose, New warns
// and loads the compat variant; when it refuses every variant New tries, New fails
// with one line naming the kernel and the minimum, and the verifier's log goes to the
// debug log only.
func TestVariantRefused(t *testing.T) {
	testenv.RequireRoot(t)
	requireVariant(t, variantKfunc)
	cfg := Config{ConntrackSize: 1024, MaxServices: 4, MaxEndpoints: 16}

	t.Run("the compat variant replaces a refused kfunc variant", func(t *testing.T) {
		var logs bytes.Buffer
		cfg := cfg
		cfg.editSpec = func(v variant, spec *ebpf.CollectionSpec) {
			if v == variantKfunc {
				breakProgram(spec)
			}
		}
		d, err := New(cfg, slog.New(slog.NewTextHandler(&logs, nil)))
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if d.variant != variantCompat {
			t.Errorf("variant %s loaded, want %s", d.variant, variantCompat)
		}
		warn := linesWith(logs.String(), "trying the compat variant")
		chosen := linesWith(logs.String(), "datapath program variant chosen")
		if len(warn) != 1 || len(chosen) != 1 || !strings.Contains(chosen[0], "variant=compat") ||
			!strings.Contains(chosen[0], "the kernel refused the kfunc variant") {
			t.Errorf("warnings %q, choice %q: want one warning and one line naming the compat variant and why", warn, chosen)
		}
	})

	for _, forced := range []variant{variantAuto, variantCompat} {
		t.Run("every variant refused, forced "+strconv.Quote(string(forced)), func(t *testing.T) {
			var logs bytes.Buffer
			cfg := cfg
			cfg.variant = forced
			cfg.editSpec = func(_ variant, spec *ebpf.CollectionSpec) { breakProgram(spec) }
			d, err := New(cfg, slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
			if err == nil {
				d.Close()
				t.Fatal("New loaded a program the kernel refuses")
			}
			msg := err.Error()
			t.Logf("New: %s", msg)
			if strings.Contains(msg, "\n") || !strings.Contains(msg, "Linux "+kernelRelease()+" refused it") ||
				!strings.Contains(msg, "needs Linux "+minKernelProgram+" or later") || !strings.Contains(msg, "compat variant") {
				t.Errorf("error %q: want one line naming the kernel, the minimum and the variant", msg)
			}
			if len(linesWith(logs.String(), "refused by the verifier")) == 0 || !strings.Contains(logs.String(), "invalid func") {
				t.Errorf("debug log without the verifier's log:\n%s", logs.String())
			}
		})
	}
}

// linesWith returns the lines of s that contain sub.
func linesWith(s, sub string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return out
}
