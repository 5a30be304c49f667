/* xdp_firewall.h — event schema and map layouts of the XDP firewall
 * (xdp_firewall.bpf.c): IPv4 and IPv6 prefix blocklists (LPM tries) and a
 * per-source rate limit.
 *
 * One schema source: the loader derives the drop event's numpy dtype from
 * clang's layout of the struct listed in BPFPIPE_EVENTS below; user space
 * (bpf/programs.py) builds map keys from bcc's ctypes of these structs.
 */
#ifndef BPFPIPE_XDP_FIREWALL_H
#define BPFPIPE_XDP_FIREWALL_H

#include "bpfpipe_types.h"

/* Type ids are unique across bpfpipe's programs and start at 1. */
enum xdp_firewall_event_type {
    EVENT_XDP_DROP = 3,
};

enum xdp_drop_reason {
    DROP_BLOCKED = 1,      /* source address is in blocked_v4 / blocked_v6 */
    DROP_RATE_LIMITED = 2, /* source exceeded rate_limit_cfg */
};

/* A drop event's `family`: the values of AF_INET / AF_INET6 on Linux. */
enum xdp_addr_family {
    XDP_AF_INET = 2,
    XDP_AF_INET6 = 10,
};

/* One dropped packet. IPv4 addresses are in saddr/daddr, in host byte order
 * (ipaddress.IPv4Address(int(saddr)) reads them), saddr6/daddr6 zero; IPv6
 * addresses are in saddr6/daddr6 as on the wire (ipaddress.IPv6Address(bytes(saddr6))),
 * saddr/daddr zero. bpf.firewall_policy.event_address reads either. */
struct xdp_drop_event {
    struct bpfpipe_hdr hdr;
    u32 saddr;
    u32 daddr;
    u16 sport;     /* 0 unless TCP/UDP and the first fragment (IPv6: TCP/UDP right after the fixed header) */
    u16 dport;
    u8 protocol;   /* IPPROTO_*; IPv6: the fixed header's next header */
    u8 reason;     /* enum xdp_drop_reason */
    u8 family;     /* enum xdp_addr_family */
    u8 __pad0;
    u32 pkt_len;   /* bytes from the Ethernet header to the end of the frame */
    u32 ifindex;   /* ingress interface */
    u8 saddr6[16];
    u8 daddr6[16];
};

/* Keys of the blocklists (BPF_LPM_TRIE): the prefix length in bits, then the
 * address bytes as on the wire. A lookup uses the full length (32 / 128). */
struct xdp_lpm_v4 {
    u32 prefixlen;
    u8 addr[4];
};

struct xdp_lpm_v6 {
    u32 prefixlen;
    u8 addr[16];
};

/* Key of rate_limit_state: an IPv4 source as an IPv4-mapped IPv6 address
 * (::ffff:a.b.c.d); an IPv6 source's /64 (the rest zero), because one IPv6 host
 * owns a whole /64 and could otherwise escape the limit, and fill the map, by
 * rotating addresses. The two forms never collide (bytes 10-11 are ff ff in one,
 * zero in the other). */
struct xdp_rate_key {
    u8 addr[16];
};

/* rate_limit_cfg[0]: per-source limit, shared by all CPUs. */
struct xdp_rate_limit {
    u32 pps;   /* packets per second per source; 0 = no limit */
    u32 burst; /* packets a source may send back to back; 0 is treated as 1 */
};

/* Per-packet processing time histogram (rows of latency_hist), upper bounds in ns.
 * User space names the rows from this enum (XdpFirewallProgram.latency_buckets). */
enum xdp_latency_bucket {
    LAT_LT_100NS = 0,
    LAT_LT_500NS = 1,
    LAT_LT_1US = 2,
    LAT_LT_5US = 3,
    LAT_LT_10US = 4,
    LAT_GE_10US = 5,
    LAT__MAX = 6,
};

/* X(type id, struct name, event name): what the loader turns into dtypes. */
#define BPFPIPE_EVENTS(X) \
    X(EVENT_XDP_DROP, xdp_drop_event, xdp_drop)

#endif /* BPFPIPE_XDP_FIREWALL_H */
