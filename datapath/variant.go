package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"
)

// variant is one compiled form of the program (see the package doc, "Kernels"). Both
// have the same maps, types and program name; they differ in how they learn an skb's
// checksum state.
type variant string

const (
	// variantAuto takes variantKfunc when the kernel has the kfunc, variantCompat
	// otherwise or when the kernel refuses variantKfunc.
	variantAuto variant = ""
	// variantKfunc reads ip_summed through the bpf_cast_to_kern_ctx kfunc (Linux 6.2).
	variantKfunc variant = "kfunc"
	// variantCompat asks bpf_l4_csum_replace instead: one helper call more for each
	// translated packet, and no kernel BTF needed.
	variantCompat variant = "compat"
)

// Kernels each part needs (see the package doc).
const (
	minKernelTCX     = "6.6"  // tcx links
	minKernelKfunc   = "6.2"  // the bpf_cast_to_kern_ctx kfunc of variantKfunc
	minKernelProgram = "5.15" // variantCompat: see the table in the package doc
	castKfunc        = "bpf_cast_to_kern_ctx"
)

// loadVariant returns the collection spec of v's object.
func loadVariant(v variant) (*ebpf.CollectionSpec, error) {
	if v == variantCompat {
		return loadLbcompat()
	}
	return loadLb()
}

// chooseVariant says which variant New loads first, and why. A forced one is the only
// one New tries.
func chooseVariant(forced variant) (v variant, why string) {
	switch forced {
	case variantKfunc, variantCompat:
		return forced, "forced by the configuration"
	}
	kernel, err := btf.LoadKernelSpec()
	if err != nil {
		return variantCompat, fmt.Sprintf("no kernel BTF, so no %s kfunc (%v)", castKfunc, err)
	}
	if _, err := kernel.AnyTypeByName(castKfunc); err != nil {
		return variantCompat, fmt.Sprintf("the kernel has no %s kfunc (Linux %s)", castKfunc, minKernelKfunc)
	}
	return variantKfunc, fmt.Sprintf("the kernel has the %s kfunc", castKfunc)
}

// loadProgram loads a variant of the program with load, a spec of it made ready by
// prepare (maps sized, variables set), and logs the variant loaded and why. When the
// kernel refuses the kfunc variant that auto chose, it tries the compat variant. When
// the kernel refuses every variant tried, the error is one line naming the kernel and
// the minimum; the verifier's log is logged at debug level only.
func loadProgram(forced variant, log *slog.Logger, prepare func(variant, *ebpf.CollectionSpec) error,
	load func(*ebpf.CollectionSpec) error) (variant, error) {
	v, why := chooseVariant(forced)
	for {
		spec, err := loadVariant(v)
		if err != nil {
			return v, fmt.Errorf("load datapath spec: %w", err)
		}
		if err := prepare(v, spec); err != nil {
			return v, err
		}
		err = load(spec)
		if err == nil {
			log.Info("datapath program variant chosen", "variant", v, "reason", why)
			return v, nil
		}
		if !refused(err) {
			return v, err
		}
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			log.Debug("datapath program refused by the verifier", "variant", v, "log", fmt.Sprintf("%+v", ve))
		}
		if forced == variantAuto && v == variantKfunc {
			log.Warn("datapath program variant refused, trying the compat variant", "variant", v, "error", oneLine(err))
			v, why = variantCompat, fmt.Sprintf("the kernel refused the %s variant (%s)", variantKfunc, oneLine(err))
			continue
		}
		return v, kernelTooOld(v, err)
	}
}

// refused tells whether err is the kernel refusing the program (a feature it lacks, the
// verifier), rather than a map, a pin or the process's rights.
func refused(err error) bool {
	var ve *ebpf.VerifierError
	return errors.As(err, &ve) || errors.Is(err, ebpf.ErrNotSupported)
}

// kernelTooOld is the one-line error of a program variant the running kernel refused.
func kernelTooOld(v variant, err error) error {
	return fmt.Errorf("load datapath program: Linux %s refused it (shardlb needs Linux %s or later; %s variant: %w)",
		kernelRelease(), minKernelProgram, v, err)
}

// kernelRelease is the running kernel's release, as uname -r prints it.
func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "(unknown release)"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// oneLine keeps the first line of err's text (cilium/ebpf's errors, the verifier's
// included, are one line; the full log is %+v).
func oneLine(err error) string {
	s, _, _ := strings.Cut(err.Error(), "\n")
	return s
}
