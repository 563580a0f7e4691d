package nodestack

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// cgroupMount is where the cgroup hierarchies are mounted: this machine's are v1 with
// a v2 "unified" mount beside them (hybrid), each hierarchy a directory here.
const cgroupMount = "/sys/fs/cgroup"

// hierarchies lists the mounted cgroup hierarchies (cpu, memory, ..., systemd,
// unified): every directory under /sys/fs/cgroup that holds a cgroup.procs.
func hierarchies() ([]string, error) {
	entries, err := os.ReadDir(cgroupMount)
	if err != nil {
		return nil, err
	}
	var hs []string
	for _, e := range entries {
		p := filepath.Join(cgroupMount, e.Name())
		if fi, err := os.Lstat(p); err != nil || !fi.IsDir() {
			continue // cpu,cpuacct style links
		}
		if _, err := os.Stat(filepath.Join(p, "cgroup.procs")); err == nil {
			hs = append(hs, p)
		}
	}
	if len(hs) == 0 {
		return nil, fmt.Errorf("no cgroup hierarchy under %s", cgroupMount)
	}
	return hs, nil
}

// makeCgroup creates the cgroup path (e.g. /nsl-node1/system) in every hierarchy. A
// cpuset cgroup starts with no CPU and no memory node in v1: it gets its parent's.
func makeCgroup(path string) error {
	hs, err := hierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		dir := h
		for _, part := range strings.Split(strings.Trim(path, "/"), "/") {
			parent := dir
			dir = filepath.Join(dir, part)
			if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				return err
			}
			if filepath.Base(h) != "cpuset" {
				continue
			}
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				if cur, _ := os.ReadFile(filepath.Join(dir, f)); strings.TrimSpace(string(cur)) != "" {
					continue
				}
				v, err := os.ReadFile(filepath.Join(parent, f))
				if err != nil {
					return err
				}
				if err := os.WriteFile(filepath.Join(dir, f), v, 0o644); err != nil {
					return fmt.Errorf("%s: %w", filepath.Join(dir, f), err)
				}
			}
		}
	}
	return nil
}

// cgroupJoin is a shell prefix that moves the shell into path in every hierarchy and
// then execs the command after it: the daemon starts inside the cgroup, so whatever
// it spawns (shims, containers) is found there at the end.
func cgroupJoin(path string) ([]string, error) {
	hs, err := hierarchies()
	if err != nil {
		return nil, err
	}
	var b strings.Builder
	for _, h := range hs {
		fmt.Fprintf(&b, "echo $$ > %s && ", filepath.Join(h, path, "cgroup.procs"))
	}
	b.WriteString(`exec "$@"`)
	return []string{"sh", "-c", b.String(), "sh"}, nil
}

// cgroupPIDs returns every process in path or below it, in any hierarchy.
func cgroupPIDs(path string) []int {
	hs, _ := hierarchies()
	seen := map[int]bool{}
	for _, h := range hs {
		_ = filepath.WalkDir(filepath.Join(h, path), func(p string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
				return nil
			}
			data, _ := os.ReadFile(p)
			for _, f := range strings.Fields(string(data)) {
				if pid, err := strconv.Atoi(f); err == nil {
					seen[pid] = true
				}
			}
			return nil
		})
	}
	pids := make([]int, 0, len(seen))
	for pid := range seen {
		pids = append(pids, pid)
	}
	slices.Sort(pids)
	return pids
}

// removeCgroup kills every process in path and below (SIGKILL, by PID, read from the
// cgroups themselves, until none is left) and removes the cgroups, deepest first.
func removeCgroup(path string) error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		pids := cgroupPIDs(path)
		if len(pids) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s: processes %v survive SIGKILL", path, pids)
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
	hs, err := hierarchies()
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hs {
		var dirs []string
		_ = filepath.WalkDir(filepath.Join(h, path), func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		// Children before parents: a cgroup with a child cannot be removed. A dying
		// process may hold its cgroup a moment longer.
		slices.Reverse(dirs)
		for _, d := range dirs {
			var err error
			for range 50 {
				if err = syscall.Rmdir(d); err == nil || errors.Is(err, fs.ErrNotExist) {
					err = nil
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("rmdir %s: %w", d, err))
			}
		}
	}
	return errors.Join(errs...)
}
