/* xdp_firewall.bpf.c — IPv4/IPv6 prefix blocklists and per-source rate limit at XDP.
 *
 * For each frame: count it (STAT_PROCESSED); pass anything that is neither IPv4
 * nor IPv6; drop a packet whose source is in a blocked prefix (blocked_v4,
 * blocked_v6: LPM tries, so one entry covers a whole CIDR prefix), then one from
 * a source over its rate limit; report every drop (STAT_DROPPED, and a drop event
 * through the sampling gate); record the time spent in the program in latency_hist.
 * Frames too short for the headers they claim pass and count as STAT_ERRORS:
 * the stack, not the firewall, decides what malformed traffic means.
 *
 * IPv6: only the fixed 40-byte header is parsed. The decision needs nothing
 * else (the source address is there), so extension headers are not walked: a
 * packet with them is blocked or limited like any other, and its drop event
 * carries the fixed header's next-header value as `protocol` and ports 0.
 *
 * The rate limit is GCRA (a token bucket kept as one "theoretical arrival
 * time" per source): a source may send `burst` packets back to back, then one
 * per 1/pps seconds. An IPv4 source is one address; an IPv6 source is its /64
 * (xdp_firewall.h: struct xdp_rate_key). The state is shared by all CPUs and
 * updated with compare-and-swap, because LRU hash values cannot hold a
 * bpf_spin_lock.
 *
 * User space changes the maps while the program runs (bpf/programs.py:
 * XdpFirewallProgram.apply_policy), inserting before deleting: each lookup sees
 * the trie before or after one update, never a cleared one.
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#include "bpfpipe.h"
#include "xdp_firewall.h"

#define XDP_NSEC_PER_SEC 1000000000ULL
#define XDP_IP_FRAG_OFFSET 0x1FFF
#define XDP_RATE_CAS_ATTEMPTS 4

BPF_LPM_TRIE(blocked_v4, struct xdp_lpm_v4, u8, BPFPIPE_MAP_SIZE); /* IPv4 prefix -> 1 */
BPF_LPM_TRIE(blocked_v6, struct xdp_lpm_v6, u8, BPFPIPE_MAP_SIZE); /* IPv6 prefix -> 1 */
BPF_ARRAY(rate_limit_cfg, struct xdp_rate_limit, 1);
BPF_TABLE("lru_hash", struct xdp_rate_key, u64, rate_limit_state, BPFPIPE_MAP_SIZE); /* -> GCRA arrival, ns */
BPF_PERCPU_ARRAY(latency_hist, u64, LAT__MAX);

/* The first four bytes of TCP and UDP headers. */
struct xdp_l4_ports {
    __be16 source;
    __be16 dest;
};

/* What a drop event says about the packet, gathered by the family's parser. */
struct xdp_packet {
    u8 family;
    u8 protocol;
    u16 sport;
    u16 dport;
    u32 saddr; /* IPv4, host byte order */
    u32 daddr;
    struct in6_addr *ip6_saddr; /* IPv6, in the packet */
    struct in6_addr *ip6_daddr;
};

static __always_inline int xdp_finish(u64 start_ns, int action)
{
    u64 elapsed_ns = bpf_ktime_get_ns() - start_ns;
    u32 bucket = elapsed_ns < 100    ? LAT_LT_100NS
                 : elapsed_ns < 500  ? LAT_LT_500NS
                 : elapsed_ns < 1000 ? LAT_LT_1US
                 : elapsed_ns < 5000 ? LAT_LT_5US
                 : elapsed_ns < 10000 ? LAT_LT_10US
                                      : LAT_GE_10US;
    u64 *count = latency_hist.lookup(&bucket);
    if (count)
        *count += 1;
    return action;
}

/* True when the packet from `key`'s source arriving at `now_ns` exceeds the limit. */
static __always_inline bool xdp_over_rate(struct xdp_rate_key *key, u64 now_ns)
{
    u32 zero = 0;
    struct xdp_rate_limit *cfg = rate_limit_cfg.lookup(&zero);
    if (!cfg || cfg->pps == 0)
        return false;
    u64 interval_ns = XDP_NSEC_PER_SEC / cfg->pps;
    if (interval_ns == 0)
        interval_ns = 1;
    u64 burst = cfg->burst ? cfg->burst : 1;
    u64 tolerance_ns = (burst - 1) * interval_ns;

    u64 *arrival = rate_limit_state.lookup(key);
    if (!arrival) {
        u64 first = now_ns + interval_ns;
        if (rate_limit_state.insert(key, &first) == 0)
            return false;
        /* Another CPU created it first: take its state. */
        arrival = rate_limit_state.lookup(key);
        if (!arrival) {
            bpfpipe_count(STAT_ERRORS);
            return false;
        }
    }
    for (int attempt = 0; attempt < XDP_RATE_CAS_ATTEMPTS; attempt++) {
        u64 seen = *(volatile u64 *)arrival;
        u64 base = seen > now_ns ? seen : now_ns;
        if (base - now_ns > tolerance_ns)
            return true;
        if (__sync_val_compare_and_swap(arrival, seen, base + interval_ns) == seen)
            return false;
    }
    /* Persistent contention on one source: let the packet through, visibly. */
    bpfpipe_count(STAT_ERRORS);
    return false;
}

static __always_inline void xdp_ports(struct xdp_packet *pkt, void *l4, void *data_end)
{
    if (pkt->protocol != IPPROTO_TCP && pkt->protocol != IPPROTO_UDP)
        return;
    struct xdp_l4_ports *ports = l4;
    if ((void *)(ports + 1) <= data_end) {
        pkt->sport = ntohs(ports->source);
        pkt->dport = ntohs(ports->dest);
    }
}

static __always_inline void xdp_report_drop(struct xdp_md *ctx, struct xdp_packet *pkt, u8 reason,
                                            u32 pkt_len)
{
    u32 rate = bpfpipe_gate();
    if (!rate)
        return;
    struct xdp_drop_event *event = bpfpipe_reserve(sizeof(*event));
    if (!event)
        return;
    bpfpipe_fill_hdr(&event->hdr, EVENT_XDP_DROP, rate);
    event->saddr = pkt->saddr;
    event->daddr = pkt->daddr;
    event->sport = pkt->sport;
    event->dport = pkt->dport;
    event->protocol = pkt->protocol;
    event->reason = reason;
    event->family = pkt->family;
    event->__pad0 = 0;
    event->pkt_len = pkt_len;
    event->ifindex = ctx->ingress_ifindex;
    if (pkt->ip6_saddr && pkt->ip6_daddr) {
        __builtin_memcpy(event->saddr6, pkt->ip6_saddr, sizeof(event->saddr6));
        __builtin_memcpy(event->daddr6, pkt->ip6_daddr, sizeof(event->daddr6));
    } else {
        __builtin_memset(event->saddr6, 0, sizeof(event->saddr6));
        __builtin_memset(event->daddr6, 0, sizeof(event->daddr6));
    }
    bpfpipe_submit(event);
}

/* 0 to pass; else the drop reason. */
static __always_inline u8 xdp_check_ipv4(struct iphdr *ip, void *data_end, struct xdp_packet *pkt, u64 now_ns)
{
    struct xdp_lpm_v4 prefix = {.prefixlen = 32};
    struct xdp_rate_key key = {};
    u8 reason = 0;

    __builtin_memcpy(prefix.addr, &ip->saddr, 4);
    if (blocked_v4.lookup(&prefix)) {
        reason = DROP_BLOCKED;
    } else {
        key.addr[10] = 0xff;
        key.addr[11] = 0xff;
        __builtin_memcpy(&key.addr[12], &ip->saddr, 4);
        if (xdp_over_rate(&key, now_ns))
            reason = DROP_RATE_LIMITED;
    }
    if (!reason)
        return 0;
    pkt->family = XDP_AF_INET;
    pkt->protocol = ip->protocol;
    pkt->saddr = ntohl(ip->saddr);
    pkt->daddr = ntohl(ip->daddr);
    if (!(ip->frag_off & htons(XDP_IP_FRAG_OFFSET)))
        xdp_ports(pkt, (void *)ip + ip->ihl * 4, data_end);
    return reason;
}

static __always_inline u8 xdp_check_ipv6(struct ipv6hdr *ip6, void *data_end, struct xdp_packet *pkt,
                                         u64 now_ns)
{
    struct xdp_lpm_v6 prefix = {.prefixlen = 128};
    struct xdp_rate_key key = {};
    u8 reason = 0;

    __builtin_memcpy(prefix.addr, &ip6->saddr, 16);
    if (blocked_v6.lookup(&prefix)) {
        reason = DROP_BLOCKED;
    } else {
        __builtin_memcpy(key.addr, &ip6->saddr, 8); /* the source's /64 */
        if (xdp_over_rate(&key, now_ns))
            reason = DROP_RATE_LIMITED;
    }
    if (!reason)
        return 0;
    pkt->family = XDP_AF_INET6;
    pkt->protocol = ip6->nexthdr;
    pkt->ip6_saddr = &ip6->saddr;
    pkt->ip6_daddr = &ip6->daddr;
    xdp_ports(pkt, ip6 + 1, data_end);
    return reason;
}

int xdp_firewall(struct xdp_md *ctx)
{
    u64 start_ns = bpf_ktime_get_ns();
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct xdp_packet pkt = {};
    u8 reason;

    bpfpipe_count(STAT_PROCESSED);
    if ((void *)(eth + 1) > data_end) {
        bpfpipe_count(STAT_ERRORS);
        return xdp_finish(start_ns, XDP_PASS);
    }
    if (eth->h_proto == htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end || ip->ihl < 5) {
            bpfpipe_count(STAT_ERRORS);
            return xdp_finish(start_ns, XDP_PASS);
        }
        reason = xdp_check_ipv4(ip, data_end, &pkt, start_ns);
    } else if (eth->h_proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end) {
            bpfpipe_count(STAT_ERRORS);
            return xdp_finish(start_ns, XDP_PASS);
        }
        reason = xdp_check_ipv6(ip6, data_end, &pkt, start_ns);
    } else {
        return xdp_finish(start_ns, XDP_PASS);
    }
    if (!reason)
        return xdp_finish(start_ns, XDP_PASS);

    bpfpipe_count(STAT_DROPPED);
    xdp_report_drop(ctx, &pkt, reason, (u32)(data_end - data));
    return xdp_finish(start_ns, XDP_DROP);
}

TRACEPOINT_PROBE(syscalls, sys_enter_getpriority) { return bpfpipe_heartbeat(args->which, args->who); }
