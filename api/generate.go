// Package api holds shardlb's Kubernetes API types, one package per version.
package api

// The CRDs (manifest/crds, and the Helm chart's copy) and deep copies are generated
// from the Go types; make check-generate fails when they differ from what is committed.
//go:generate go tool controller-gen object paths=./... crd:crdVersions=v1 output:crd:artifacts:config=../manifest/crds
//go:generate go tool controller-gen crd:crdVersions=v1 paths=./... output:crd:artifacts:config=../charts/shardlb/crds
