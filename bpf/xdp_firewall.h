/* xdp_firewall.h — event schema and map layouts of the XDP firewall
 * (xdp_firewall.bpf.c): blocklist and per-source rate limit for IPv4.
 *
 * One schema source: the loader derives the drop event's numpy dtype from
 * clang's layout of the struct listed in BPFPIPE_EVENTS below.
 */
#ifndef BPFPIPE_XDP_FIREWALL_H
#define BPFPIPE_XDP_FIREWALL_H

#include "bpfpipe_types.h"

/* Type ids are unique across bpfpipe's programs and start at 1. */
enum xdp_firewall_event_type {
    EVENT_XDP_DROP = 3,
};

enum xdp_drop_reason {
    DROP_BLOCKED = 1,      /* source address is in blocked_v4 */
    DROP_RATE_LIMITED = 2, /* source exceeded rate_limit_cfg */
};

/* One dropped packet. Addresses and ports are in host byte order, so
 * ipaddress.IPv4Address(int(saddr)) reads them directly. */
struct xdp_drop_event {
    struct bpfpipe_hdr hdr;
    u32 saddr;
    u32 daddr;
    u16 sport;     /* 0 unless TCP/UDP and the first fragment */
    u16 dport;
    u8 protocol;   /* IPPROTO_* */
    u8 reason;     /* enum xdp_drop_reason */
    u16 __pad0;
    u32 pkt_len;   /* bytes from the Ethernet header to the end of the frame */
    u32 ifindex;   /* ingress interface */
};

/* rate_limit_cfg[0]: per-source limit, shared by all CPUs. */
struct xdp_rate_limit {
    u32 pps;   /* packets per second per source address; 0 = no limit */
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
