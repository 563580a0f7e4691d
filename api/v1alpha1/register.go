package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the API group and version of every type here.
var GroupVersion = schema.GroupVersion{Group: "shardlb.io", Version: "v1alpha1"}

// Resources, as the dynamic client names them.
var (
	IPPools           = GroupVersion.WithResource("ippools")
	BGPPeers          = GroupVersion.WithResource("bgppeers")
	BFDProfiles       = GroupVersion.WithResource("bfdprofiles")
	BGPAdvertisements = GroupVersion.WithResource("bgpadvertisements")
)

// AddToScheme registers the types with a scheme.
func AddToScheme(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion,
		&IPPool{}, &IPPoolList{},
		&BGPPeer{}, &BGPPeerList{},
		&BFDProfile{}, &BFDProfileList{},
		&BGPAdvertisement{}, &BGPAdvertisementList{},
	)
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
