package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// The image's fixed settings. The DaemonSet runs the load balancer as uid 0 (Kubernetes
// grants added capabilities to root processes only); the default user is for the CLIs,
// which need no privilege.
const (
	entrypoint = "/usr/bin/shardlb"
	user       = "65532:65532"
	defaultEnv = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	license    = "Apache-2.0"
)

var defaultCmd = []string{"run"}

// spec is everything the image is made of: the same spec gives the same bytes.
type spec struct {
	// name is the repository, e.g. ghcr.io/shardlb/shardlb; the tag is version.
	name string
	// version is the image tag and org.opencontainers.image.version.
	version string
	// revision is the source commit, org.opencontainers.image.revision.
	revision string
	// source is the repository's URL, org.opencontainers.image.source.
	source string
	// created is SOURCE_DATE_EPOCH: the config's creation time and every file's mtime.
	created time.Time
	// arch is the binaries' GOARCH; the OS is linux.
	arch string
	// files maps a path in the image (usr/bin/shardlb) to the file on disk copied
	// there. Only the content is taken: modes, owners and times are fixed.
	files map[string]string
	// title is org.opencontainers.image.title; entrypoint, cmd and user the config's.
	// shardlb's image has the constants above; the lab's images (pause, backend) run
	// their one binary.
	title      string
	entrypoint []string
	cmd        []string
	user       string
}

func (s spec) tag() (name.Tag, error) {
	return name.NewTag(s.name+":"+s.version, name.StrictValidation)
}

// layer is the files as one gzipped tar: parent directories first, entries sorted,
// owned by 0:0, mode 0755, mtime s.created, USTAR headers (no PAX records carrying
// access or change times).
func (s spec) layer() ([]byte, error) {
	var paths []string
	dirs := map[string]bool{}
	for p := range s.files {
		if p != path.Clean(p) || path.IsAbs(p) || strings.HasPrefix(p, "../") {
			return nil, fmt.Errorf("image path %q: want a clean relative path", p)
		}
		paths = append(paths, p)
		for d := path.Dir(p); d != "."; d = path.Dir(d) {
			if !dirs[d] {
				dirs[d] = true
				paths = append(paths, d+"/")
			}
		}
	}
	slices.Sort(paths)

	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.DefaultCompression)
	if err != nil {
		return nil, err
	}
	tw := tar.NewWriter(zw)
	mtime := s.created.UTC().Truncate(time.Second)
	for _, p := range paths {
		hdr := &tar.Header{Name: p, Mode: 0o755, ModTime: mtime, Format: tar.FormatUSTAR}
		if strings.HasSuffix(p, "/") {
			hdr.Typeflag = tar.TypeDir
			if err := tw.WriteHeader(hdr); err != nil {
				return nil, err
			}
			continue
		}
		data, err := os.ReadFile(s.files[p])
		if err != nil {
			return nil, err
		}
		hdr.Typeflag = tar.TypeReg
		hdr.Size = int64(len(data))
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// image is the OCI image: one layer on an empty base, the config and labels fixed.
func (s spec) image() (v1.Image, error) {
	compressed, err := s.layer()
	if err != nil {
		return nil, err
	}
	// The layer is compressed once, here; handed over compressed, it is never
	// recompressed for the digest or either output.
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(compressed)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	created := v1.Time{Time: s.created.UTC().Truncate(time.Second)}
	base, err := mutate.ConfigFile(empty.Image, &v1.ConfigFile{
		Architecture: s.arch,
		OS:           "linux",
		Created:      created,
		Config: v1.Config{
			Entrypoint: s.entrypoint,
			Cmd:        s.cmd,
			User:       s.user,
			Env:        []string{defaultEnv},
			WorkingDir: "/",
			Labels: map[string]string{
				"org.opencontainers.image.title":    s.title,
				"org.opencontainers.image.version":  s.version,
				"org.opencontainers.image.revision": s.revision,
				"org.opencontainers.image.source":   s.source,
				"org.opencontainers.image.licenses": license,
			},
		},
		RootFS: v1.RootFS{Type: "layers"},
	})
	if err != nil {
		return nil, err
	}
	var files []string
	for _, p := range slices.Sorted(maps.Keys(s.files)) {
		files = append(files, "/"+p)
	}
	img, err := mutate.Append(base, mutate.Addendum{
		Layer:     l,
		MediaType: types.OCILayer,
		History: v1.History{
			Created:   created,
			CreatedBy: "hack/image: " + strings.Join(files, " "),
		},
	})
	if err != nil {
		return nil, err
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	return mutate.ConfigMediaType(img, types.OCIConfigJSON), nil
}

// writeOCI writes img as an OCI layout directory holding only it, tagged for skopeo
// (org.opencontainers.image.ref.name) and containerd (io.containerd.image.name). An
// existing dir is replaced, but only if it is an OCI layout.
func writeOCI(dir string, img v1.Image, tag name.Tag) error {
	if err := removeLayout(dir); err != nil {
		return err
	}
	tmp := dir + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	p, err := layout.Write(tmp, empty.Index)
	if err != nil {
		return err
	}
	if err := p.WriteImage(img); err != nil {
		return err
	}
	// The descriptor is written out rather than taken from layout.AppendImage, which
	// gives an image an artifactType: some tools then take it for an artifact.
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	size, err := img.Size()
	if err != nil {
		return err
	}
	mt, err := img.MediaType()
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	err = p.AppendDescriptor(v1.Descriptor{
		MediaType: mt,
		Size:      size,
		Digest:    digest,
		Platform:  &v1.Platform{OS: cf.OS, Architecture: cf.Architecture},
		Annotations: map[string]string{
			"org.opencontainers.image.ref.name": tag.TagStr(),
			"io.containerd.image.name":          tag.Name(),
		},
	})
	if err != nil {
		return err
	}
	// Plain modes whatever the umask (the layout writer leaves some blobs 0600).
	err = filepath.WalkDir(tmp, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		mode := os.FileMode(0o644)
		if d.IsDir() {
			mode = 0o755
		}
		return os.Chmod(p, mode)
	})
	if err != nil {
		return err
	}
	return os.Rename(tmp, dir)
}

// removeLayout removes dir if it is an OCI layout (or absent); anything else is left
// alone and reported.
func removeLayout(dir string) error {
	entries, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if len(entries) > 0 {
		if _, err := os.Stat(filepath.Join(dir, "oci-layout")); err != nil {
			return fmt.Errorf("%s exists and is not an OCI layout: not replacing it", dir)
		}
	}
	return os.RemoveAll(dir)
}

// writeArchive writes the OCI layout in dir, plus a docker manifest.json naming the
// same blobs, as one tarball: the layout `docker save` writes since Docker 25. ctr images
// import and podman load read it as an OCI archive (the same digest as in a registry),
// older docker load reads manifest.json. Entries are sorted, owned by 0:0, dated mtime.
func writeArchive(file, dir string, img v1.Image, tag name.Tag, mtime time.Time) error {
	m, err := img.Manifest()
	if err != nil {
		return err
	}
	docker := tarball.Descriptor{
		Config:   "blobs/" + m.Config.Digest.Algorithm + "/" + m.Config.Digest.Hex,
		RepoTags: []string{tag.Name()},
	}
	for _, l := range m.Layers {
		docker.Layers = append(docker.Layers, "blobs/"+l.Digest.Algorithm+"/"+l.Digest.Hex)
	}
	dockerManifest, err := json.Marshal(tarball.Manifest{docker})
	if err != nil {
		return err
	}

	var names []string
	err = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			rel += "/"
		}
		names = append(names, rel)
		return nil
	})
	if err != nil {
		return err
	}
	names = append(names, "manifest.json")
	slices.Sort(names)

	tmp := file + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	defer f.Close()
	tw := tar.NewWriter(f)
	mtime = mtime.UTC().Truncate(time.Second)
	for _, n := range names {
		hdr := &tar.Header{Name: n, Mode: 0o644, ModTime: mtime, Format: tar.FormatUSTAR}
		if strings.HasSuffix(n, "/") {
			hdr.Typeflag, hdr.Mode = tar.TypeDir, 0o755
			if err := tw.WriteHeader(hdr); err != nil {
				return err
			}
			continue
		}
		var data []byte
		if n == "manifest.json" {
			data = dockerManifest
		} else if data, err = os.ReadFile(filepath.Join(dir, filepath.FromSlash(n))); err != nil {
			return err
		}
		hdr.Typeflag, hdr.Size = tar.TypeReg, int64(len(data))
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if _, err := tw.Write(data); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}
