// Package v1alpha1 holds shardlb's configuration objects in the API group shardlb.io:
// IPPool, BGPPeer, BFDProfile and BGPAdvertisement, all cluster-scoped. The Go types
// are the source of truth; the CRDs (manifest/crds) and the deep copies are generated
// from them with controller-gen (make generate).
//
// The shapes follow MetalLB's (IPAddressPool, BGPPeer, BFDProfile, BGPAdvertisement)
// where a field means the same thing, so a migration is mostly a rename. The schema
// refuses what it can say alone (CIDR syntax, ASN range, intervals) through CEL rules,
// so kubectl apply fails with a clear message and no webhook runs; what needs several
// objects (overlapping pools, an unknown BFD profile) is reported on the object's
// status and as a Warning Event.
//
// +kubebuilder:object:generate=true
// +groupName=shardlb.io
package v1alpha1
