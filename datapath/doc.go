// Package datapath loads shardlb's eBPF load balancer and programs it: services keyed by
// (VIP, port, protocol), Maglev rings computed in Go, conntrack in both directions, the
// default, onearm and fullnat NAT modes and direct server return (dsr) to the
// endpoint's node, for IPv4 and IPv6.
//
// # Hooks, kernels and other programs
//
// The program runs at the ingress of each of Config.Interfaces (New fails with
// ErrNoInterface, naming every missing one, before loading anything), at one of two
// hooks chosen by Config.AttachMode; New logs which one and why. SetInterfaces changes
// the set later, declaratively (attach the new, detach the gone, move a renamed one's
// pin), and FollowInterfaces keeps it equal to what patterns match as links come, go
// and are renamed (a CNI bridge created after start, a routed CNI's per-pod veths),
// with the decision in MatchInterfaces:
//
//   - tcx: a bpf_link per interface, no qdisc. Linux 6.6 or later. AttachAuto (the
//     default) takes it when the kernel has it, probed by asking for a tcx link on an
//     interface index no interface has: a kernel with tcx answers ENODEV.
//   - tc: a direct-action bpf filter on the interface's clsact qdisc, which is added
//     when the interface has none (an existing clsact or ingress qdisc is used as it
//     is). AttachAuto takes it when the kernel has no tcx; AttachTC forces it on any
//     kernel (the tests run it on one with tcx).
//
// The program itself runs from Linux 5.15 at the tc hook (see Kernels): tc mode serves
// kernels 5.15 to 6.5.
//
// Verdicts mean the same at both hooks (TC_ACT_UNSPEC, OK, SHOT, REDIRECT are TCX_NEXT,
// PASS, DROP, REDIRECT). A packet that is none of the program's business (not to a VIP,
// not of a tracked flow, not an ICMP error about one, not for this host) passes on
// untouched with TC_ACT_UNSPEC, so whatever runs after the program still sees it: later
// tcx programs and every clsact filter at tcx, later filters in tc mode. A packet the
// program translated, redirected or dropped gets a final verdict (TC_ACT_OK for one
// left to the kernel's forwarding): no later program sees a packet rewritten toward an
// endpoint as if it had arrived so. TestRealTraffic checks, at both hooks, that a
// filter after the program still counts traffic to the node's own address.
//
// At tcx the link goes after the programs already attached. In tc mode the filter has
// priority 2 and handle 0x5b1b, for every protocol, named "shardlb"; lower priorities
// run first. Priority 1 is left to what must run before a load balancer (a firewall, a
// DDoS filter); it is also what Cilium's tc programs take by default on kernels without
// tcx, and a filter there that ends VIP packets or endpoint replies with TC_ACT_OK hides
// them from the program: New logs a warning naming every filter at a lower priority
// (with Cilium, set its bpf-filter-priority above 2). A priority of its own rather than
// a shared one: the kernel runs the filters of one priority newest first, so the order
// would depend on who attached last, and another party's "tc filter del ... pref N"
// would take shardlb's filter with its own. Another party's bpf filter for every
// protocol may still share priority 2 under another handle; a filter of another kind or
// protocol there, or another party's filter at handle 0x5b1b, makes New fail naming it.
// shardlb knows its filter by priority, handle, filter name and program name
// (lb_ingress), and only ever replaces or removes that one; it removes the clsact qdisc
// only when it added it and no filter is left on it in either direction.
//
// # Kernels
//
// The program is compiled twice from the same C (gen.go), and New loads one variant:
//
//   - kfunc (lb_bpfel.o): reads the skb's checksum state, ip_summed, through the
//     bpf_cast_to_kern_ctx kfunc (Linux 6.2) and CO-RE, which needs the kernel's BTF
//     (/sys/kernel/btf/vmlinux). The verifier turns the cast into a register move.
//   - compat (lbcompat_bpfel.o, built with -DSHARDLB_NO_KERN_CTX): asks the kernel
//     instead (csum_partial in bpf/nat.h). bpf_l4_csum_replace without
//     BPF_F_PSEUDO_HDR changes a checksum field for a change of the bytes under it in
//     every checksum state but CHECKSUM_PARTIAL, where those bytes are summed later
//     and the field is left alone (inet_proto_csum_replace4, net/core/utils.c). The
//     program points it at the packet's first two bytes (the destination MAC, under no
//     checksum and not in skb->csum) and puts them back when they moved: one helper
//     call tells CHECKSUM_PARTIAL from the other states, and the rewrite then does what
//     the kfunc variant does in each state (see Offloads), byte for byte. The dsr MSS
//     clamp lets bpf_l4_csum_replace apply its change as the state asks. Nothing is
//     handled less exactly than in the kfunc variant; the cost is the helper call
//     (BenchmarkTestRun's -compat rows, against the kfunc rows of the same rounds:
//     established and return-path packets 1.10x to 1.14x, 4 to 6 ns more; new flows
//     1.03x) and, since the helper may move the packet, its pointers taken again
//     after it. It needs no kernel BTF and no kfunc.
//
// New takes the kfunc variant when the kernel's BTF has bpf_cast_to_kern_ctx, and the
// compat variant when it has no BTF or no such kfunc, or when the kernel refuses the
// kfunc variant (a warning names the error). It logs one line, "datapath program
// variant chosen", with the variant and the reason. When the kernel refuses the
// variant it tried last, New fails with one line naming the kernel's release and the
// minimum, "load datapath program: Linux 5.10.0 refused it (shardlb needs Linux 5.15 or
// later; compat variant: ...)", with the verifier's last line; the verifier's whole
// log is logged at debug level only. Config's unexported variant forces one variant:
// the tests run the test-run fixtures and the traffic tests (TestFixtures,
// TestDSRFixtures, TestICMPErrors, TestTooBigAnswered, TestRealTraffic,
// TestOffloadedPackets, TestPathMTUThroughTheVIP) with each, on a kernel that has the
// kfunc.
//
// What each helper and kfunc the program calls needs, at a tc (sched_cls) program;
// TestKernelTableMatchesTheObjects reads the calls from both compiled objects and
// fails on a call this table does not list for its variant, on a row no variant
// calls, on a compat call newer than 5.15, and on a kfunc or CO-RE relocation in the
// compat variant:
//
//	helper or kfunc        Linux  variant  used for
//	bpf_map_lookup_elem    3.19   both     every map read
//	bpf_map_update_elem    3.19   both     conntrack entries, SNAT ports
//	bpf_map_delete_elem    3.19   both     an expired flow's entries when its SNAT port is taken
//	bpf_l4_csum_replace    4.1    compat   the checksum state, the dsr MSS clamp's checksum
//	bpf_redirect           4.4    both     sending a packet to its next hop
//	bpf_skb_change_tail    4.9    both     cutting a packet down into a "too big" answer
//	bpf_csum_update        4.9    both     a CHECKSUM_COMPLETE skb's csum
//	bpf_skb_adjust_room    5.2    both     dsr's outer header (the helper is 4.13; BPF_ADJ_ROOM_MAC and the ENCAP_L3 and FIXED_GSO flags 5.2)
//	bpf_jiffies64          5.5    both     conntrack ages, the next-hop caches' age
//	bpf_redirect_neigh     5.10   both     a next hop whose neighbour is not resolved (with its address, as 5.10 released it)
//	bpf_fib_lookup         5.12   both     the next hop (the helper is 4.18; mtu_result, the MTU of GSO packets' routes and of "too big" answers, 5.12)
//	bpf_cast_to_kern_ctx   6.2    kfunc    reading ip_summed (a kfunc, with CO-RE)
//
// Other features either variant needs: a direct-action bpf filter on clsact (4.5),
// direct packet access (4.7), LRU hash maps (4.10) and LPM tries (4.11), BPF-to-BPF
// calls (4.16), the ALU32 and JMP32 instructions of -mcpu=v3 (5.1), global variables
// set at load (snat_port_min and the others: 5.2), __sk_buff's gso_size (5.7); tcx
// (6.6) only at that hook. So 5.12 is the newest need and 5.15 the stated minimum,
// the oldest kernel of the distributions shardlb is aimed at (Ubuntu 22.04; Debian
// 12's 6.1 gets the compat variant too; RHEL 9's 5.14 carries backports of later BPF
// and is not refused by version: New tries it, as it tries any kernel).
// A verifier older than 6.18's may still refuse what this one accepts (an older one
// tracks fewer bounds): that the compat variant loads was shown only here, on 6.18
// with the variant forced, not on a 5.15 kernel.
//
// # Forwarding
//
// The program rewrites packets with direct packet access and incremental checksums,
// then looks the rewritten packet's next hop up with bpf_fib_lookup and redirects it
// (bpf_redirect with the neighbour's MAC, or bpf_redirect_neigh when the neighbour is
// not resolved yet); when the lookup fails, or the TTL would expire, the rewritten
// packet goes to the kernel's own forwarding. This
// was measured on veth (lab notes): XDP pays a copy per packet on veth, and handing
// packets back to the kernel's forwarding path costs more than the whole translation,
// while tcx plus route lookup plus redirect used the least CPU per packet. Packets
// redirected here skip netfilter and the kernel's conntrack; the LB namespace must
// still have forwarding enabled (bpf_fib_lookup refuses otherwise).
//
// The route lookup was also the costliest step of an established flow's packet (about
// half of it), so each conntrack entry caches its direction's answer (egress device and
// MACs) and packets reuse it while it is younger than 64 jiffies (256 ms at HZ=250),
// arrive on the device it was looked up for, and are no longer than the packet whose
// MTU the lookup checked; anything else looks the route up again.
//
// A new flow has no entry yet, but its endpoint usually had a new flow a moment ago:
// each CPU keeps the next hop of every endpoint's latest new flow (endpoint_nhs, 4096
// slots by endpoint id, 224 KiB per CPU) and a new flow takes it under the same
// conditions plus the same endpoint (id and generation) and the same source address.
// It keeps the lookup's time, so no answer is used longer than 64 jiffies after its
// lookup. The route lookup was about 40 ns of a new flow's 290. The cache assumes what
// a lookup's answer depends on is the destination (the endpoint), the source address
// and the ingress device (the lookup is made without mark or TOS); the protocol and
// destination port are the endpoint's too, but the source port is not compared: policy
// routing by source port (ip rule sport) reaches a new flow only once the answer of
// another flow to the same endpoint is older than 64 jiffies. It is per CPU so that an
// answer is never read while another CPU writes it: a torn answer would be cached by
// the flow for 64 jiffies.
//
// # Cost of a packet
//
// BenchmarkTestRun times the program in the kernel (BPF_PROG_TEST_RUN, ns per packet)
// on a 2-core paravirtual guest whose two CPUs run at different speeds and whose speed
// drifts by the minute: its rows run in 15 alternating rounds on one pinned CPU and
// each reports its median round. Ranges over quiet runs (when the host is busy,
// everything is slower and the program more so: established about 4x):
//
//	baseline (empty program)    14-15
//	established                 39-46   (2.8x-3.2x)
//	return path                 39-44
//	unknown VIP                 31-35
//	new flow                    217-239 (15x-16x)
//
// Three changes took established packets down, each measured against the code before
// it in alternating runs: IPv4 conntrack keys of 12 bytes, with TCP and UDP in a map
// each (-4 to -5 ns: the kernel hashes 16 bytes in two jhash rounds, 12 in one; unknown
// VIPs -7); every map helper call keeping a single map (clang had merged the TCP and
// UDP calls into one call on either map, which the verifier cannot inline: +9 ns;
// TestMapCallsHaveOneMap guards it); and an inlined path for tracked flows whose next
// hop is cached (forward_cached, -2.5 ns: no BPF-to-BPF call and frame), for which a
// new flow's entry moved from the stack to a per-CPU map value (new_entry). What is
// left of an established packet is mostly the kernel's hash lookup (hash, bucket walk,
// key compare: about 40% of the time in the program, by perf) and the rewrite.
//
// A new flow stays far above 5x the baseline because of kernel hash-map work no program
// change removes (removing each step in turn, medians): the conntrack lookup that misses
// costs about 40 ns (a cold bucket), inserting the reply entry about 70 (another cold
// bucket, an LRU node, two IRQ-saving locks, which are costly on this guest), inserting
// the forward entry 45 to 60 (its bucket warm from the lookup); the rest, from parsing
// to the redirect, is about 70 with the test run's own 15. perf puts about a third of a
// new flow's time in this guest's paravirtual interrupt re-enabling (pvm_irq_enable)
// when the inserts release their IRQ-saving locks, one instruction on bare metal. The
// entry's size counts too: a 64-byte IPv4 entry (4-byte addresses; one cache line instead of 96 bytes) was
// built and measured against the same code with the entry padded back to 96 bytes:
// no difference in this benchmark, whose entries stay in cache, while the per-family
// code the verifier then needed made established packets 1 to 2 ns slower; it would
// save 10 MiB of the maps for 10,000 services and may pay under cold caches, which
// needs a benchmark cycling through many flows to show. Measured and not kept:
// BPF_F_NO_COMMON_LRU changed nothing measurable (the common LRU already takes nodes
// from a per-CPU list, refilled 128 at a time under the shared lock) while it would
// split the capacity per CPU (a CPU taking most new flows would evict at
// ConntrackSize/ncpu); a plain preallocated hash map inserts 10 to 15 ns faster but
// refuses new flows when full, where the LRU evicts; not zeroing the new entry saved
// nothing measurable. The flow hash is not a candidate: every node must compute the
// same one.
//
// # Maps and updates
//
// SetServices is declarative. Endpoint ids are kept while an endpoint stays, so
// established flows (conntrack stores the id and its generation) keep their endpoint
// when others are added; a removed endpoint's id is invalidated and its flows are
// balanced again on their next packet. A changed service gets its endpoints and a new
// ring range written first; only then its service entry, atomically replaced, points at
// them, and old ranges are released at the end of the call.
//
// The maps are sized at load by Config (DefaultConfig has the defaults): MaxServices
// frontends, MaxEndpoints endpoints and ConntrackSize entries per conntrack map, the
// ring slots derived from the first two (RingSlotsFor). A frontend that does not fit is
// refused with an error naming the shardlb flag to raise (errServicesFull,
// errEndpointsFull, errRingFull), the others applied; what a removed frontend frees is
// free for the next call. EstimateMemory says what the maps take on a node of a given
// number of CPUs, and New logs it.
//
// # Source ranges
//
// A frontend with source ranges (shard.Frontend.SourceRanges, a Service's
// loadBalancerSourceRanges) lets through only clients in one of its prefixes. Packets
// of other clients to its VIP, port and protocol are dropped, not passed on (the kernel
// would forward or answer them), and counted for the frontend
// (ServiceStats.SourceRangeDrops). A frontend without ranges pays nothing: its service
// entry's flag (SVC_SOURCE_RANGES) is clear and the check is skipped.
//
// The prefixes are in two longest-prefix-match tries, source_ranges4 and
// source_ranges6, keyed by (service id, prefix): the service id is part of every
// entry's prefix length, so one lookup with the client's full address finds the
// longest of that frontend's prefixes holding it, whatever the number of prefixes and
// frontends. Every packet of a restricted frontend without a conntrack entry pays that
// lookup: new flows, TCP segments that would be handed off (checked before, or the
// previous master would let them through) and flows balanced again because their
// endpoint went away. In BenchmarkTestRun a new flow through 16 prefixes costs about
// 37 ns more (new-flow-ranges against new-flow): the trie lookup is a helper call that
// walks the trie, which the verifier does not inline.
//
// Only prefixes of the VIP's family are written: a Service's list holds both families,
// and each VIP sees clients of its own. A frontend whose ranges are all of the other
// family is still restricted and lets no client through: a list written to restrict
// access is not read as no restriction. Prefixes are normalized (host bits cleared,
// IPv4-mapped IPv6 prefixes as IPv4, duplicates dropped). SetServices refuses a
// frontend, with its usual per-frontend error and without touching the others, when a
// prefix is not valid, when the VIP's family has more than Config.MaxSourceRanges
// prefixes, or when they do not fit in Config.SourceRangeEntries (per family); a
// frontend refused so is removed if it was applied, never left serving with fewer
// restrictions than it asks for. Each trie has MaxSourceRanges entries more than
// SourceRangeEntries, because a frontend's new prefixes are written before its old
// ones are removed.
//
// A change of the ranges reaches new connections at once and established flows on
// their next packet. The service entry carries a generation of its ranges, bumped on
// each change, and its endpoint entries carry it too once the change is complete. A
// tracked flow records the generation it was checked under; a packet whose flow's
// generation differs from its endpoint's (the endpoint entry is read for every packet
// anyway) checks its client again, once, and records the verdict in both of the
// flow's entries. So a client no longer listed loses its established connections
// (its endpoint's replies are dropped from the client's next packet on), and gets them
// back with their translation when it is listed again. The writes are ordered so that
// a client both the old and the new ranges allow is never refused, and a flow checked
// during a change is checked again after it: new prefixes first, then the old ones
// removed while the frontend stays restricted, then the service entry, then its
// endpoints' generation; a frontend that loses its ranges has its flag cleared before
// its prefixes are removed. Measured against the code before source ranges (8
// alternating runs of BenchmarkTestRun, medians of the ratio to the baseline of the
// same run): established packets 2.84x before, 2.85x with the generation compared,
// whether or not the flow's frontend has ranges, and 2.81x with no check at all after
// a flow's first packet; looking the client up on every packet of a restricted
// frontend's established flows took 4.6x (about 29 ns more), over the 3x target.
//
// ICMP errors about a tracked flow are translated without a look at the ranges.
//
// # Restarts: the datapath outlives the process
//
// With Config.PinPath (on bpffs, for example /sys/fs/bpf/shardlb; New fails with
// ErrNotBPFFS otherwise) the state is pinned: PinPath/maps/ holds services, vips,
// ring_slots, endpoints, source_ranges4 and source_ranges6, the three conntrack maps,
// service_stats and drops, plus
// layout, a small map recording each one's layout digest; PinPath/links/IFNAME holds
// the tcx link of each interface, which keeps the program attached; in tc mode
// PinPath/tc/IFNAME records the filter of each interface instead (see below). The per-CPU
// scratch entry and next-hop cache (new_entry, endpoint_nhs) belong to one program and
// are not pinned. One Datapath at a time holds a pin path (an flock on the directory;
// another New or a Cleanup gets ErrPinPathInUse).
//
// A New with the same PinPath adopts the pinned maps when every one of them is there
// with the same type, key and value size, flags and number of entries (so the same
// ConntrackSize, MaxServices, MaxEndpoints and RingSlots), the same layout digest
// (layoutVersion, the map's name and type, and its key and value types member by
// member: names, offsets, types; bump layoutVersion when a map's meaning changes
// while its C types do not), no map pinned that this program does not use, and a
// consistent content (rings that do not overlap, every ring slot a valid endpoint of
// one frontend). Otherwise it logs one warning, "datapath replaces incompatible pinned
// maps", whose reason names each map and what differs (for example "map
// conntrack4_tcp: MaxEntries: 262144 changed to 524288 (Config.ConntrackSize)"),
// removes the map pins and starts with new maps: tracked flows are then balanced anew
// on their next packet. Maps pinned by a shardlb without source ranges are such a
// case: they lack the two tries (the reason says "map source_ranges4 is not pinned")
// and their services, endpoints, conntrack entries and counters have another layout.
//
// Adoption rebuilds the Go side from the maps: each service entry becomes an applied
// frontend with its service id and ring range, its endpoints are the distinct ids in
// its ring with the addresses those ids hold, its source ranges are its flag and the
// prefixes the tries hold for its id, and the allocators hand out only what no
// frontend uses. Endpoint ids and generations are kept, so conntrack entries (which
// store both) still name their endpoint, and the first SetServices with the same
// frontends writes nothing. Service names are not in the maps; that call supplies
// them. A frontend this program would write differently (another Maglev table, another
// node address for onearm) is written again by the next SetServices, keeping its ids.
// What an interrupted SetServices left is completed: valid endpoints no ring points to
// are invalidated, the vips map is made to match the services, prefixes of no
// restricted frontend are removed and endpoints get their frontend's range generation.
//
// Whether the maps were adopted or replaced, a link pinned for a configured interface
// that the interface still lists among its tcx attachments (checked by link id, inside
// Config.NetNS) gets the new program through BPF_LINK_UPDATE: the swap is atomic, so no
// packet meets the interface without a program. Other configured interfaces are
// attached and their links pinned; pins of links whose interface went away are
// dropped; links pinned for interfaces no longer in Config.Interfaces are detached.
//
// In tc mode the filter needs no pin to stay attached: it holds the program. The pin
// path records each filter instead (PinPath/tc/IFNAME, a one-entry map: interface
// index, priority, handle, whether shardlb added the clsact qdisc, and the network
// namespace by path, device and inode) for the next process and for Cleanup. A New
// with the same PinPath finds its filter on each configured interface and replaces the
// program in it with a netlink replace: atomic as BPF_LINK_UPDATE is, with no second
// filter and no moment without a program (TestTCPinnedDatapathTraffic watches
// rtnetlink for a deletion). Release leaves the filters attached, Close removes them,
// Cleanup removes them in the namespace recorded. When the attach mode changed between
// two processes, the new one attaches at its hook first, then removes what the old one
// left at the other. Without a PinPath a filter still outlives a killed process, with
// the state it had: the next New replaces the program in it, or removes it when it
// attaches at tcx.
//
// Three ways to end. Close detaches and removes everything pinned: a real stop.
// Release closes the process's descriptors and leaves the pins: the program keeps
// forwarding with the services last set, and no process at all, until the next New
// adopts it. Cleanup(pinPath) is the uninstall (shardlb cleanup) after a Release:
// it detaches each pinned link with BPF_LINK_DETACH (only dropping the pin releases the
// link from a kernel work queue, and the program was seen still attached right after),
// removes each recorded tc filter (entering the namespace recorded by path; a record
// of the caller's namespace made without a path must be cleaned up from there), then
// unpins the maps and removes the directories; files it did not create are left.
// bpffs lives in memory, so nothing survives a reboot; in a pod, PinPath must be on
// the host's bpffs (a hostPath mount of /sys/fs/bpf), or the pins go with the pod.
//
// # Flow handoff
//
// A service in onearm or fullnat mode may name its previous master
// (shard.Frontend.Handoff) after a planned switch. A TCP segment that is not a SYN and
// has no conntrack entry is then sent to that address instead of being balanced: a
// route lookup must find it on a directly connected network (bpf_fib_lookup gives back
// the address itself, not a gateway), the TTL is decremented (the IPv4 checksum
// adjusted as routers do), the MACs rewritten and the packet redirected; a missing
// neighbour goes through bpf_redirect_neigh. The previous master, which still has the
// flow, translates it as usual and its endpoint answers it, so nothing in flight is
// reset. When the peer is behind a router, unreachable, or the TTL is spent, the
// segment is balanced here as without handoff. SYNs and UDP are always balanced here,
// default mode never hands off (the endpoint sees the client, and Maglev picks the
// same endpoint on every node). A changed handoff rewrites only the service entry.
// Handed-off segments are counted per service (ServiceStats.HandoffPackets).
//
// # ICMP errors
//
// A router that cannot deliver a translated packet answers its translated source: the
// VIP for a reply, the node (onearm) or the VIP (fullnat) for a request, the client
// behind a default-mode request. Such an error (ICMP destination unreachable, time
// exceeded, parameter problem; ICMPv6 also packet too big) is translated back when it
// quotes a packet of a tracked flow: the quoted packet becomes the one its sender sent
// (addresses, ports, the quoted IPv4 header checksum and, when quoted, the TCP or UDP
// checksum), the error goes to that sender (endpoint or client) with its checksums
// fixed and one TTL less, through a route lookup. Path MTU discovery therefore works
// through the load balancer: a server whose replies are too big for a client's path
// learns it from "fragmentation needed" sent to the VIP (TestPathMTUThroughTheVIP:
// a 256 KiB download over a path with a 1280-byte link completes in default and onearm
// mode, and stalls without the translation). Errors are counted per
// service (ServiceStats.ICMPErrors). An error whose destination is not the quoted
// packet's source, that quotes no tracked flow, whose outer or quoted IP header has
// options or extension headers, or that has no route passes untouched.
//
// When this node's own next hop is the smallest link (the route lookup answers
// FRAG_NEEDED for a tracked flow's packet that must not be fragmented: IPv4 with DF,
// any IPv6), the kernel's answer would go to the translated source. The program
// answers instead, as a router does: the packet, still as its sender sent it, is cut
// down and rewritten in place into "fragmentation needed" or "packet too big" with the
// next hop's MTU, from its destination to its sender, quoting its first bytes, and sent
// back out where it came in (icmp4_too_big, icmp6_too_big; counted with the ICMP
// errors). A GSO packet is checked per segment by the kernel instead, and a
// CHECKSUM_PARTIAL one is left to the kernel as before (its checksum offsets would point
// into the answer). TestPathMTUThroughTheVIP covers both places of the small link.
//
// # Direct server return (dsr)
//
// In dsr the state a connection needs lives on its endpoint's node, never on the node
// the router sent the client's packets to, so that any load-balancing node can be lost
// (crash, link cut, program gone) without losing a connection and without copying
// state between nodes. Every node still programs every dsr frontend; what a node does
// with a packet depends on where the endpoint runs (shard.Endpoint.Node, written into
// its endpoint entry; dsr.h):
//
//   - The node a client's packet reaches picks the endpoint as in the other modes (the
//     Maglev table, the same on every node). An endpoint on another node gets the
//     packet unchanged inside one outer IP header, from this node's address
//     (Config.NodeIPv4 or NodeIPv6, the VIP's family) to the endpoint's node, added by
//     bpf_skb_adjust_room with the ENCAP_L3 flags, routed by bpf_fib_lookup and
//     redirected as translated packets are. The flow gets a CT_ENCAP entry (endpoint,
//     outer addresses, cached next hop), so that it keeps its endpoint through changes
//     of the service's endpoints while it stays on this node. That entry is a cache:
//     another node computes the same from the same table.
//   - The endpoint's node strips the outer header of an IP-in-IP packet whose outer
//     destination is its own address and whose inner packet is for a dsr frontend,
//     and handles the inner packet as if it had come directly: its conntrack entry,
//     else the same Maglev pick, the VIP translated to the endpoint with the client's
//     address kept, and a reply entry. A decapsulated new flow whose pick is an
//     endpoint on yet another node (the two nodes' tables differ for the moment of an
//     update) is dropped and counted (drop reason dsr_misdirected), never sent on
//     again: nothing loops.
//   - The endpoint's reply is translated back to come from the VIP and its port by
//     that reply entry and leaves by this node's own route to the client, never
//     through the load-balancing node.
//   - An endpoint on the node the client's packet reached is served as in default
//     mode, without encapsulation.
//
// Because the endpoint's node picks the endpoint again, dsr takes only selections
// every node computes alike: hash and persist (rr is refused with the frontend). A dsr
// endpoint without a node address of the VIP's family is refused with its frontend
// too: its node runs no shardlb that would strip the header.
//
// The encapsulation is IP in IP (IPv4 in IPv4, protocol 4; IPv6 in IPv6, protocol 41),
// not GUE or FOU (UDP): it costs the least (20 and 40 bytes, against 28 and 48 for
// FOU, 32 and 52 for GUE), the kernel segments it (SKB_GSO_IPXIP4/6, which
// bpf_skb_adjust_room sets, so GSO packets shrink their segments by the header), no
// port has to be chosen, opened or kept from other uses, and the kernel needs no
// tunnel module (the program adds and strips the header; kernels without ipip or fou
// work alike). What UDP would add is entropy for routers' ECMP and NICs' receive-side
// scaling on the endpoint's node, which hash IPv4-in-IPv4 packets on the outer
// addresses only on many NICs: all of one load-balancing node's flows to one
// endpoint's node then take one path and one receive queue there. The IPv6 outer
// header carries the flow hash as its flow label, which newer routers and NICs hash.
// It is Katran's default encapsulation too.
//
// What the network must accept: replies from the VIP leaving every node that runs an
// endpoint (no strict reverse-path filter for VIP sources on the first router: loose
// or none), and IP protocol 4 or 41 between nodes. The outer header takes 20 (40)
// bytes of the path's MTU: the endpoint's node lowers the MSS of the SYN-ACK its
// endpoint sends through a dsr VIP by that much (an MSS option in first place, as
// Linux, BSD and Windows send it), so the client's segments fit once encapsulated;
// a packet that still does not fit and must not be fragmented is answered by the
// load-balancing node with "fragmentation needed" / "packet too big" from the VIP, for
// the next hop's MTU less the outer header (TestDSRRoutedFixtures). A UDP datagram
// that fits only without the header, without DF, is left to the kernel, which
// fragments the outer packet, and the endpoint's node drops the fragments: a dsr UDP
// service's datagrams must stay within the MTU less 20 (40) bytes.
//
// TestDSRSurvivesLosingTheLoadBalancer shows the purpose through namespaces (client,
// router, two load-balancing nodes, an endpoint's node and its pod), in both families:
// a keep-alive connection through node A keeps its endpoint and its answers when node
// A's program is removed, or its link cut, and the router sends the VIP to node B,
// which never saw the connection; the pod sees the client's address; a 1 MiB upload
// completes through either node without one "packet too big". What remains breakable:
// a flow whose load-balancing node is lost after the service's endpoints changed since
// the flow began in a way that moved its slot of the Maglev table: the next node picks
// the slot's new endpoint, which resets the flow (the CT_ENCAP entry kept it on its
// endpoint only on the lost node). An endpoint added to N moves about 1/(N+1) of the
// slots, one removed its own and a few points more (datapath/maglev measures it):
// TestDSRFlowsKeepTheirEndpointAcrossChanges sees the node that carried 1,000 flows
// keep every one on its endpoint when a fifth endpoint joins, and a node that never
// saw them send 22% elsewhere. Every flow of an endpoint's node that is lost is lost
// too, as in every mode. An ICMP error about a reply (sent to
// the VIP by a router on the reply path) reaches a load-balancing node, which has no
// state for replies, and passes untouched: path MTU discovery from the endpoint to the
// client relies on the client's MSS. A GSO packet keeps its segment size when its
// header is stripped (BPF_F_ADJ_ROOM_FIXED_GSO) but keeps the skb's tunnel GSO flags,
// which the kernel's own decapsulation would clear: covered by no test, since the
// test's veths do not merge IP-in-IP packets.
//
// BenchmarkDSRTestRun measures every dsr packet beside default and onearm ones, one
// run per call (an encapsulated packet cannot run again as it was), so each row holds
// the clock's cost as the baseline row does; its ns/pkt-net column takes that out.
//
// # Limits
//
// Headers must be in the skb's linear part; IPv6 extension headers and fragments to a
// VIP are dropped with a named counter; entries of a removed service linger until
// evicted. A VLAN's traffic is to be balanced on the VLAN's subinterface: on the trunk
// device, a frame whose tag the device took off into the skb is seen before the VLAN
// code hands it to the subinterface, and would be translated there as if untagged
// (untested: the test kernel has no 802.1Q support). Frames the device
// did not classify PACKET_HOST (a bridge flooding unknown unicast to every node) pass
// untouched and uncounted: VIP traffic is sent to the node's MAC, replies to the node.
//
// # Conntrack expiry
//
// Entries are deleted by the LRU when the map is full, never on a timer. Each records
// when its direction last carried a packet (jiffies, stored only when the jiffy changed)
// and, for TCP, a closing mark set on a FIN or RST in either direction. A flow is expired
// when it is closing and idle for CT_CLOSING_TIMEOUT (10 s), or idle for CT_TCP_TIMEOUT
// (300 s) or CT_UDP_TIMEOUT (30 s), idle meaning since the later of its two directions'
// last packets. The values are in bpf/consts.h, in jiffies at HZ=250 (shorter at a higher
// HZ), overridable with -D. A new onearm or fullnat flow whose SNAT port is held by an
// expired flow deletes that flow's entries and takes the port, so the port range bounds
// live flows per endpoint, not flows ever seen. An expired entry names no flow
// (ct_stale in bpf/balance.h): a segment on an expired forward entry is handed off or
// balanced anew. Translating with it lost connections in the lab's rolling restarts: a
// client reused a source port 13.7 s after a connection that had gone through another
// node; when that node took the VIP back, it translated the new connection's segments
// with the old entry (adopted across its restart), onto a tuple the endpoint still held
// in TIME_WAIT, which answered with the old connection's ACK, and the new connection
// stalled. A route or neighbour change reaches established
// and new flows only when the cached next hop expires (up to 64 jiffies later); a flow's
// cache is written without a lock, so a packet racing a refresh on another CPU may
// leave with the old and new answer mixed, which only happens when the answer changed.
// A CHECKSUM_COMPLETE skb's csum is updated (bpf_csum_update) but no test covers it,
// since test runs build CHECKSUM_NONE skbs.
//
// # SNAT ports
//
// An onearm or fullnat flow leaves from the SNAT address with a port of
// Config.SNATPortMin-SNATPortMax, first tried by the flow hash, then the next ones, up to
// SNAT_TRIES (16). The reply tuple is inserted only if absent, so no port serves two
// flows. The endpoint's side of a connection outlives the flow when the endpoint closes
// first (an HTTP server that closes, or a connection: close): it holds the tuple in
// TIME_WAIT for 60 s. A SYN on that tuple may then be answered with the old
// connection's ACK (Linux accepts it only if its sequence number or timestamp is newer):
// the client resets it and retransmits the SYN 10 ms later, after the reset ended the
// TIME_WAIT, and a second collision (the retransmission balanced anew, on another node
// after a route moved) left the connection waiting a second for its next retransmission,
// which lost a probe in 1 of 12 lab runs with 100 new connections a second to one pod.
// So the first FIN of a flow tells which side holds TIME_WAIT: when it comes from the
// endpoint, the reply entry is marked CT_F_TIME_WAIT and its port is held for
// CT_TIME_WAIT_TIMEOUT (61 s) instead of CT_CLOSING_TIMEOUT (10 s). The hold is soft:
// when the 16 ports tried are all otherwise taken, a second pass takes such a port past
// the closing timeout rather than drop the SYN, counted in Stats.SNATTimeWaitReuses
// (shardlb_snat_time_wait_reuses_total). A closing entry not yet expired still
// translates a SYN, so that the client's retransmission follows its reset to the same
// tuple. The ports bound new connections per endpoint and node: with the default range
// (1024-32767, 31,744 ports, below the node's ip_local_port_range so that the node's
// own connections to endpoints, a kubelet's probes among them, never meet a SNAT
// tuple) about 520 a second when endpoints close first, about 3,100 a second when
// clients do. Each SNAT address (the node's, or each fullnat VIP) has its own ports.
//
// # Offloads
//
// Two kinds of packets leave their L4 checksum to be completed later
// (CHECKSUM_PARTIAL): TCP segments that GRO merged into one skb far longer than the MTU
// (NICs have GRO on by default), and packets of a local sender over a veth or virtio
// device with checksum offload (the veth default). Their checksum field holds the
// pseudo-header sum, so only the address change goes into it (rewrite_l4); the
// program learns the skb's checksum state through bpf_cast_to_kern_ctx and CO-RE, or
// one bpf_l4_csum_replace call in the compat variant (see Kernels). A
// merged (GSO) skb's route lookup also leaves the MTU check to the kernel per segment
// (tot_len 0) instead of failing on the merged length, and its next hop is cached for
// packets up to the device's MTU only, so merged packets look their route up each time
// (one lookup per up to 64 KiB). Without this, such packets left with corrupt checksums
// or went to the kernel's forwarding path, and TCP through a VIP stalled.
// TestOffloadedPackets moves 8 MiB each way through IPv4 and IPv6 VIPs with GRO on,
// then with checksum offload on the senders, and checks that the kernel forwarded none
// of it, in both variants; with the compat variant's probe made to answer "not
// partial" every transfer failed.
package datapath
