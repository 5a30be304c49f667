/* xdp_firewall.bpf.c — IPv4 blocklist and per-source rate limit at XDP.
 *
 * For each frame: count it (STAT_PROCESSED); pass anything that is not IPv4;
 * drop IPv4 from a blocked source, then from a source over its rate limit;
 * report every drop (STAT_DROPPED, and a drop event through the sampling
 * gate); record the time spent in the program in latency_hist.
 * Frames too short for the headers they claim pass and count as STAT_ERRORS:
 * the stack, not the firewall, decides what malformed traffic means.
 *
 * The rate limit is GCRA (a token bucket kept as one "theoretical arrival
 * time" per source): a source may send `burst` packets back to back, then one
 * per 1/pps seconds. The state is shared by all CPUs and updated with
 * compare-and-swap, because LRU hash values cannot hold a bpf_spin_lock.
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>

#include "bpfpipe.h"
#include "xdp_firewall.h"

#define XDP_NSEC_PER_SEC 1000000000ULL
#define XDP_IP_FRAG_OFFSET 0x1FFF
#define XDP_RATE_CAS_ATTEMPTS 4

BPF_HASH(blocked_v4, u32, u8, BPFPIPE_MAP_SIZE); /* IPv4 source (network byte order) -> 1 */
BPF_ARRAY(rate_limit_cfg, struct xdp_rate_limit, 1);
BPF_TABLE("lru_hash", u32, u64, rate_limit_state, BPFPIPE_MAP_SIZE); /* source -> GCRA arrival time, ns */
BPF_PERCPU_ARRAY(latency_hist, u64, LAT__MAX);

/* The first four bytes of TCP and UDP headers. */
struct xdp_l4_ports {
    __be16 source;
    __be16 dest;
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

/* True when the packet from `saddr` arriving at `now_ns` exceeds the limit. */
static __always_inline bool xdp_over_rate(u32 saddr, u64 now_ns)
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

    u64 *arrival = rate_limit_state.lookup(&saddr);
    if (!arrival) {
        u64 first = now_ns + interval_ns;
        if (rate_limit_state.insert(&saddr, &first) == 0)
            return false;
        /* Another CPU created it first: take its state. */
        arrival = rate_limit_state.lookup(&saddr);
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

static __always_inline void xdp_report_drop(struct xdp_md *ctx, struct iphdr *ip, void *data_end,
                                            u8 reason, u32 pkt_len)
{
    u16 sport = 0, dport = 0;
    u32 header_len = ip->ihl * 4;
    u8 protocol = ip->protocol;

    if ((protocol == IPPROTO_TCP || protocol == IPPROTO_UDP) &&
        !(ip->frag_off & htons(XDP_IP_FRAG_OFFSET))) {
        struct xdp_l4_ports *ports = (void *)ip + header_len;
        if ((void *)(ports + 1) <= data_end) {
            sport = ntohs(ports->source);
            dport = ntohs(ports->dest);
        }
    }

    u32 rate = bpfpipe_gate();
    if (!rate)
        return;
    struct xdp_drop_event *event = bpfpipe_reserve(sizeof(*event));
    if (!event)
        return;
    bpfpipe_fill_hdr(&event->hdr, EVENT_XDP_DROP, rate);
    event->saddr = ntohl(ip->saddr);
    event->daddr = ntohl(ip->daddr);
    event->sport = sport;
    event->dport = dport;
    event->protocol = protocol;
    event->reason = reason;
    event->__pad0 = 0;
    event->pkt_len = pkt_len;
    event->ifindex = ctx->ingress_ifindex;
    bpfpipe_submit(event);
}

int xdp_firewall(struct xdp_md *ctx)
{
    u64 start_ns = bpf_ktime_get_ns();
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip;
    u8 reason;

    bpfpipe_count(STAT_PROCESSED);
    if ((void *)(eth + 1) > data_end) {
        bpfpipe_count(STAT_ERRORS);
        return xdp_finish(start_ns, XDP_PASS);
    }
    if (eth->h_proto != htons(ETH_P_IP))
        return xdp_finish(start_ns, XDP_PASS);
    ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->ihl < 5) {
        bpfpipe_count(STAT_ERRORS);
        return xdp_finish(start_ns, XDP_PASS);
    }

    u32 saddr = ip->saddr;
    if (blocked_v4.lookup(&saddr))
        reason = DROP_BLOCKED;
    else if (xdp_over_rate(saddr, start_ns))
        reason = DROP_RATE_LIMITED;
    else
        return xdp_finish(start_ns, XDP_PASS);

    bpfpipe_count(STAT_DROPPED);
    xdp_report_drop(ctx, ip, data_end, reason, (u32)(data_end - data));
    return xdp_finish(start_ns, XDP_DROP);
}
