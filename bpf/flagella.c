/* Flagella datapath: one object per node, two tc programs per pod veth.
 *
 * Theory of operation
 * -------------------
 * `from_pod` runs on tc ingress of a pod's host-side veth (packets leaving the
 * pod: the pod's EGRESS policy); `to_pod` runs on tc egress of the same veth
 * (packets entering the pod: its INGRESS policy). The endpoint is found by
 * skb->ifindex in `endpoints`; a device that is not there is not ours and
 * passes untouched. Everything that differs between endpoints or policies
 * lives in maps, so nothing is recompiled when they change.
 *
 * Fragments (IPv4, and IPv6 fragment headers): a first fragment that passes
 * records its ports in frag4/frag6 under (endpoint, direction, addresses,
 * protocol, id); a later fragment takes them from there, so it meets the same
 * conntrack entry and policy as its first, and drops (reason 175) without one.
 *
 * Per packet: L2 gate (ARP passes; a VLAN tag, in the frame or in the skb's
 * metadata, and every other ethertype drop as "Unsupported L2 protocol": the
 * kernel would untag and deliver what we did not check), parse (IPv4 with
 * fragments, IPv6 with up to 4 extension headers), anti-spoofing on
 * from_pod, then conntrack: ESTABLISHED (same-direction entry), REPLY
 * (reversed tuple in the opposite direction of the same endpoint), RELATED
 * (ICMP error whose embedded packet is such a flow: passes), else NEW. NEW
 * and ESTABLISHED packets get the peer's identity from the ipcache (a miss is
 * world; towards a pod, "host" needs the host mark, see enforce()) and are
 * checked against policy with a bounded number of hash probes: identity
 * {peer, 0} x ({proto} x wildcard lengths present in the endpoint's mask,
 * plus protocol 0). Any DENY drops; else any REDIRECT marks for the proxy and
 * passes; else any ALLOW passes; no hit drops only if the direction is
 * enforced. An allowed NEW packet creates a CT entry even in an unenforced
 * direction, so its replies pass an enforced reverse direction.
 *
 * Proxy redirect: a REDIRECT on egress (from_pod) marks the packet and lets
 * the host stack hand it to the proxy (nftables tproxy); on ingress (to_pod)
 * the mark would be lost crossing into the pod, so the frame is readdressed
 * to the re-entry device (config map) and redirected into its ingress,
 * re-entering the host stack with the mark (see flagella.datapath.redirect);
 * with no re-entry device configured (proxy off) it is only marked.
 * A packet that carries the proxy's own mark 0x300 (its upstream, with the
 * client's real address) is never redirected again: its REDIRECT counts as
 * ALLOW, and the L3/L4 check still applies to the real peer.
 *
 * Verdict cache: the CT entry remembers the config generation under which
 * policy last passed the flow (struct ct_entry in flagella.h says when it may
 * and may not). An ESTABLISHED packet whose entry carries the current
 * generation is counted and passes in the first half, without the tail call,
 * the ipcache or the policy probes; so does a REPLY whose flow's entry does.
 * The control plane bumps the generation after every map change that can
 * change a verdict, so the next packet of every flow, in either direction,
 * takes the full path again: a REPLY is checked against the policy of its
 * flow's direction (the entry's), with the flow's destination port. A flow
 * that policy now denies is dropped and its entry becomes a tombstone
 * (CT_F_DENIED) under that generation: packets of either direction that meet
 * it drop in the first half, and since the entry stays, the other side cannot
 * reopen the flow as NEW in an unenforced direction and get the peer's
 * packets in as its replies. A later generation checks it again and revives
 * it if policy allows. Packets passed from the cache are not added to the
 * counters of the policy entry that allowed their flow.
 *
 * Local delivery (config flag CFG_F_LOCAL_DELIVERY, setting `local_delivery`): a
 * packet that from_pod passes from the verdict cache and whose destination is
 * another endpoint of this node that would pass it from its own ingress verdict
 * cache is finished in from_pod: the destination's CT entry and counter, TTL and
 * MACs as forwarding would set them, then bpf_redirect_peer() into the pod. The
 * host stack and to_pod never see it; every other packet takes the stack path
 * (local_deliver() lists the conditions).
 *
 * The work is split in two programs per direction joined by a tail call, as
 * Cilium does: `from_pod`/`to_pod` parse and classify the packet against
 * conntrack; NEW, ESTABLISHED and re-checked REPLY packets continue in
 * `policy_from_pod`/`policy_to_pod` (prog array `policy_calls`, index
 * DIR_INGRESS/DIR_EGRESS). The 17-step port-prefix probe loop behind all the
 * parsing paths of one program exceeds the verifier's budget; alone it is
 * cheap. The two halves share a per-CPU scratch (tc programs do not
 * interleave on a CPU). A missing policy program drops with reason 140.
 *
 * Build-time parameters (the loader passes them with -D): PIN_DIR, the
 * directory of the state maps (kept across recompiles and restarts),
 * PROG_DIR, the directory of this build's programs and prog array, and the
 * *_MAX map sizes.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include "flagella.h"

/* The fixed part of an IPv4 header, as the parsers read it. */
struct ipv4_hdr {
	__u8 vihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__be16 check;
	__be32 saddr;
	__be32 daddr;
};

#ifndef PIN_DIR
#error "PIN_DIR must be defined, e.g. -DPIN_DIR=\"/sys/fs/bpf/flagella\""
#endif
#ifndef PROG_DIR
#error "PROG_DIR must be defined"
#endif
#ifndef ENDPOINTS_MAX
#define ENDPOINTS_MAX 65536
#endif
#ifndef POLICY_MAX
#define POLICY_MAX 262144
#endif
#ifndef IPCACHE_MAX
#define IPCACHE_MAX 512000
#endif
#ifndef CT_MAX
#define CT_MAX 262144
#endif
#ifndef FRAG4_MAX
#define FRAG4_MAX 8192
#endif
#ifndef FRAG6_MAX
#define FRAG6_MAX 8192
#endif
#ifndef METRICS_MAX
#define METRICS_MAX 1024
#endif
#define FORWARDED_MAX 4 /* indexed by DIR_* */
#ifndef EVENTS_PAGES
#define EVENTS_PAGES 64
#endif

/* Drop reasons: Cilium's DROP_* numbers, positive. */
#define DROP_INVALID_SIP 132
#define DROP_POLICY 133
#define DROP_INVALID 134
#define DROP_WRITE_ERROR 141
#define DROP_MISSED_TAIL_CALL 140
#define DROP_INVALID_EXTHDR 156
#define DROP_FRAG_NOSUPPORT 157
#define DROP_UNSUPPORTED_L2 166
#define DROP_FRAG_NOT_FOUND 175

#define IDENTITY_HOST 1
#define IDENTITY_WORLD 2

#define MARK_MAGIC_MASK 0xf00
#define MARK_MAGIC_HOST 0xc00
#define MARK_MAGIC_TO_PROXY 0x200
#define MARK_MAGIC_FROM_PROXY 0x300 /* the proxy's upstream (SO_MARK): never redirected again */

#define FL_NSEC_PER_SEC 1000000000ULL
#define DEFAULT_CT_TCP_NS (21600ULL * FL_NSEC_PER_SEC)
#define DEFAULT_CT_SYN_NS (60ULL * FL_NSEC_PER_SEC)
#define DEFAULT_CT_NON_TCP_NS (60ULL * FL_NSEC_PER_SEC)
#define DEFAULT_CT_CLOSING_NS (10ULL * FL_NSEC_PER_SEC)

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMPV6 58
#define PROTO_SCTP 132
#define PROTO_UDPLITE 136

#define ETH_HLEN_ 14

BPF_TABLE_PINNED("hash", __u32, struct endpoint_info, endpoints, ENDPOINTS_MAX,
		 PIN_DIR "/endpoints", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct policy_key, struct policy_entry, policy, POLICY_MAX,
		 PIN_DIR "/policy", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct ipcache4_key, struct remote_info, ipcache4, IPCACHE_MAX,
		 PIN_DIR "/ipcache4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct ipcache6_key, struct remote_info, ipcache6, IPCACHE_MAX,
		 PIN_DIR "/ipcache6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_entry, ct, CT_MAX, PIN_DIR "/ct");
BPF_TABLE_PINNED("array", __u32, struct dp_config, config, 1, PIN_DIR "/config");
BPF_TABLE_PINNED("lru_hash", struct frag4_key, struct frag4_ports, frag4, FRAG4_MAX,
		 PIN_DIR "/frag4");
BPF_TABLE_PINNED("lru_hash", struct frag6_key, struct frag4_ports, frag6, FRAG6_MAX,
		 PIN_DIR "/frag6");
BPF_TABLE_PINNED("percpu_hash", struct metrics_key, struct metrics_value, metrics, METRICS_MAX,
		 PIN_DIR "/metrics");
BPF_TABLE_PINNED("percpu_array", __u32, struct metrics_value, forwarded, FORWARDED_MAX,
		 PIN_DIR "/forwarded");

/* BPF_RINGBUF_OUTPUT cannot be pinned; this is its expansion with a pin path. */
struct events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" PIN_DIR "/events")))
struct events_table_t events = { .max_entries = EVENTS_PAGES * 4096 };

/* What kind of ICMP message a packet is, for conntrack. */
#define ICMP_KIND_NONE 0
#define ICMP_KIND_ECHO_REQUEST 1
#define ICMP_KIND_ECHO_REPLY 2
#define ICMP_KIND_ERROR 3
#define ICMP_KIND_NEIGHBOUR 4  /* ICMPv6 ND/MLD: link-local plumbing, passes */
#define ICMP_KIND_OTHER 5

#define FRAG_NONE 0
#define FRAG_FIRST 1
#define FRAG_LATER 2

struct flow {
	__u8 saddr[16];      /* IPv4-mapped for IPv4 */
	__u8 daddr[16];
	__be16 sport;        /* conntrack ports, network order */
	__be16 dport;
	__be16 ip_id;        /* IPv4 fragments */
	__u16 policy_port;   /* host order: destination port or ICMP type */
	__u8 family;         /* 4 or 6 */
	__u8 proto;
	__u8 tcp_flags;
	__u8 has_l4;         /* 0 for later fragments: no transport header here */
	__u8 icmp_kind;
	__u8 frag;
	__u8 has_related;    /* scratch.other holds the embedded packet's CT key */
	__u8 frag_nh;        /* IPv6 fragments: the fragment header's Next Header */
	__be32 frag_id;      /* IPv6 fragments: the fragment header's Identification */
};

/* Working memory of one packet, shared by the classify and policy halves. */
struct scratch {
	struct flow f;
	struct ct_key key;         /* this packet's tuple */
	struct ct_key other;       /* RELATED key, then the reversed (REPLY) key */
	struct endpoint_info ep;   /* copy, for the policy half */
	__u8 state;                /* CT_* */
	__u8 pad[3];
};

BPF_PERCPU_ARRAY(scratch_map, struct scratch, 1);
BPF_TABLE_PINNED("prog", __u32, __u32, policy_calls, 3, PROG_DIR "/policy_calls");

/* bpf_skb_load_bytes, read straight from the packet when the bytes are in its linear part
 * (headers nearly always are): no helper call. `len` must be a constant. */
/* skb->data and skb->data_end, read in one instruction each from skb itself: the compiler
 * may otherwise keep &skb->data_end in a register (ctx + 80), which the verifier refuses. */
static __always_inline void *ctx_u32(struct __sk_buff *skb, const int off)
{
	__u64 v;
	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(v) : "r"(skb), "i"(off));
	return (void *)(long)v;
}

static __always_inline int load_bytes(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	void *data = ctx_u32(skb, offsetof(struct __sk_buff, data));
	void *data_end = ctx_u32(skb, offsetof(struct __sk_buff, data_end));
	if (off <= 0xffff) {
		void *p = data + off;
		if (p + len <= data_end) {
			__builtin_memcpy(to, p, len);
			return 0;
		}
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

static __always_inline void map_ipv4(__u8 *dst, __be32 addr)
{
	__u32 *w = (__u32 *)dst;
	w[0] = 0;
	w[1] = 0;
	w[2] = bpf_htonl(0x0000ffff);
	w[3] = addr;
}

/* Every 16-byte address field in our structs is 4-byte aligned. */
static __always_inline void copy16(__u8 *dst, const __u8 *src)
{
	__u32 *d = (__u32 *)dst;
	const __u32 *s = (const __u32 *)src;
	d[0] = s[0];
	d[1] = s[1];
	d[2] = s[2];
	d[3] = s[3];
}

static __always_inline int eq16(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a;
	const __u32 *y = (const __u32 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* Forwarded packets go to `forwarded` (a per-CPU array: the verifier inlines its lookup),
 * drops to the `metrics` hash under their reason; user space sums both. */
static __always_inline void count(__u8 reason, __u8 dir, __u32 len)
{
	if (reason == 0) {
		__u32 idx = dir;
		struct metrics_value *fv = forwarded.lookup(&idx);
		if (fv) {
			fv->packets += 1; /* per-CPU: no atomics needed */
			fv->bytes += len;
		}
		return;
	}
	struct metrics_key key = { .reason = reason, .dir = dir };
	struct metrics_value *v = metrics.lookup(&key);
	if (!v) {
		struct metrics_value zero = {};
		metrics.update(&key, &zero);
		v = metrics.lookup(&key);
		if (!v)
			return;
	}
	v->packets += 1;  /* per-CPU: no atomics needed */
	v->bytes += len;
}

static __always_inline void emit(struct __sk_buff *skb, __u8 type, __u8 reason, __u8 dir,
				 struct endpoint_info *ep, struct flow *f, __u32 peer,
				 __u8 ct_state)
{
	/* Written in place in the ring: a struct event on the stack would not fit the budget. */
	struct event *ev = events.ringbuf_reserve(sizeof(struct event));
	if (!ev)
		return;
	ev->type = type;
	ev->reason = reason;
	ev->dir = dir;
	ev->family = f->family;
	ev->proto = f->proto;
	ev->ct_state = ct_state;
	ev->pad = 0;
	ev->ep_id = ep->ep_id;
	if (dir == DIR_EGRESS) {
		ev->src_identity = ep->identity;
		ev->dst_identity = peer;
	} else {
		ev->src_identity = peer;
		ev->dst_identity = ep->identity;
	}
	copy16(ev->saddr, f->saddr);
	copy16(ev->daddr, f->daddr);
	ev->sport = f->sport;
	ev->dport = f->dport;
	ev->len = skb->len;
	events.ringbuf_submit(ev, 0);
}

static __always_inline int drop(struct __sk_buff *skb, __u8 reason, __u8 dir,
				struct endpoint_info *ep, struct flow *f, __u32 peer, __u8 state)
{
	count(reason, dir, skb->len);
	emit(skb, EVENT_DROP, reason, dir, ep, f, peer, state);
	return TC_ACT_SHOT;
}

/* Fill conntrack ports and policy port for an ICMP/ICMPv6 message. */
static __always_inline void classify_icmp(struct flow *f, __u8 type, __be16 id, int v6)
{
	__u8 echo_req = v6 ? 128 : 8;
	__u8 echo_rep = v6 ? 129 : 0;
	f->policy_port = type;
	f->sport = bpf_htons(type);
	f->dport = 0;
	if (type == echo_req || type == echo_rep) {
		f->icmp_kind = type == echo_req ? ICMP_KIND_ECHO_REQUEST : ICMP_KIND_ECHO_REPLY;
		f->sport = id;
		f->dport = id;
	} else if (v6 ? (type >= 1 && type <= 4) : (type == 3 || type == 4 || type == 11 || type == 12)) {
		f->icmp_kind = ICMP_KIND_ERROR;
	} else if (v6 && ((type >= 130 && type <= 137) || type == 143)) {
		f->icmp_kind = ICMP_KIND_NEIGHBOUR;
	} else {
		f->icmp_kind = ICMP_KIND_OTHER;
	}
}

/* Build the CT key of the embedded packet of an ICMP error at `off`
 * (the start of the embedded IP header). The embedded packet travelled the
 * other way, so it is looked up as-is in the opposite direction. */
static __always_inline int related_key(struct __sk_buff *skb, __u32 off, int v6,
				       struct ct_key *k)
{
	__u8 proto;
	__u32 l4;
	if (v6) {
		struct {
			__be32 vtc;
			__be16 plen;
			__u8 nexthdr;
			__u8 hop;
			__u8 saddr[16];
			__u8 daddr[16];
		} ip6;
		if (load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return -1;
		proto = ip6.nexthdr;
		copy16(k->saddr, ip6.saddr);
		copy16(k->daddr, ip6.daddr);
		l4 = off + 40;
	} else {
		struct ipv4_hdr ip4;
		if (load_bytes(skb, off, &ip4, sizeof(ip4)) < 0)
			return -1;
		if ((ip4.vihl & 0xf) < 5)
			return -1;
		proto = ip4.protocol;
		map_ipv4(k->saddr, ip4.saddr);
		map_ipv4(k->daddr, ip4.daddr);
		l4 = off + (ip4.vihl & 0xf) * 4;
	}
	__u8 l4h[8];
	if (load_bytes(skb, l4, l4h, 8) < 0)
		return -1;
	k->proto = proto;
	if (proto == PROTO_TCP || proto == PROTO_UDP || proto == PROTO_SCTP ||
	    proto == PROTO_UDPLITE) {
		__builtin_memcpy(&k->sport, &l4h[0], 2);
		__builtin_memcpy(&k->dport, &l4h[2], 2);
	} else if ((!v6 && proto == PROTO_ICMP && l4h[0] == 8) ||
		   (v6 && proto == PROTO_ICMPV6 && l4h[0] == 128)) {
		__builtin_memcpy(&k->sport, &l4h[4], 2);
		__builtin_memcpy(&k->dport, &l4h[4], 2);
	} else {
		return -1;
	}
	return 0;
}

/* Parse the transport header at `off`. Returns 0 or -reason. */
static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, struct flow *f, int v6,
				    struct ct_key *rel)
{
	__u8 h[14];
	f->has_l4 = 1;
	switch (f->proto) {
	case PROTO_TCP:
		if (load_bytes(skb, off, h, 14) < 0)
			return -DROP_INVALID;
		f->tcp_flags = h[13];
		break;
	case PROTO_UDP:
	case PROTO_UDPLITE:
		if (load_bytes(skb, off, h, 8) < 0)
			return -DROP_INVALID;
		break;
	case PROTO_SCTP:
		if (load_bytes(skb, off, h, 4) < 0)
			return -DROP_INVALID;
		break;
	case PROTO_ICMP:
	case PROTO_ICMPV6: {
		if ((f->proto == PROTO_ICMPV6) != (v6 != 0))
			goto unknown;
		if (load_bytes(skb, off, h, 8) < 0)
			return -DROP_INVALID;
		__be16 id;
		__builtin_memcpy(&id, &h[4], 2);
		classify_icmp(f, h[0], id, v6);
		if (f->icmp_kind == ICMP_KIND_ERROR && related_key(skb, off + 8, v6, rel) == 0)
			f->has_related = 1;
		return 0;
	}
	default:
		goto unknown;
	}
	__builtin_memcpy(&f->sport, &h[0], 2);
	__builtin_memcpy(&f->dport, &h[2], 2);
	f->policy_port = bpf_ntohs(f->dport);
	return 0;
unknown:
	/* Unknown transport: evaluated with port 0 (no drop, unlike Cilium's CT_UNKNOWN_PROTO). */
	f->sport = 0;
	f->dport = 0;
	f->policy_port = 0;
	return 0;
}

/* A later fragment takes the ports (ICMP: type and echo id) its first fragment recorded. */
static __always_inline void later_ports(struct flow *f, struct frag4_ports *ports, int v6)
{
	f->has_l4 = 0;
	if (f->proto == (v6 ? PROTO_ICMPV6 : PROTO_ICMP)) {
		classify_icmp(f, (__u8)bpf_ntohs(ports->dport), ports->sport, v6);
	} else {
		f->sport = ports->sport;
		f->dport = ports->dport;
		f->policy_port = bpf_ntohs(ports->dport);
	}
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct endpoint_info *ep,
				      int egress, struct flow *f, struct ct_key *rel)
{
	struct ipv4_hdr ip4;
	f->family = 4;
	if (load_bytes(skb, ETH_HLEN_, &ip4, sizeof(ip4)) < 0)
		return -DROP_INVALID;
	__u32 ihl = ip4.vihl & 0xf;
	if ((ip4.vihl >> 4) != 4 || ihl < 5 || bpf_ntohs(ip4.tot_len) < ihl * 4)
		return -DROP_INVALID;
	f->proto = ip4.protocol;
	map_ipv4(f->saddr, ip4.saddr);
	map_ipv4(f->daddr, ip4.daddr);
	if (egress && ip4.saddr != ep->ipv4)
		return -DROP_INVALID_SIP;

	__u16 frag_off = bpf_ntohs(ip4.frag_off);
	f->ip_id = ip4.id;
	if (frag_off & 0x1fff) {
		struct frag4_key fk = {
			.ep_id = ep->ep_id,
			.egress = egress,
			.proto = ip4.protocol,
			.ip_id = ip4.id,
			.saddr = ip4.saddr,
			.daddr = ip4.daddr,
		};
		struct frag4_ports *ports = frag4.lookup(&fk);
		f->frag = FRAG_LATER;
		if (!ports)
			return -DROP_FRAG_NOT_FOUND;
		later_ports(f, ports, 0);
		return 0;
	}
	if (frag_off & 0x2000)
		f->frag = FRAG_FIRST;
	return parse_l4(skb, ETH_HLEN_ + ihl * 4, f, 0, rel);
}

static __always_inline int is_ipv6_ext(__u8 nh)
{
	return nh == 0 || nh == 43 || nh == 60 || nh == 51;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, struct endpoint_info *ep,
				      int egress, struct flow *f, struct ct_key *rel)
{
	struct {
		__u8 vtc[4];
		__be16 plen;
		__u8 nexthdr;
		__u8 hop;
		__u8 saddr[16];
		__u8 daddr[16];
	} ip6;
	f->family = 6;
	if (load_bytes(skb, ETH_HLEN_, &ip6, sizeof(ip6)) < 0)
		return -DROP_INVALID;
	if ((ip6.vtc[0] >> 4) != 6)
		return -DROP_INVALID;
	copy16(f->saddr, ip6.saddr);
	copy16(f->daddr, ip6.daddr);
	if (egress && !eq16(ip6.saddr, ep->ipv6)) {
		const __u32 *w = (const __u32 *)ip6.saddr;
		int link_local = ip6.saddr[0] == 0xfe && (ip6.saddr[1] & 0xc0) == 0x80;
		int unspecified = (w[0] | w[1] | w[2] | w[3]) == 0;
		if (!link_local && !unspecified)
			return -DROP_INVALID_SIP;
	}

	__u8 nh = ip6.nexthdr;
	__u32 off = ETH_HLEN_ + 40;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (nh == 44) {
			/* Fragment header: a later fragment stops here (no transport header). */
			struct {
				__u8 nh;
				__u8 reserved;
				__be16 off_m;
				__be32 id;
			} fh;
			if (f->frag != FRAG_NONE || load_bytes(skb, off, &fh, sizeof(fh)) < 0)
				return -DROP_INVALID;
			__u16 off_m = bpf_ntohs(fh.off_m);
			f->frag_nh = fh.nh;
			f->frag_id = fh.id;
			nh = fh.nh;
			off += 8;
			if (off_m & 0xfff8) {
				f->frag = FRAG_LATER;
				break;
			}
			if (off_m & 1)
				f->frag = FRAG_FIRST; /* else an atomic fragment: a whole packet */
			continue;
		}
		if (!is_ipv6_ext(nh))
			break;
		__u8 opt[2];
		if (load_bytes(skb, off, opt, 2) < 0)
			return -DROP_INVALID;
		off += nh == 51 ? ((__u32)opt[1] + 2) * 4 : ((__u32)opt[1] + 1) * 8;
		nh = opt[0];
	}
	f->proto = nh;
	if (f->frag == FRAG_LATER) {
		struct frag6_key fk = {};
		fk.ep_id = ep->ep_id;
		fk.egress = egress;
		fk.proto = f->frag_nh;
		fk.frag_id = f->frag_id;
		copy16(fk.saddr, f->saddr);
		copy16(fk.daddr, f->daddr);
		struct frag4_ports *ports = frag6.lookup(&fk);
		if (!ports)
			return -DROP_FRAG_NOT_FOUND;
		later_ports(f, ports, 1);
		return 0;
	}
	if (nh == 44)
		return -DROP_FRAG_NOSUPPORT; /* a fragment header beyond the 4 we walk */
	if (is_ipv6_ext(nh))
		return -DROP_INVALID_EXTHDR;
	return parse_l4(skb, off, f, 1, rel);
}

static __always_inline __u32 ipcache_lookup(struct flow *f, const __u8 *addr)
{
	struct remote_info *r;
	if (f->family == 4) {
		struct ipcache4_key k = { .prefixlen = 32 };
		__builtin_memcpy(&k.addr, &addr[12], 4);
		r = ipcache4.lookup(&k);
	} else {
		struct ipcache6_key k = { .prefixlen = 128 };
		copy16(k.addr, addr);
		r = ipcache6.lookup(&k);
	}
	return r ? r->identity : IDENTITY_WORLD;
}

#define NO_HIT 0

/* Within one tier: DENY beats PASS beats REDIRECT beats ALLOW; anything else is no hit. */
static __always_inline __u32 verdict_rank(__u8 verdict)
{
	if (verdict == VERDICT_DENY)
		return 4;
	if (verdict == VERDICT_PASS)
		return 3;
	if (verdict == VERDICT_REDIRECT)
		return 2;
	return verdict == VERDICT_ALLOW ? 1 : 0;
}

static __always_inline __u8 rank_verdict(__u32 rank)
{
	return rank == 4 ? VERDICT_DENY : rank == 3 ? VERDICT_PASS :
	       rank == 2 ? VERDICT_REDIRECT : VERDICT_ALLOW;
}

/* Tiers (ClusterNetworkPolicy): the admin tier (precedence > 0) decides first, its
 * highest precedence winning; a Pass there hands over to the normal tier
 * (precedence 0: Cilium and Kubernetes policy); the baseline tier (< 0) decides
 * only when the normal tier has no hit and the direction is not enforced.
 *
 * Every hit gets one score, a total order: tier band (admin 3, normal 2,
 * baseline 1), then precedence, then rank. The loop keeps only two scalars
 * (the best hit, and the best hit below the admin band, for when the best
 * is an admin Pass) and the probe numbers that produced them; key copies and
 * entry pointers would multiply the verifier's states. */
#define PROBE_ANY_PROTO 17
#define BAND_SHIFT 40

static __always_inline void probe_key(struct policy_key *k, __u32 probe, __u32 peer,
				      __u8 proto, __u16 port)
{
	__u32 n = probe >= 18 ? probe - 18 : probe;
	k->identity = probe >= 18 ? 0 : peer;
	if (n >= PROBE_ANY_PROTO) {
		k->protocol = 0;
		k->wild_bits = 16;
		k->port = 0;
	} else {
		k->protocol = proto;
		k->wild_bits = n;
		k->port = port & (__u16)~((1u << n) - 1);
	}
}

/* Branch-free on purpose: a branch per probe multiplies the verifier's states. */
static __always_inline __u64 hit_score(struct policy_entry *e)
{
	if (!e)
		return 0;
	__u32 v = e->verdict & 7;
	/* rank by verdict: ALLOW 1, DENY 4, REDIRECT 2, PASS 3, others 0 */
	__u64 rank = (0x32410u >> (v * 4)) & 0xf;
	__s64 prec = e->precedence;
	__u64 neg = ((__u64)prec >> 63) & 1;		/* precedence < 0: baseline */
	__u64 pos = ((__u64)(-prec) >> 63) & 1;		/* precedence > 0: admin */
	__u64 band = 2 + pos - neg;
	/* baseline: -1 (the first baseline rule) must score highest */
	__u64 order = pos * (__u64)prec + neg * (0x7fffffffull + (__u64)(prec + 1));
	__u64 nonzero = (__u64)(-(__s64)rank) >> 63; /* rank 0 (unknown verdict) = no hit */
	return ((band << BAND_SHIFT) | ((order & 0xffffffffull) << 8) | rank) * nonzero;
}

/* best = max(best, score), and remember which probe gave it, without branches. */
#define TAKE_MAX(best, best_probe, score, probe)                                   \
	do {                                                                        \
		__u64 __m = (__u64)((__s64)((best) - (score)) >> 63);               \
		(best) ^= ((best) ^ (score)) & __m;                                 \
		(best_probe) ^= ((best_probe) ^ (__u32)(probe)) & (__u32)__m;       \
	} while (0)

#define BELOW_ADMIN(score) ((score) & (__u64)((__s64)((score) - (3ull << BAND_SHIFT)) >> 63))

/* Combine every matching policy entry: returns the verdict (NO_HIT if none)
 * and the entry that decided (fetched again at the end). */
static __always_inline __u8 policy_lookup(struct endpoint_info *ep, __u8 egress, __u32 peer,
					  __u8 proto, __u16 port, int enforced,
					  struct policy_entry **decider)
{
	__u32 mask = egress ? ep->egress_wild_mask : ep->ingress_wild_mask;
	struct policy_key k = {};
	__u64 best = 0, below = 0, score;
	__u32 best_probe = 0, below_probe = 0;

	k.ep_id = ep->ep_id;
	k.egress = egress;
#pragma unroll
	for (int idn = 0; idn < 2; idn++) {
		if (idn == 1 && peer == 0)
			break;
		k.identity = idn == 0 ? peer : 0;
		k.protocol = proto;
#pragma clang loop unroll(disable)
		for (int n = 0; n <= 16; n++) {
			if (!(mask & (1u << n)))
				continue;
			k.wild_bits = n;
			k.port = port & (__u16)~((1u << n) - 1);
			score = hit_score(policy.lookup(&k));
			TAKE_MAX(best, best_probe, score, idn * 18 + n);
			score = BELOW_ADMIN(score);
			TAKE_MAX(below, below_probe, score, idn * 18 + n);
		}
		k.protocol = 0;
		k.wild_bits = 16;
		k.port = 0;
		score = hit_score(policy.lookup(&k));
		TAKE_MAX(best, best_probe, score, idn * 18 + PROBE_ANY_PROTO);
		score = BELOW_ADMIN(score);
		TAKE_MAX(below, below_probe, score, idn * 18 + PROBE_ANY_PROTO);
	}
	if ((best >> BAND_SHIFT) == 3 && (best & 0xff) == 3) {
		best = below; /* admin Pass: the tiers below decide */
		best_probe = below_probe;
	}
	__u32 band = (__u32)(best >> BAND_SHIFT);
	__u32 rank = (__u32)(best & 0xff);
	if (!rank)
		return NO_HIT;
	if (band == 1) {
		if (enforced)
			return NO_HIT;
		if (rank == 3)
			rank = 1; /* baseline Pass with nothing below it: allowed */
	}
	probe_key(&k, best_probe, peer, proto, port);
	*decider = policy.lookup(&k);
	return rank_verdict(rank);
}

static __always_inline __u64 ct_lifetime(struct dp_config *cfg, __u8 proto, __u32 flags)
{
	__u64 t;
	if ((flags & (CT_F_CLOSING_FWD | CT_F_CLOSING_REV)) ==
	    (CT_F_CLOSING_FWD | CT_F_CLOSING_REV)) {
		t = cfg ? cfg->ct_closing_ns : 0;
		return t ? t : DEFAULT_CT_CLOSING_NS;
	}
	if (proto == PROTO_TCP) {
		if (flags & CT_F_SEEN_NON_SYN) {
			t = cfg ? cfg->ct_tcp_ns : 0;
			return t ? t : DEFAULT_CT_TCP_NS;
		}
		t = cfg ? cfg->ct_syn_ns : 0;
		return t ? t : DEFAULT_CT_SYN_NS;
	}
	t = cfg ? cfg->ct_non_tcp_ns : 0;
	return t ? t : DEFAULT_CT_NON_TCP_NS;
}

static __always_inline __u32 tcp_ct_flags(struct flow *f, __u32 flags, int reply)
{
	if (f->proto != PROTO_TCP || !f->has_l4)
		return flags;
	__u8 t = f->tcp_flags;
	if ((t & (TCP_SYN | TCP_ACK)) == TCP_SYN && !reply &&
	    (flags & (CT_F_CLOSING_FWD | CT_F_CLOSING_REV)))
		return 0; /* a fresh SYN reopens a closing tuple */
	if (!(t & TCP_SYN))
		flags |= CT_F_SEEN_NON_SYN;
	if (t & TCP_RST)
		flags |= CT_F_CLOSING_FWD | CT_F_CLOSING_REV;
	else if (t & TCP_FIN)
		flags |= reply ? CT_F_CLOSING_REV : CT_F_CLOSING_FWD;
	return flags;
}

/* May this packet's pass verdict be cached, or taken from the cache? See struct ct_entry. */
static __always_inline int verdict_cacheable(struct __sk_buff *skb, struct flow *f, int egress)
{
	if (f->icmp_kind == ICMP_KIND_ECHO_REPLY)
		return 0;
	if ((skb->mark & MARK_MAGIC_MASK) == MARK_MAGIC_FROM_PROXY)
		return 0;
	return egress || (skb->mark & MARK_MAGIC_MASK) != MARK_MAGIC_HOST;
}

/* The generation, read once: a verdict is stored under the generation read before
 * its lookups, so one computed from maps older than a bump never carries the new one. */
static __always_inline __u32 cache_generation(struct dp_config *cfg)
{
	return cfg ? *(volatile __u32 *)&cfg->generation : 0;
}

static __always_inline void ct_touch(struct ct_entry *e, struct flow *f, int reply,
				     struct dp_config *cfg, __u64 now, __u32 len)
{
	__u32 flags = tcp_ct_flags(f, e->flags, reply);
	e->flags = flags;
	e->expires_ns = now + ct_lifetime(cfg, f->proto, flags);
	/* Plain adds, not locked ones: the counters are statistics, and a flow's packets meet
	 * its entry from one CPU at a time but for rare overlaps (the request on one CPU, its
	 * reply on another), where an increment may be lost: locked adds on every packet cost
	 * more than these counters are worth. */
	e->packets += 1;
	e->bytes += len;
}

/* A first fragment that passed records its ports for the later ones (frag4, frag6). */
static __always_inline void frag_record(struct endpoint_info *ep, int egress, struct flow *f)
{
	if (f->frag != FRAG_FIRST)
		return;
	struct frag4_ports ports = {};
	if (f->proto == PROTO_ICMP || f->proto == PROTO_ICMPV6) {
		if (f->icmp_kind == ICMP_KIND_ECHO_REQUEST || f->icmp_kind == ICMP_KIND_ECHO_REPLY)
			ports.sport = f->sport;
		ports.dport = bpf_htons(f->policy_port);
	} else {
		ports.sport = f->sport;
		ports.dport = f->dport;
	}
	if (f->family == 6) {
		struct frag6_key k6 = {};
		k6.ep_id = ep->ep_id;
		k6.egress = egress;
		k6.proto = f->frag_nh;
		k6.frag_id = f->frag_id;
		copy16(k6.saddr, f->saddr);
		copy16(k6.daddr, f->daddr);
		frag6.update(&k6, &ports);
		return;
	}
	struct frag4_key fk = {};
	fk.ep_id = ep->ep_id;
	fk.egress = egress;
	fk.proto = f->proto;
	fk.ip_id = f->ip_id;
	__builtin_memcpy(&fk.saddr, &f->saddr[12], 4);
	__builtin_memcpy(&fk.daddr, &f->daddr[12], 4);
	frag4.update(&fk, &ports);
}

/* Local delivery (Cilium's ipv4_local_delivery, for the cached case only).
 *
 * Called by from_pod for a packet that passed from the verdict cache (ESTABLISHED,
 * or a REPLY whose flow's verdict is current under a non-zero generation). If the
 * FIB sends the packet to another local endpoint's host veth (same node, resolved
 * neighbour), and that endpoint's ingress would pass it from its own verdict cache
 * too (the same two lookups to_pod's first half makes, with the same conditions),
 * the destination's half is done here: its CT entry is touched, the packet counted
 * as forwarded to the pod, the L2 addresses and TTL/hop limit rewritten as
 * forwarding would, and the packet goes into the destination pod with
 * bpf_redirect_peer(), skipping the host stack and to_pod. Anything else (a NEW
 * flow, a stale or denied verdict, a REDIRECT flow, a fragment, a packet the host
 * would answer, TTL <= 1, a destination that is not (or no longer) an endpoint
 * with this address) returns 0 and takes the stack path, where to_pod decides in
 * full. Requiring a cached verdict on both ends also keeps NAT'ed flows (service
 * VIPs, the proxy's transparent upstream) on the stack path: the two ends never
 * saw the same tuple. Returns the redirect verdict, or 0. */
static __always_inline int local_deliver(struct __sk_buff *skb, struct scratch *s,
					 struct dp_config *cfg, __u32 gen, __u64 now)
{
	struct flow *f = &s->f;
	if (!cfg || !(cfg->flags & CFG_F_LOCAL_DELIVERY) || !gen || f->frag != FRAG_NONE ||
	    !verdict_cacheable(skb, f, 0))
		return 0;
	struct bpf_fib_lookup fib = {};
	fib.ifindex = skb->ifindex;
	if (f->family == 4) {
		fib.family = 2; /* AF_INET */
		__builtin_memcpy(&fib.ipv4_src, &f->saddr[12], 4);
		__builtin_memcpy(&fib.ipv4_dst, &f->daddr[12], 4);
	} else {
		/* A link-local source (anti-spoofing lets it out) is never forwarded. */
		if (f->saddr[0] == 0xfe && (f->saddr[1] & 0xc0) == 0x80)
			return 0;
		fib.family = 10; /* AF_INET6 */
		copy16((__u8 *)fib.ipv6_src, f->saddr);
		copy16((__u8 *)fib.ipv6_dst, f->daddr);
	}
	/* tot_len 0: the helper checks the skb against the route's MTU itself, GSO-aware
	 * (a pod's TCP sends GSO packets far above the MTU). */
	fib.l4_protocol = f->proto;
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return 0;
	__u32 dst_ifindex = fib.ifindex;
	if (dst_ifindex == skb->ifindex)
		return 0;
	struct endpoint_info *dep = endpoints.lookup(&dst_ifindex);
	if (!dep)
		return 0;
	/* The endpoint at that device must own the address: a stale route or a reused
	 * ifindex never delivers. */
	if (f->family == 4 ? dep->ipv4 != ((const __u32 *)f->daddr)[3] :
			     !eq16(dep->ipv6, f->daddr))
		return 0;

	/* The destination's ingress, from its verdict cache only. */
	struct ct_key *key = &s->key;
	key->ep_id = dep->ep_id;
	key->egress = 0;
	struct ct_entry *entry = ct.lookup(key);
	int reply = 0;
	if (!(entry && entry->expires_ns > now)) {
		if (f->proto == PROTO_ICMP || f->proto == PROTO_ICMPV6)
			return 0;
		struct ct_key *other = &s->other;
		other->ep_id = dep->ep_id;
		other->egress = 1;
		other->proto = f->proto;
		other->pad = 0;
		copy16(other->saddr, f->daddr);
		copy16(other->daddr, f->saddr);
		other->sport = f->dport;
		other->dport = f->sport;
		entry = ct.lookup(other);
		if (!(entry && entry->expires_ns > now))
			return 0;
		reply = 1;
	}
	if ((entry->flags & CT_F_DENIED) || entry->verdict_gen != gen)
		return 0;

	/* What forwarding would do: TTL / hop limit, then the L2 addresses. */
	if (f->family == 4) {
		__u8 ttl;
		if (load_bytes(skb, ETH_HLEN_ + 8, &ttl, 1) < 0 || ttl <= 1)
			return 0;
		__u8 nttl = ttl - 1;
		if (bpf_l3_csum_replace(skb, ETH_HLEN_ + 10, bpf_htons((__u16)ttl << 8),
					bpf_htons((__u16)nttl << 8), 2) < 0 ||
		    bpf_skb_store_bytes(skb, ETH_HLEN_ + 8, &nttl, 1, 0) < 0)
			return 0;
	} else {
		__u8 hop;
		if (load_bytes(skb, ETH_HLEN_ + 7, &hop, 1) < 0 || hop <= 1)
			return 0;
		hop -= 1;
		if (bpf_skb_store_bytes(skb, ETH_HLEN_ + 7, &hop, 1, 0) < 0)
			return 0;
	}
	__u8 macs[12];
	__builtin_memcpy(macs, fib.dmac, 6);
	__builtin_memcpy(macs + 6, fib.smac, 6);
	if (bpf_skb_store_bytes(skb, 0, macs, 12, 0) < 0)
		return 0;
	ct_touch(entry, f, reply, cfg, now, skb->len);
	count(0, DIR_INGRESS, skb->len);
	return bpf_redirect_peer(dst_ifindex, 0);
}

/* First half: parse, anti-spoofing, identity, conntrack classification. */
static __always_inline int classify(struct __sk_buff *skb, int egress)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_info *ep = endpoints.lookup(&ifindex);
	if (!ep)
		return TC_ACT_OK; /* not a Flagella endpoint */

	__u8 dir = egress ? DIR_EGRESS : DIR_INGRESS;
	__u32 zero = 0;
	struct scratch *s = scratch_map.lookup(&zero);
	if (!s)
		return TC_ACT_SHOT;
	struct flow *f = &s->f;
	__builtin_memset(f, 0, sizeof(*f));
	__be16 eth_proto;
	int ret;

	if (load_bytes(skb, 12, &eth_proto, 2) < 0)
		return drop(skb, DROP_INVALID, dir, ep, f, 0, CT_NEW);
	/* A VLAN tag, in the frame or already taken out into the skb's metadata (the
	 * receive path untags the outer one before tc), hides a packet the kernel would
	 * untag and deliver after us: never ours to pass. */
	if (skb->vlan_present)
		return drop(skb, DROP_UNSUPPORTED_L2, dir, ep, f, 0, CT_NEW);
	if (eth_proto == bpf_htons(ETH_P_IP))
		ret = parse_ipv4(skb, ep, egress, f, &s->other);
	else if (eth_proto == bpf_htons(ETH_P_IPV6))
		ret = parse_ipv6(skb, ep, egress, f, &s->other);
	else if (eth_proto == bpf_htons(ETH_P_ARP))
		goto pass_untracked; /* ARP: neighbour plumbing, carries no payload */
	else
		return drop(skb, DROP_UNSUPPORTED_L2, dir, ep, f, 0, CT_NEW); /* VLAN, QinQ, ... */
	if (ret < 0)
		return drop(skb, -ret, dir, ep, f, 0, CT_NEW);
	if (f->icmp_kind == ICMP_KIND_NEIGHBOUR)
		goto pass_untracked;

	/* The coarse clock (last tick) is enough for lifetimes of seconds, and cheaper. */
	__u64 now = bpf_ktime_get_coarse_ns();
	struct ct_entry *entry;
	struct ct_key *other = &s->other;
	if (f->has_related) {
		other->ep_id = ep->ep_id;
		other->egress = !egress;
		other->pad = 0;
		entry = ct.lookup(other);
		if (entry && entry->expires_ns > now && !(entry->flags & CT_F_DENIED))
			goto pass; /* RELATED */
	}

	struct ct_key *key = &s->key;
	key->ep_id = ep->ep_id;
	key->egress = egress;
	key->proto = f->proto;
	key->pad = 0;
	copy16(key->saddr, f->saddr);
	copy16(key->daddr, f->daddr);
	key->sport = f->sport;
	key->dport = f->dport;

	__u8 state = CT_NEW;
	struct dp_config *cfg = config.lookup(&zero);
	__u32 gen = cache_generation(cfg);
	entry = ct.lookup(key);
	if (entry && entry->expires_ns > now) {
		state = CT_ESTABLISHED;
		if (gen && entry->verdict_gen == gen && verdict_cacheable(skb, f, egress)) {
			if (entry->flags & CT_F_DENIED)
				goto tombstone; /* ESTABLISHED, denied under this generation */
			ct_touch(entry, f, 0, cfg, now, skb->len);
			goto pass_cached; /* ESTABLISHED, verdict cached */
		}
	} else if ((f->proto != PROTO_ICMP && f->proto != PROTO_ICMPV6) ||
		   f->icmp_kind == ICMP_KIND_ECHO_REPLY) {
		/* ICMP has no reversed tuple except echo reply -> echo request. */
		other->ep_id = ep->ep_id;
		other->egress = !egress;
		other->proto = f->proto;
		other->pad = 0;
		copy16(other->saddr, f->daddr);
		copy16(other->daddr, f->saddr);
		other->sport = f->dport;
		other->dport = f->sport;
		entry = ct.lookup(other);
		if (entry && entry->expires_ns > now) {
			state = CT_REPLY;
			if (!(entry->flags & CT_F_DENIED) &&
			    (!entry->verdict_gen || entry->verdict_gen == gen)) {
				ct_touch(entry, f, 1, cfg, now, skb->len);
				if (entry->verdict_gen)
					goto pass_cached;
				goto pass; /* REPLY, its flow's verdict is current (or never cached) */
			}
			if ((entry->flags & CT_F_DENIED) && gen && entry->verdict_gen == gen)
				goto tombstone; /* REPLY of a denied flow */
			/* else: policy changed since the flow's verdict: check it again */
		}
	}

	s->ep = *ep;
	s->state = state;
	policy_calls.call(skb, dir);
	return drop(skb, DROP_MISSED_TAIL_CALL, dir, ep, f, 0, state);

tombstone:
	/* Keep the tombstone as long as the flow keeps trying. */
	entry->expires_ns = now + ct_lifetime(cfg, f->proto, entry->flags);
	return drop(skb, DROP_POLICY, dir, ep, f, 0, state);

pass_cached:
	if (egress) {
		frag_record(ep, egress, f);
		count(0, dir, skb->len);
		ret = local_deliver(skb, s, cfg, gen, now);
		return ret ? ret : TC_ACT_OK;
	}
pass:
	frag_record(ep, egress, f);
pass_untracked:
	count(0, dir, skb->len);
	return TC_ACT_OK;
}

/* Second half: policy verdict for NEW and ESTABLISHED packets, CT upkeep. */
static __always_inline int enforce(struct __sk_buff *skb, int egress)
{
	__u8 dir = egress ? DIR_EGRESS : DIR_INGRESS;
	__u32 zero = 0;
	struct scratch *s = scratch_map.lookup(&zero);
	if (!s)
		return TC_ACT_SHOT;
	struct endpoint_info *ep = &s->ep;
	struct flow *f = &s->f;
	struct dp_config *cfg = config.lookup(&zero);
	__u32 gen = cache_generation(cfg); /* before the lookups, see cache_generation() */
	__u64 now = bpf_ktime_get_coarse_ns();
	__u8 state = s->state;

	/* A REPLY is checked as its flow: the entry's direction, the flow's destination
	 * port (this packet's source port; ICMP: the echo request). */
	int reply = state == CT_REPLY;
	__u8 pegress = reply ? !egress : egress;
	__u16 pport = f->policy_port;
	if (reply)
		pport = f->proto == PROTO_ICMP ? 8 : f->proto == PROTO_ICMPV6 ? 128 :
			bpf_ntohs(f->sport);

	/* The peer's identity (the remote end, whichever direction decides). */
	__u32 peer = ipcache_lookup(f, egress ? f->daddr : f->saddr);
	if (!pegress) {
		if (!egress && (skb->mark & MARK_MAGIC_MASK) == MARK_MAGIC_HOST)
			peer = IDENTITY_HOST;
		else if (peer == IDENTITY_HOST && (skb->mark & MARK_MAGIC_MASK) != MARK_MAGIC_FROM_PROXY)
			peer = IDENTITY_WORLD; /* e.g. SNATed to the node address */
		/* The proxy's upstream keeps its client's address, the host's included. */
	}

	struct policy_entry *decider = 0;
	__u32 enforced = pegress ? EP_F_ENFORCE_EGRESS : EP_F_ENFORCE_INGRESS;
	__u8 verdict = policy_lookup(ep, pegress, peer, f->proto, pport,
				     (ep->flags & enforced) != 0, &decider);
	if (decider) {
		__sync_fetch_and_add(&decider->packets, 1);
		__sync_fetch_and_add(&decider->bytes, skb->len);
	}
	struct ct_key *flow_key = reply ? &s->other : &s->key;
	if (verdict == VERDICT_DENY || (verdict == NO_HIT && (ep->flags & enforced))) {
		/* CT on deny: the flow's entry becomes a tombstone under this generation. */
		struct ct_entry *dead = state != CT_NEW ? ct.lookup(flow_key) : 0;
		if (dead) {
			dead->flags |= CT_F_DENIED;
			dead->verdict_gen = gen;
			dead->expires_ns = now + ct_lifetime(cfg, f->proto, dead->flags);
		}
		return drop(skb, DROP_POLICY, dir, ep, f, peer, state);
	}
	if (reply) {
		/* The flow is allowed again or still: its entry carries the new verdict. Replies
		 * never take the proxy mark. */
		struct ct_entry *e = ct.lookup(flow_key);
		if (e) {
			ct_touch(e, f, 1, cfg, now, skb->len);
			e->flags &= ~CT_F_DENIED;
			e->verdict_gen = verdict == VERDICT_REDIRECT ? 0 : gen;
		}
		frag_record(ep, egress, f);
		count(0, dir, skb->len);
		return TC_ACT_OK;
	}
	/* A plain pass is cached under `gen`; a REDIRECT clears the cache. Uncacheable
	 * packets leave it alone: what it holds was decided for cacheable ones. */
	int cacheable = verdict_cacheable(skb, f, egress);
	if (verdict == VERDICT_REDIRECT && (skb->mark & MARK_MAGIC_MASK) == MARK_MAGIC_FROM_PROXY)
		verdict = VERDICT_ALLOW; /* the proxy's upstream: L7 was applied there */
	__u32 reentry = 0;
	__u8 reentry_mac[6] = {};
	if (verdict == VERDICT_REDIRECT) {
		gen = 0;
		/* No re-entry device (proxy off): marked and passed, as on egress without
		 * the nftables rules; L7 is then not enforced (NOTES.md, Known limits). */
		if (!egress && cfg && decider) {
			reentry = cfg->reentry_ifindex;
			__builtin_memcpy(reentry_mac, cfg->reentry_mac, 6);
		}
		if (decider)
			skb->mark = MARK_MAGIC_TO_PROXY | ((__u32)decider->proxy_port << 16);
	}
	struct ct_entry *entry = state == CT_ESTABLISHED ? ct.lookup(&s->key) : 0;
	if (entry) {
		ct_touch(entry, f, 0, cfg, now, skb->len);
		entry->flags &= ~CT_F_DENIED;
		if (cacheable || verdict == VERDICT_REDIRECT)
			entry->verdict_gen = gen;
	} else {
		/* NEW, or an entry that vanished since classify: (re)create it. */
		struct ct_entry fresh = {};
		fresh.flags = tcp_ct_flags(f, 0, 0);
		fresh.expires_ns = now + ct_lifetime(cfg, f->proto, fresh.flags);
		fresh.packets = 1;
		fresh.bytes = skb->len;
		fresh.verdict_gen = cacheable ? gen : 0;
		ct.update(&s->key, &fresh);
		if (state == CT_NEW && cfg && (cfg->flags & CFG_F_TRACE_NEW))
			emit(skb, EVENT_TRACE, 0, dir, ep, f, peer, CT_NEW);
	}
	frag_record(ep, egress, f);
	count(0, dir, skb->len);
	if (reentry) {
		if (bpf_skb_store_bytes(skb, 0, reentry_mac, 6, 0) < 0)
			return drop(skb, DROP_WRITE_ERROR, dir, ep, f, peer, state);
		return bpf_redirect(reentry, BPF_F_INGRESS);
	}
	return TC_ACT_OK;
}

int from_pod(struct __sk_buff *skb)
{
	return classify(skb, 1);
}

int to_pod(struct __sk_buff *skb)
{
	return classify(skb, 0);
}

int policy_from_pod(struct __sk_buff *skb)
{
	return enforce(skb, 1);
}

int policy_to_pod(struct __sk_buff *skb)
{
	return enforce(skb, 0);
}
