// Package manifest holds shardlb's deployable YAML (DaemonSet, ServiceAccount, RBAC and
// kustomization) and the guide's example Services and Pods, embedded so that the lab
// and the tests use exactly the files a user applies.
package manifest

import (
	"bytes"
	"embed"
	"fmt"
	"io/fs"
	"regexp"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

// FS holds the manifests: *.yaml at the top, the CRDs under crds/ (generated from
// api/), the guide's examples under examples/.
//
//go:embed *.yaml crds/*.yaml examples/*.yaml
var FS embed.FS

// docSeparator splits a multi-document YAML stream.
var docSeparator = regexp.MustCompile(`(?m)^---\s*$`)

// Decode parses a multi-document YAML stream into objects, skipping empty documents.
func Decode(data []byte) ([]*unstructured.Unstructured, error) {
	var objs []*unstructured.Unstructured
	for i, doc := range docSeparator.Split(string(data), -1) {
		if len(bytes.TrimSpace(stripComments([]byte(doc)))) == 0 {
			continue
		}
		var m map[string]any
		if err := yaml.Unmarshal([]byte(doc), &m); err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		u := &unstructured.Unstructured{Object: m}
		if u.GetAPIVersion() == "" || u.GetKind() == "" {
			return nil, fmt.Errorf("document %d: apiVersion and kind are required", i)
		}
		objs = append(objs, u)
	}
	return objs, nil
}

// File decodes one embedded file.
func File(name string) ([]*unstructured.Unstructured, error) {
	data, err := fs.ReadFile(FS, name)
	if err != nil {
		return nil, err
	}
	objs, err := Decode(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return objs, nil
}

// Examples decodes the guide's example files, in order (tcp-lb, then tcp-lb2).
func Examples() ([]*unstructured.Unstructured, error) {
	names, err := fs.Glob(FS, "examples/*.yaml")
	if err != nil {
		return nil, err
	}
	var all []*unstructured.Unstructured
	for _, n := range names {
		objs, err := File(n)
		if err != nil {
			return nil, err
		}
		all = append(all, objs...)
	}
	return all, nil
}

func stripComments(doc []byte) []byte {
	var out []byte
	for _, line := range bytes.Split(doc, []byte("\n")) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			out = append(out, line...)
			out = append(out, '\n')
		}
	}
	return out
}
