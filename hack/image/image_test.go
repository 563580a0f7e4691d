package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

const (
	testEpoch    = 1796300000 // SOURCE_DATE_EPOCH
	testVersion  = "v1.2.3-4-gabcdef0"
	testRevision = "abcdef0123456789abcdef0123456789abcdef01"
	testRef      = "ghcr.io/shardlb/shardlb:" + testVersion
)

// binaries are stand-ins for shardlb and gobgp: incompressible enough that the layer's
// compression does real work.
func binaries() (shardlb, gobgp []byte) {
	r := rand.New(rand.NewPCG(1, 2))
	shardlb, gobgp = make([]byte, 1<<20), make([]byte, 300<<10)
	for i := range shardlb {
		shardlb[i] = byte(r.UintN(16))
	}
	for i := range gobgp {
		gobgp[i] = byte(r.UintN(16))
	}
	return shardlb, gobgp
}

// build writes the binaries with the given mode and mtime under dir, runs the command as
// make image does and returns the OCI layout directory and the tarball.
func build(t *testing.T, dir string, mode os.FileMode, mtime time.Time, version string, shardlb, gobgp []byte) (ociDir, tarFile string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for file, data := range map[string][]byte{"shardlb": shardlb, "gobgp": gobgp} {
		p := filepath.Join(dir, file)
		if err := os.WriteFile(p, data, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	ociDir, tarFile = filepath.Join(dir, "oci"), filepath.Join(dir, "shardlb.tar")
	env := func(k string) string {
		if k == "SOURCE_DATE_EPOCH" {
			return strconv.Itoa(testEpoch)
		}
		return ""
	}
	var out bytes.Buffer
	err := run([]string{
		"-version", version, "-revision", testRevision, "-arch", "amd64",
		"-shardlb", filepath.Join(dir, "shardlb"), "-gobgp", filepath.Join(dir, "gobgp"),
		"-oci", ociDir, "-tar", tarFile,
	}, env, &out)
	if err != nil {
		t.Fatalf("image: %v", err)
	}
	return ociDir, tarFile
}

// readImage is the one image of an OCI layout, checked to be tagged ref.
func readImage(t *testing.T, ociDir, ref string) v1.Image {
	t.Helper()
	idx, err := layout.ImageIndexFromPath(ociDir)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("index.json lists %d manifests, want 1", len(im.Manifests))
	}
	d := im.Manifests[0]
	tag, err := name.NewTag(ref)
	if err != nil {
		t.Fatal(err)
	}
	wantAnn := map[string]string{"org.opencontainers.image.ref.name": tag.TagStr(), "io.containerd.image.name": ref}
	if !maps.Equal(d.Annotations, wantAnn) {
		t.Errorf("index.json annotations %v, want %v", d.Annotations, wantAnn)
	}
	if d.MediaType != types.OCIManifestSchema1 || d.ArtifactType != "" {
		t.Errorf("index.json: mediaType %q, artifactType %q; want an OCI image manifest, no artifactType", d.MediaType, d.ArtifactType)
	}
	if d.Platform == nil || d.Platform.OS != "linux" || d.Platform.Architecture != "amd64" {
		t.Errorf("index.json platform %v, want linux/amd64", d.Platform)
	}
	img, err := idx.Image(d.Digest)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func digest(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	h, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func TestTheSameInputsGiveTheSameImageWhateverTheFilesModesAndTimes(t *testing.T) {
	shardlb, gobgp := binaries()
	root := t.TempDir()
	oci1, tar1 := build(t, filepath.Join(root, "a"), 0o700, time.Now(), testVersion, shardlb, gobgp)
	oci2, tar2 := build(t, filepath.Join(root, "elsewhere", "b"), 0o755, time.Unix(1e9, 0), testVersion, shardlb, gobgp)

	if d1, d2 := digest(t, readImage(t, oci1, testRef)), digest(t, readImage(t, oci2, testRef)); d1 != d2 {
		t.Errorf("two builds of the same binaries: digests %s and %s", d1, d2)
	}
	b1, err := os.ReadFile(tar1)
	if err != nil {
		t.Fatal(err)
	}
	b2, err := os.ReadFile(tar2)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b1, b2) {
		t.Error("two builds of the same binaries: the tarballs differ")
	}
}

// The digest must follow what the image is made of, or the test above proves nothing.
func TestADifferentBinaryOrVersionGivesADifferentDigest(t *testing.T) {
	shardlb, gobgp := binaries()
	root := t.TempDir()
	oci, _ := build(t, filepath.Join(root, "base"), 0o755, time.Now(), testVersion, shardlb, gobgp)
	base := digest(t, readImage(t, oci, testRef))

	changed := slices.Clone(gobgp)
	changed[len(changed)/2]++
	oci, _ = build(t, filepath.Join(root, "gobgp"), 0o755, time.Now(), testVersion, shardlb, changed)
	if d := digest(t, readImage(t, oci, testRef)); d == base {
		t.Errorf("one byte of gobgp changed, the digest did not: %s", d)
	}
	oci, _ = build(t, filepath.Join(root, "version"), 0o755, time.Now(), "v9.9.9", shardlb, gobgp)
	if d := digest(t, readImage(t, oci, "ghcr.io/shardlb/shardlb:v9.9.9")); d == base {
		t.Errorf("another version, the same digest: %s", d)
	}
}

func TestTheImageRunsShardlbAsNonRootAndHoldsExactlyTheTwoBinaries(t *testing.T) {
	shardlb, gobgp := binaries()
	ociDir, tarFile := build(t, t.TempDir(), 0o700, time.Now(), testVersion, shardlb, gobgp)
	img := readImage(t, ociDir, testRef)

	if mt, err := img.MediaType(); err != nil || mt != types.OCIManifestSchema1 {
		t.Errorf("manifest media type %q (%v), want %q", mt, err, types.OCIManifestSchema1)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	c := cf.Config
	if !slices.Equal(c.Entrypoint, []string{"/usr/bin/shardlb"}) || !slices.Equal(c.Cmd, []string{"run"}) {
		t.Errorf("entrypoint %q cmd %q, want [/usr/bin/shardlb] [run]: the DaemonSet's args start with run", c.Entrypoint, c.Cmd)
	}
	if c.User != "65532:65532" {
		t.Errorf("user %q, want 65532:65532 (the DaemonSet sets uid 0 for the load balancer only)", c.User)
	}
	wantLabels := map[string]string{
		"org.opencontainers.image.title":    "shardlb",
		"org.opencontainers.image.version":  testVersion,
		"org.opencontainers.image.revision": testRevision,
		"org.opencontainers.image.source":   "https://github.com/shardlb/shardlb",
		"org.opencontainers.image.licenses": "Apache-2.0",
	}
	if !maps.Equal(c.Labels, wantLabels) {
		t.Errorf("labels %v, want %v", c.Labels, wantLabels)
	}
	epoch := time.Unix(testEpoch, 0).UTC()
	if cf.OS != "linux" || cf.Architecture != "amd64" || !cf.Created.Equal(epoch) {
		t.Errorf("config %s/%s created %v, want linux/amd64 created %v", cf.OS, cf.Architecture, cf.Created, epoch)
	}
	for _, h := range cf.History {
		if !h.Created.Equal(epoch) {
			t.Errorf("history %q created %v, want %v", h.CreatedBy, h.Created, epoch)
		}
	}

	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 {
		t.Fatalf("%d layers, want 1", len(layers))
	}
	if mt, _ := layers[0].MediaType(); mt != types.OCILayer {
		t.Errorf("layer media type %q, want %q", mt, types.OCILayer)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	type entry struct {
		typ      byte
		mode     int64
		uid, gid int
		mtime    time.Time
		data     string
	}
	want := map[string]entry{
		"usr/":            {tar.TypeDir, 0o755, 0, 0, epoch, ""},
		"usr/bin/":        {tar.TypeDir, 0o755, 0, 0, epoch, ""},
		"usr/bin/gobgp":   {tar.TypeReg, 0o755, 0, 0, epoch, string(gobgp)},
		"usr/bin/shardlb": {tar.TypeReg, 0o755, 0, 0, epoch, string(shardlb)},
	}
	got := map[string]entry{}
	var order []string
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		got[h.Name] = entry{h.Typeflag, h.Mode, h.Uid, h.Gid, h.ModTime.UTC(), string(data)}
		order = append(order, h.Name)
	}
	if !slices.IsSorted(order) {
		t.Errorf("layer entries %v, want them sorted", order)
	}
	names := slices.Sorted(maps.Keys(want))
	for n := range got {
		if _, ok := want[n]; !ok {
			names = append(names, n)
		}
	}
	for _, n := range names {
		g, w := got[n], want[n]
		if g != w {
			t.Errorf("layer entry %s: type %c mode %o owner %d:%d mtime %v, %d bytes; want type %c mode %o owner %d:%d mtime %v, %d bytes",
				n, g.typ, g.mode, g.uid, g.gid, g.mtime, len(g.data), w.typ, w.mode, w.uid, w.gid, w.mtime, len(w.data))
		}
	}

	// The tarball is the layout plus a docker manifest.json.
	files := tarFiles(t, tarFile)
	err = filepath.WalkDir(ociDir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(ociDir, p)
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if tf, ok := files[filepath.ToSlash(rel)]; !ok || !bytes.Equal(tf, data) {
			t.Errorf("tarball: %s missing or not the layout's", rel)
		}
		delete(files, filepath.ToSlash(rel))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := files["manifest.json"]; !ok || len(files) != 1 {
		t.Errorf("tarball holds %v besides the layout, want manifest.json only", slices.Sorted(maps.Keys(files)))
	}
	var m tarball.Manifest
	if err := json.Unmarshal(files["manifest.json"], &m); err != nil {
		t.Fatal(err)
	}
	if len(m) != 1 || !slices.Equal(m[0].RepoTags, []string{testRef}) {
		t.Errorf("manifest.json %+v, want one image tagged %s", m, testRef)
	}
	// Read as docker load reads it: through manifest.json, the same config and layer.
	dimg, err := tarball.ImageFromPath(tarFile, nil)
	if err != nil {
		t.Fatal(err)
	}
	dcfg, err := dimg.ConfigName()
	if err != nil {
		t.Fatal(err)
	}
	if cfg, _ := img.ConfigName(); dcfg != cfg {
		t.Errorf("manifest.json names config %s, the OCI manifest %s", dcfg, cfg)
	}
	dlayers, err := dimg.Layers()
	if err != nil || len(dlayers) != 1 {
		t.Fatalf("manifest.json: %d layers (%v), want 1", len(dlayers), err)
	}
	d1, err := dlayers[0].DiffID()
	if err != nil {
		t.Fatal(err)
	}
	if d2, _ := layers[0].DiffID(); d1 != d2 {
		t.Errorf("manifest.json's layer is %s, the OCI manifest's %s", d1, d2)
	}
}

func TestAnExistingDirectoryThatIsNoLayoutIsNotReplaced(t *testing.T) {
	shardlb, gobgp := binaries()
	dir := t.TempDir()
	for name, data := range map[string][]byte{"shardlb": shardlb, "gobgp": gobgp} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	keep := filepath.Join(dir, "src", "main.go")
	if err := os.MkdirAll(filepath.Dir(keep), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keep, []byte("package main\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := run([]string{"-version", testVersion, "-revision", testRevision,
		"-shardlb", filepath.Join(dir, "shardlb"), "-gobgp", filepath.Join(dir, "gobgp"), "-oci", filepath.Join(dir, "src")},
		func(string) string { return strconv.Itoa(testEpoch) }, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "not an OCI layout") {
		t.Errorf("-oci naming a source directory: err %v, want a refusal", err)
	}
	if _, err := os.Stat(keep); err != nil {
		t.Errorf("the directory's file is gone: %v", err)
	}
}

func tarFiles(t *testing.T, file string) map[string][]byte {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	files := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		if !h.ModTime.Equal(time.Unix(testEpoch, 0)) || h.Uid != 0 || h.Gid != 0 {
			t.Errorf("tarball entry %s: owner %d:%d, mtime %v; want 0:0, SOURCE_DATE_EPOCH", h.Name, h.Uid, h.Gid, h.ModTime)
		}
		if h.Typeflag == tar.TypeReg {
			if files[h.Name], err = io.ReadAll(tr); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func TestALabImageHoldsOnlyItsBinaryAndRunsIt(t *testing.T) {
	dir := t.TempDir()
	pause := filepath.Join(dir, "pause")
	if err := os.WriteFile(pause, []byte("a static pause"), 0o700); err != nil {
		t.Fatal(err)
	}
	env := func(k string) string {
		if k == "SOURCE_DATE_EPOCH" {
			return strconv.Itoa(testEpoch)
		}
		return ""
	}
	ociDir := filepath.Join(dir, "oci")
	err := run([]string{"-name", "lab.shardlb.io/pause", "-version", "v1", "-revision", testRevision, "-arch", "amd64",
		"-bin", "/usr/bin/pause=" + pause, "-oci", ociDir}, env, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	img := readImage(t, ociDir, "lab.shardlb.io/pause:v1")
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	c := cf.Config
	if !slices.Equal(c.Entrypoint, []string{"/usr/bin/pause"}) || len(c.Cmd) != 0 || c.User != "65532:65532" {
		t.Errorf("entrypoint %q cmd %q user %q, want [/usr/bin/pause] [] 65532:65532", c.Entrypoint, c.Cmd, c.User)
	}
	if title := c.Labels["org.opencontainers.image.title"]; title != "pause" {
		t.Errorf("title %q, want pause", title)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("%d layers (%v), want 1", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var names []string
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
	}
	if want := []string{"usr/", "usr/bin/", "usr/bin/pause"}; !slices.Equal(names, want) {
		t.Errorf("layer holds %q, want %q", names, want)
	}
}

func TestBinCannotBeMixedWithShardlbsBinaries(t *testing.T) {
	env := func(string) string { return strconv.Itoa(testEpoch) }
	err := run([]string{"-version", "v1", "-revision", testRevision, "-shardlb", "x", "-bin", "usr/bin/pause=y", "-tar", "z"}, env, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "without -shardlb") {
		t.Errorf("-bin with -shardlb: %v, want a refusal", err)
	}
	err = run([]string{"-version", "v1", "-revision", testRevision, "-bin", "pause", "-tar", "z"}, env, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "PATH=FILE") {
		t.Errorf("-bin without =FILE: %v, want a refusal", err)
	}
}
