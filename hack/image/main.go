// Command image assembles the shardlb image from the static shardlb and gobgp binaries
// that `make image` builds: one layer on an empty base, no daemon, no root, nothing
// pulled. The same binaries, version, revision and SOURCE_DATE_EPOCH give the same
// digest. It writes an OCI layout directory and the same as one tarball that
// ctr images import, docker load and podman load all read.
//
// With -bin instead of -shardlb and -gobgp it assembles one of the lab's images the
// same way (the pod sandbox's pause and the backend in pause/ and backend/): the given
// static binaries, the first one the entrypoint, no command, user 65532.
//
// It is its own module so that go-containerregistry stays out of shardlb's
// dependency graph.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func main() {
	if err := run(os.Args[1:], os.Getenv, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "hack/image:", err)
		os.Exit(1)
	}
}

func run(args []string, env func(string) string, stdout io.Writer) error {
	fs := flag.NewFlagSet("hack/image", flag.ContinueOnError)
	var (
		s = spec{files: map[string]string{}}

		shardlb = fs.String("shardlb", "", "the static shardlb binary, put at /usr/bin/shardlb")
		gobgp   = fs.String("gobgp", "", "the static GoBGP v4 CLI, put at /usr/bin/gobgp")
		ociDir  = fs.String("oci", "", "write an OCI layout directory here (replaced if it is one)")
		tarFile = fs.String("tar", "", "write the OCI layout as a tarball here, with a docker manifest.json")
		bins    binFlag
	)
	fs.Var(&bins, "bin", "PATH=FILE: put the static binary FILE at /PATH (repeatable; instead of -shardlb and -gobgp); the first is the entrypoint")
	fs.StringVar(&s.name, "name", "ghcr.io/shardlb/shardlb", "image repository; the tag is -version")
	fs.StringVar(&s.version, "version", "", "version: the image tag and its org.opencontainers.image.version label")
	fs.StringVar(&s.revision, "revision", "", "source commit, the org.opencontainers.image.revision label")
	fs.StringVar(&s.source, "source", "https://github.com/shardlb/shardlb", "the org.opencontainers.image.source label")
	fs.StringVar(&s.arch, "arch", runtime.GOARCH, "the binaries' GOARCH")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: SOURCE_DATE_EPOCH=SECONDS assemble -shardlb BIN -gobgp BIN -version V -revision SHA -oci DIR -tar FILE")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if s.version == "" || s.revision == "" {
		return errors.New("-version and -revision are required")
	}
	switch {
	case len(bins) > 0 && (*shardlb != "" || *gobgp != ""):
		return errors.New("-bin builds another image than shardlb's: give it without -shardlb and -gobgp")
	case len(bins) > 0:
		s.title, s.entrypoint, s.user = path.Base(s.name), []string{"/" + bins[0][0]}, user
		for _, b := range bins {
			if _, dup := s.files[b[0]]; dup {
				return fmt.Errorf("-bin: /%s given twice", b[0])
			}
			s.files[b[0]] = b[1]
		}
	case *shardlb == "" || *gobgp == "":
		return errors.New("-shardlb and -gobgp (or -bin) are required")
	default:
		s.title, s.entrypoint, s.cmd, s.user = "shardlb", []string{entrypoint}, defaultCmd, user
		s.files["usr/bin/shardlb"] = *shardlb
		s.files["usr/bin/gobgp"] = *gobgp
	}
	if *ociDir == "" && *tarFile == "" {
		return errors.New("nothing to write: give -oci, -tar or both")
	}
	epoch, err := strconv.ParseInt(env("SOURCE_DATE_EPOCH"), 10, 64)
	if err != nil {
		return fmt.Errorf("SOURCE_DATE_EPOCH (the commit time, seconds since 1970) is required: %w", err)
	}
	s.created = time.Unix(epoch, 0).UTC()

	tag, err := s.tag()
	if err != nil {
		return err
	}
	img, err := s.image()
	if err != nil {
		return err
	}
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	size, err := compressedSize(img)
	if err != nil {
		return err
	}
	dir := *ociDir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "shardlb-oci-"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		dir = filepath.Join(dir, "oci")
	}
	if err := writeOCI(dir, img, tag); err != nil {
		return fmt.Errorf("OCI layout: %w", err)
	}
	if *tarFile != "" {
		if err := writeArchive(*tarFile, dir, img, tag, s.created); err != nil {
			return fmt.Errorf("archive: %w", err)
		}
	}
	fmt.Fprintf(stdout, "%s@%s  linux/%s, %.1f MB compressed\n", tag.Name(), digest, s.arch, float64(size)/1e6)
	if *ociDir != "" {
		fmt.Fprintf(stdout, "  %s  OCI layout (skopeo copy oci:%s:%s docker://%s)\n", *ociDir, *ociDir, tag.TagStr(), tag.Name())
	}
	if *tarFile != "" {
		fmt.Fprintf(stdout, "  %s  OCI archive with a docker manifest.json (ctr -n k8s.io images import, docker load, podman load)\n", *tarFile)
	}
	return nil
}

// binFlag is the repeated -bin PATH=FILE: the path in the image, relative, and the file.
type binFlag [][2]string

func (b *binFlag) String() string { return fmt.Sprint(*b) }

func (b *binFlag) Set(v string) error {
	p, file, ok := strings.Cut(v, "=")
	p = strings.TrimPrefix(p, "/")
	if !ok || p == "" || file == "" {
		return fmt.Errorf("%q: want PATH=FILE, e.g. usr/bin/pause=bin/image/pause", v)
	}
	*b = append(*b, [2]string{p, file})
	return nil
}

// compressedSize is what a registry stores and a node pulls: layers and config.
func compressedSize(img v1.Image) (int64, error) {
	m, err := img.Manifest()
	if err != nil {
		return 0, err
	}
	n := m.Config.Size
	for _, l := range m.Layers {
		n += l.Size
	}
	return n, nil
}
