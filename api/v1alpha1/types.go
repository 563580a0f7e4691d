package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Condition types and reasons written to status.conditions.
const (
	// ConditionAccepted is True when the object is valid and part of the
	// configuration; False with a reason and message saying what is wrong otherwise.
	ConditionAccepted = "Accepted"

	ReasonAccepted       = "Accepted"
	ReasonInvalid        = "Invalid"
	ReasonConflict       = "Conflict"
	ReasonUnknownProfile = "UnknownBFDProfile"
	ReasonSecretNotFound = "SecretNotFound"
	// ReasonNotSupported: valid, but not applied by this release.
	ReasonNotSupported = "NotSupported"
)

// The IPPool condition the controller writes, beside Accepted.
const (
	// ConditionVIPsOutside is True while services hold VIPs that the pool handed
	// out and no longer contains (it shrank under them): they keep them, and the
	// message names them. False with ReasonAllInside otherwise.
	ConditionVIPsOutside = "VIPsOutside"

	ReasonVIPsKept  = "VIPsKept"
	ReasonAllInside = "AllInside"
)

// Status is the status every object here has.
type Status struct {
	// Conditions: Accepted (True, or False with the reason).
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// IPPool is a set of addresses VIPs are handed out from, in one or both families.
// Its name is what the loxilb.io/poolSelect annotation names.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=slpool
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Addresses",type=string,JSONPath=`.spec.addresses`
// +kubebuilder:printcolumn:name="Auto",type=boolean,JSONPath=`.spec.autoAssign`
// +kubebuilder:printcolumn:name="Priority",type=integer,JSONPath=`.spec.serviceAllocation.priority`,priority=1
// +kubebuilder:printcolumn:name="Assigned IPv4",type=integer,JSONPath=`.status.assignedIPv4`
// +kubebuilder:printcolumn:name="Available IPv4",type=integer,JSONPath=`.status.availableIPv4`
// +kubebuilder:printcolumn:name="Assigned IPv6",type=integer,JSONPath=`.status.assignedIPv6`
// +kubebuilder:printcolumn:name="Available IPv6",type=integer,JSONPath=`.status.availableIPv6`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Outside",type=string,JSONPath=`.status.conditions[?(@.type=="VIPsOutside")].status`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type IPPool struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   IPPoolSpec   `json:"spec"`
	Status IPPoolStatus `json:"status,omitempty"`
}

// IPPoolStatus is what the pool holds, as the controller last wrote it, and its
// conditions: Accepted (every pod) and VIPsOutside (the controller). The counts are
// MetalLB's IPAddressPool status fields; an IPv6 pool larger than 2^63-1 addresses
// counts as 2^63-1 available.
type IPPoolStatus struct {
	// Conditions: Accepted (True, or False with the reason) and VIPsOutside.
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// AssignedIPv4 is the number of the pool's IPv4 addresses held by services.
	// +optional
	AssignedIPv4 int64 `json:"assignedIPv4"`
	// AvailableIPv4 is the number of its IPv4 addresses still free.
	// +optional
	AvailableIPv4 int64 `json:"availableIPv4"`
	// AssignedIPv6 is the number of the pool's IPv6 addresses held by services.
	// +optional
	AssignedIPv6 int64 `json:"assignedIPv6"`
	// AvailableIPv6 is the number of its IPv6 addresses still free.
	// +optional
	AvailableIPv6 int64 `json:"availableIPv6"`
	// Services is the number of services holding an address of the pool (above
	// the assigned addresses where services share them).
	// +optional
	Services int64 `json:"services"`
}

// IPPoolSpec is what an IPPool holds.
type IPPoolSpec struct {
	// Addresses are CIDRs ("192.168.80.0/24", "2001:db8::/120") or inclusive ranges
	// ("192.168.80.10-192.168.80.20"), of either family. A CIDR never yields its
	// network or broadcast address (IPv4 shorter than /31) nor the subnet-router
	// anycast address (IPv6 shorter than /127).
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=90
	// +kubebuilder:validation:items:XValidation:rule="self.contains('/') ? isCIDR(self) : (self.split('-').size() == 2 && isIP(self.split('-')[0]) && isIP(self.split('-')[1]))",message="an address entry must be a CIDR (192.168.80.0/24) or a range FIRST-LAST (192.168.80.10-192.168.80.20)"
	Addresses []string `json:"addresses"`

	// AutoAssign: false keeps the pool for services that name it
	// (loxilb.io/poolSelect) or ask for one of its addresses (loxilb.io/staticIP or
	// spec.loadBalancerIP).
	// +kubebuilder:default=true
	// +optional
	AutoAssign *bool `json:"autoAssign,omitempty"`

	// ServiceAllocation restricts which services get addresses from this pool.
	// +optional
	ServiceAllocation *ServiceAllocation `json:"serviceAllocation,omitempty"`
}

// ServiceAllocation says which services may use a pool, as MetalLB's: a service
// qualifies when its namespace is listed or matches a namespace selector (when
// either is given) and its labels match a service selector (when one is given). A
// service that names a pool or one of its addresses and does not qualify is refused.
type ServiceAllocation struct {
	// Priority orders pools that a service may use: lower first (1 is the highest);
	// 0 (unset) after all others.
	// +kubebuilder:validation:Minimum=0
	// +optional
	Priority int32 `json:"priority,omitempty"`
	// Namespaces whose services may use the pool.
	// +optional
	Namespaces []string `json:"namespaces,omitempty"`
	// NamespaceSelectors select namespaces by label; a service qualifies when its
	// namespace is listed or matches any selector.
	// +optional
	NamespaceSelectors []metav1.LabelSelector `json:"namespaceSelectors,omitempty"`
	// ServiceSelectors select services by label (any of them).
	// +optional
	ServiceSelectors []metav1.LabelSelector `json:"serviceSelectors,omitempty"`
}

// +kubebuilder:object:root=true

// IPPoolList is a list of IPPools.
type IPPoolList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []IPPool `json:"items"`
}

// BGPPeer is an upstream router the load-balancer pods keep a BGP session with.
// The local AS is the speaker's (--setBGP).
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=slpeer
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Address",type=string,JSONPath=`.spec.peerAddress`
// +kubebuilder:printcolumn:name="ASN",type=integer,JSONPath=`.spec.peerASN`
// +kubebuilder:printcolumn:name="BFD",type=string,JSONPath=`.spec.bfdProfile`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type BGPPeer struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   BGPPeerSpec `json:"spec"`
	Status Status      `json:"status,omitempty"`
}

// BGPPeerSpec is one router's session settings.
// +kubebuilder:validation:XValidation:rule="!has(self.keepaliveTime) || !has(self.holdTime) || duration(self.keepaliveTime) < duration(self.holdTime)",message="keepaliveTime must be below holdTime"
type BGPPeerSpec struct {
	// PeerAddress is the router's IPv4 or IPv6 address.
	// +kubebuilder:validation:MaxLength=45
	// +kubebuilder:validation:XValidation:rule="isIP(self)",message="peerAddress must be an IPv4 or IPv6 address"
	PeerAddress string `json:"peerAddress"`
	// PeerASN is the router's AS number (4-byte ASNs allowed; 0, 23456 and
	// 4294967295 are reserved).
	// +kubebuilder:validation:Format=int64
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=4294967294
	// +kubebuilder:validation:XValidation:rule="self != 23456",message="peerASN 23456 is AS_TRANS, reserved"
	PeerASN uint32 `json:"peerASN"`
	// PeerPort is the router's BGP port.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	// +kubebuilder:default=179
	// +optional
	PeerPort uint16 `json:"peerPort,omitempty"`
	// SourceAddress is the local address of the session; unset: the node's.
	// +kubebuilder:validation:MaxLength=45
	// +kubebuilder:validation:XValidation:rule="isIP(self)",message="sourceAddress must be an IPv4 or IPv6 address"
	// +optional
	SourceAddress string `json:"sourceAddress,omitempty"`
	// HoldTime proposed to the router (whole seconds, at least 3s); unset: the
	// speaker's (--bgpHoldTime).
	// +kubebuilder:validation:XValidation:rule="duration(self) >= duration('3s') && duration(self) <= duration('65535s')",message="holdTime must be 3s to 65535s"
	// +optional
	HoldTime *metav1.Duration `json:"holdTime,omitempty"`
	// KeepaliveTime; unset: the speaker's.
	// +kubebuilder:validation:XValidation:rule="duration(self) >= duration('1s')",message="keepaliveTime must be at least 1s"
	// +optional
	KeepaliveTime *metav1.Duration `json:"keepaliveTime,omitempty"`
	// PasswordSecret names a Secret of type kubernetes.io/basic-auth in shardlb's
	// namespace whose "password" key is the TCP MD5 password.
	// +optional
	PasswordSecret *SecretReference `json:"passwordSecret,omitempty"`
	// BFDProfile names a BFDProfile; unset: BFD as the speaker's flags say.
	// +kubebuilder:validation:MaxLength=253
	// +optional
	BFDProfile string `json:"bfdProfile,omitempty"`
	// EBGPMultiHop allows an eBGP router that is not directly connected.
	// +optional
	EBGPMultiHop bool `json:"ebgpMultiHop,omitempty"`
	// NodeSelectors choose the nodes that peer with this router (any selector
	// matching); none: every node.
	// +optional
	NodeSelectors []metav1.LabelSelector `json:"nodeSelectors,omitempty"`
}

// SecretReference names a Secret.
type SecretReference struct {
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
	// Namespace; unset: shardlb's own.
	// +optional
	Namespace string `json:"namespace,omitempty"`
}

// +kubebuilder:object:root=true

// BGPPeerList is a list of BGPPeers.
type BGPPeerList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []BGPPeer `json:"items"`
}

// BFDProfile is a set of BFD timers that BGPPeers refer to by name.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=slbfd
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Rx",type=integer,JSONPath=`.spec.receiveInterval`
// +kubebuilder:printcolumn:name="Tx",type=integer,JSONPath=`.spec.transmitInterval`
// +kubebuilder:printcolumn:name="Multiplier",type=integer,JSONPath=`.spec.detectMultiplier`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
type BFDProfile struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   BFDProfileSpec `json:"spec,omitempty"`
	Status Status         `json:"status,omitempty"`
}

// BFDProfileSpec holds BFD timers, in milliseconds as MetalLB's.
// +kubebuilder:validation:XValidation:rule="!has(self.echoMode) || !self.echoMode",message="echoMode is not supported: the embedded speaker's BFD has no echo function"
type BFDProfileSpec struct {
	// ReceiveInterval is the lowest interval, in ms, at which this side can
	// receive control packets.
	// +kubebuilder:validation:Minimum=10
	// +kubebuilder:validation:Maximum=60000
	// +kubebuilder:default=300
	// +optional
	ReceiveInterval *uint32 `json:"receiveInterval,omitempty"`
	// TransmitInterval is the lowest interval, in ms, at which this side wants to
	// send control packets.
	// +kubebuilder:validation:Minimum=10
	// +kubebuilder:validation:Maximum=60000
	// +kubebuilder:default=300
	// +optional
	TransmitInterval *uint32 `json:"transmitInterval,omitempty"`
	// DetectMultiplier is how many intervals without a packet make the session
	// down.
	// +kubebuilder:validation:Minimum=2
	// +kubebuilder:validation:Maximum=255
	// +kubebuilder:default=3
	// +optional
	DetectMultiplier *uint32 `json:"detectMultiplier,omitempty"`
	// EchoMode must stay off (see the rule above); the field exists so that a
	// MetalLB profile that sets it is refused with a reason, not silently.
	// +optional
	EchoMode *bool `json:"echoMode,omitempty"`
}

// +kubebuilder:object:root=true

// BFDProfileList is a list of BFDProfiles.
type BFDProfileList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []BFDProfile `json:"items"`
}

// BGPAdvertisement sets route attributes for the VIPs of some pools, toward some
// peers. Where several apply to one VIP and peer they combine: communities are
// unioned, and the highest LOCAL_PREF and the lowest MED of each role win.
// Communities toward every peer are announced; peers, localPref and med are
// validated but not yet announced (the object is refused as NotSupported).
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=sladv
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="Pools",type=string,JSONPath=`.spec.ipPools`
// +kubebuilder:printcolumn:name="Peers",type=string,JSONPath=`.spec.peers`
// +kubebuilder:printcolumn:name="Communities",type=string,JSONPath=`.spec.communities`
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
type BGPAdvertisement struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   BGPAdvertisementSpec `json:"spec,omitempty"`
	Status Status               `json:"status,omitempty"`
}

// BGPAdvertisementSpec says which VIPs and peers an advertisement applies to and
// which attributes it adds.
type BGPAdvertisementSpec struct {
	// IPPools names the pools whose VIPs it applies to. Neither IPPools nor
	// IPPoolSelectors: every pool.
	// +optional
	IPPools []string `json:"ipPools,omitempty"`
	// IPPoolSelectors select pools by label (any of them).
	// +optional
	IPPoolSelectors []metav1.LabelSelector `json:"ipPoolSelectors,omitempty"`
	// Peers names the BGPPeers it applies to; none: every peer.
	// +optional
	Peers []string `json:"peers,omitempty"`
	// Communities added to the routes: "ASN:VALUE" (16 bits each) or no-export,
	// no-advertise, no-export-subconfed, blackhole.
	// +kubebuilder:validation:MaxItems=32
	// +kubebuilder:validation:items:MaxLength=19
	// +kubebuilder:validation:items:Pattern=`^([0-9]{1,5}:[0-9]{1,5}|no-export|no-advertise|no-export-subconfed|blackhole)$`
	// +kubebuilder:validation:items:XValidation:rule="!self.contains(':') || self.split(':').all(x, int(x) <= 65535)",message="a community must be ASN:VALUE with both numbers 0-65535"
	// +optional
	Communities []string `json:"communities,omitempty"`
	// LargeCommunities added to the routes: "ASN:DATA1:DATA2" (32 bits each).
	// +kubebuilder:validation:MaxItems=32
	// +kubebuilder:validation:items:MaxLength=32
	// +kubebuilder:validation:items:Pattern=`^[0-9]{1,10}:[0-9]{1,10}:[0-9]{1,10}$`
	// +kubebuilder:validation:items:XValidation:rule="self.split(':').all(x, int(x) <= 4294967295)",message="a large community must be ASN:DATA1:DATA2 with each number 0-4294967295"
	// +optional
	LargeCommunities []string `json:"largeCommunities,omitempty"`
	// LocalPref sets LOCAL_PREF by role (iBGP peers only); unset: the speaker's.
	// +optional
	LocalPref *RoleValues `json:"localPref,omitempty"`
	// MED sets the MULTI_EXIT_DISC by role; unset: the speaker's.
	// +optional
	MED *RoleValues `json:"med,omitempty"`
}

// RoleValues holds one attribute's value per shard role; unset values keep the
// speaker's.
// +kubebuilder:validation:XValidation:rule="!has(self.master) || !has(self.backup) || self.master != self.backup",message="master and backup must differ, or routers cannot tell them apart"
type RoleValues struct {
	// +kubebuilder:validation:Format=int64
	// +kubebuilder:validation:Maximum=4294967295
	// +optional
	Master *uint32 `json:"master,omitempty"`
	// +kubebuilder:validation:Format=int64
	// +kubebuilder:validation:Maximum=4294967295
	// +optional
	Successor *uint32 `json:"successor,omitempty"`
	// +kubebuilder:validation:Format=int64
	// +kubebuilder:validation:Maximum=4294967295
	// +optional
	Backup *uint32 `json:"backup,omitempty"`
}

// +kubebuilder:object:root=true

// BGPAdvertisementList is a list of BGPAdvertisements.
type BGPAdvertisementList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []BGPAdvertisement `json:"items"`
}
