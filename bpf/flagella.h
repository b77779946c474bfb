/* Flagella datapath: map key/value layouts shared by flagella.c and the layout probe.
 *
 * Every struct here is mirrored by a ctypes Structure in
 * src/flagella/datapath/maps.py (or events.py for struct event) that quotes it;
 * tests/datapath/test_bpf_layout.py compiles these declarations with bcc and
 * checks sizes and offsets against the mirrors. Change both sides together.
 *
 * Conventions:
 *  - Addresses in ct_key and struct event are 16 bytes; IPv4 is stored
 *    IPv4-mapped (::ffff:a.b.c.d), so one key format serves both families.
 *  - Ports in ct_key, frag4_ports and struct event are network order (as on
 *    the wire); policy_key.port is host order with its low wild_bits zeroed.
 */
#ifndef FLAGELLA_H
#define FLAGELLA_H

#include <linux/types.h>

/* endpoints: HASH u32 ifindex (host-side veth) -> endpoint_info */
#define EP_F_ENFORCE_INGRESS 0x1
#define EP_F_ENFORCE_EGRESS 0x2

struct endpoint_info {
	__u32 ep_id;
	__u32 identity;
	__u32 flags;              /* EP_F_* */
	__u32 ingress_wild_mask;  /* bit n: ingress entries with n low port bits wildcarded exist */
	__u32 egress_wild_mask;   /* same for egress; n = 0..16 */
	__be32 ipv4;              /* anti-spoofing: the only IPv4 source the pod may use */
	__u8 ipv6[16];            /* the only global IPv6 source (fe80::/10 and :: also pass) */
};

/* policy: HASH policy_key -> policy_entry */
#define VERDICT_ALLOW 1
#define VERDICT_DENY 2
#define VERDICT_REDIRECT 3
#define VERDICT_PASS 4      /* ClusterNetworkPolicy Pass: let the normal tier decide */

struct policy_key {
	__u32 ep_id;
	__u32 identity;   /* 0 = any peer */
	__u8 egress;      /* 0 ingress (to pod), 1 egress (from pod) */
	__u8 protocol;    /* 0 = any protocol, then wild_bits must be 16 */
	__u8 wild_bits;   /* number of low port bits wildcarded, 0..16 */
	__u8 pad;
	__u16 port;       /* host order, low wild_bits bits zero; ICMP/ICMPv6: the type */
	__u16 pad2;
};

struct policy_entry {
	__u8 verdict;       /* VERDICT_* */
	__u8 pad;
	__u16 proxy_port;   /* host order, for VERDICT_REDIRECT */
	__s32 precedence;   /* 0 normal tier; > 0 admin tier (higher first); < 0 baseline tier */
	__u64 packets;      /* packets this entry decided */
	__u64 bytes;
};

/* ipcache4 / ipcache6: LPM_TRIE -> remote_info; a miss is identity 2 (world) */
struct ipcache4_key {
	__u32 prefixlen;
	__be32 addr;
};

struct ipcache6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct remote_info {
	__u32 identity;
	__u32 flags;
};

/* ct: LRU_HASH ct_key -> ct_entry, one entry per endpoint, direction and flow.
 * A reply (the reversed tuple of an entry) is checked again against the policy of the
 * entry's direction when the entry's verdict_gen is stale; a flow that policy denies
 * keeps its entry as a tombstone (CT_F_DENIED), so the other side cannot reopen it as
 * a new flow of an unenforced direction and get the peer's packets in as its replies. */
#define CT_F_SEEN_NON_SYN 0x1
#define CT_F_CLOSING_FWD 0x2
#define CT_F_CLOSING_REV 0x4
#define CT_F_DENIED 0x8   /* tombstone: policy now denies this flow; packets of either
			   * direction drop until a later generation allows it again */

struct ct_key {
	__u32 ep_id;
	__u8 egress;      /* direction of the packet that created the entry */
	__u8 proto;
	__u16 pad;
	__u8 saddr[16];   /* IPv4-mapped for IPv4 */
	__u8 daddr[16];
	__be16 sport;     /* ICMP echo: the echo id in both; other ICMP: type, 0 */
	__be16 dport;
};

/* Verdict cache: an ESTABLISHED packet whose entry has verdict_gen equal to the
 * config map's generation (never 0) passes without the policy lookup. The policy
 * program stores the generation it read before its lookups when the verdict was a
 * plain pass (ALLOW, or no hit in an unenforced direction); never for a REDIRECT (the
 * mark is needed on every packet), a packet towards a pod carrying the host mark (its
 * peer identity comes from the mark, not the tuple) or an ICMP echo reply (it shares
 * its tuple with echo requests): those always take the full lookup. The control plane
 * bumps the generation after every change of policy, endpoints or ipcache, so the next
 * packet of every flow is checked again. */
struct ct_entry {
	__u64 expires_ns;  /* absolute CLOCK_MONOTONIC, from bpf_ktime_get_coarse_ns() (<= 1 tick behind) */
	__u64 packets;
	__u64 bytes;
	__u32 flags;       /* CT_F_* */
	__u32 verdict_gen; /* generation of the cached pass verdict; 0 = none */
};

/* config: ARRAY[1]; a zero lifetime means the built-in default */
#define CFG_F_TRACE_NEW 0x1   /* emit a trace event for every new flow that passes */
#define CFG_F_LOCAL_DELIVERY 0x2 /* from_pod hands cached flows between local pods straight
				  * to the destination (see local_deliver() in flagella.c) */

struct dp_config {
	__u64 ct_tcp_ns;
	__u64 ct_syn_ns;
	__u64 ct_non_tcp_ns;
	__u64 ct_closing_ns;
	__u32 flags;       /* CFG_F_* */
	__u32 generation;  /* verdict cache generation (see ct_entry); 0 = no caching */
	__u32 reentry_ifindex; /* proxy re-entry device for ingress redirects; 0 = none (mark only) */
	__u8 reentry_mac[6];   /* its MAC: the destination MAC of a redirected frame */
	__u16 pad;
};

/* frag4: LRU_HASH frag4_key -> frag4_ports, recorded by a first fragment that passed */
struct frag4_key {
	__u32 ep_id;
	__u8 egress;
	__u8 proto;
	__be16 ip_id;     /* as on the wire */
	__be32 saddr;
	__be32 daddr;
};

struct frag4_ports {
	__be16 sport;     /* ICMP: the echo id (echo) or 0 */
	__be16 dport;     /* ICMP: htons(type) */
};

/* frag6: LRU_HASH frag6_key -> frag4_ports, recorded by a first IPv6 fragment that passed.
 * proto is the Next Header of the fragment header (the same in every fragment). */
struct frag6_key {
	__u32 ep_id;
	__u8 egress;
	__u8 proto;
	__u16 pad;
	__be32 frag_id;   /* as on the wire */
	__u8 saddr[16];
	__u8 daddr[16];
};

/* metrics: PERCPU_HASH metrics_key -> metrics_value, drops (reason > 0); older builds
 * also counted forwarded packets here (reason 0).
 * forwarded: PERCPU_ARRAY[4] __u32 DIR_* -> metrics_value, forwarded packets. */
#define DIR_INGRESS 1  /* to the pod */
#define DIR_EGRESS 2   /* from the pod */

struct metrics_key {
	__u8 reason;      /* 0 forwarded, else the (positive) drop reason */
	__u8 dir;         /* DIR_* */
	__u16 pad;
};

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

/* events: RINGBUF of struct event */
#define EVENT_DROP 1
#define EVENT_TRACE 2

#define CT_NEW 0
#define CT_ESTABLISHED 1
#define CT_REPLY 2
#define CT_RELATED 3

struct event {
	__u8 type;          /* EVENT_* */
	__u8 reason;        /* drop reason, 0 for trace */
	__u8 dir;           /* DIR_* */
	__u8 family;        /* 4 or 6, 0 if the packet was not parsed that far */
	__u8 proto;
	__u8 ct_state;      /* CT_* */
	__u16 pad;
	__u32 ep_id;
	__u32 src_identity; /* 0 = not resolved */
	__u32 dst_identity;
	__u8 saddr[16];     /* IPv4-mapped for IPv4 */
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u32 len;          /* skb->len */
};

#endif /* FLAGELLA_H */
