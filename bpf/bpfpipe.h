/* bpfpipe.h — the kernel side every bpfpipe BPF program includes: the maps
 * and helpers that implement the sampling gate and the ring buffer's
 * conservation law. What user space shares with the kernel (event header,
 * counter indices, defaults) is in bpfpipe_types.h, included here.
 *
 * Every program gets:
 *   - `events`          the ring buffer (size from config: BPFPIPE_RINGBUF_PAGES pages)
 *   - `bpfpipe_stats`   per-CPU counters, indexed by enum bpfpipe_stat
 *   - `bpfpipe_rate`    the in-kernel sampling gate: rate N keeps 1 in N (0/1 keep all)
 *   - `bpfpipe_wakeup`  wake-up moderation (struct bpfpipe_wakeup, mmap'able by the reader)
 *
 * A program emits an event with bpfpipe_gate() -> bpfpipe_reserve() ->
 * bpfpipe_fill_hdr() -> bpfpipe_submit(); each step counts, so
 *   STAT_EVENTS == STAT_SAMPLED_OUT + STAT_LOST_RESERVE + STAT_EMITTED
 * holds by construction.
 *
 * Wake-up moderation: by default the kernel wakes the reader for the first
 * record after it caught up, i.e. for nearly every event of a trickle (one
 * wake-up and one 1-event batch each). bpf_ringbuf_query() would tell how much
 * is pending, but bcc 0.26 does not rewrite it (`events` is no map pointer to
 * it), so bpfpipe_submit() keeps its own count instead: bytes submitted since
 * the reader last read (the reader stores 0 there before each read, through
 * the mmap). Records are submitted with BPF_RB_NO_WAKEUP, except the one that
 * brings the count to the threshold, which forces a wake-up. A threshold of 0
 * (the map's initial value: no bpfpipe reader set one) keeps the kernel's
 * default, so bcc's own consumers work unchanged. Wake-ups only; counting and
 * the conservation law above are untouched.
 *
 * Compile programs through bpf/loader.py: bcc rewrites map method calls
 * (`bpfpipe_stats.lookup()` below) only in the main file, so the loader
 * splices this header into the program's text instead of letting clang
 * #include it.
 */
#ifndef BPFPIPE_H
#define BPFPIPE_H

#include "bpfpipe_types.h"

BPF_RINGBUF_OUTPUT(events, BPFPIPE_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(bpfpipe_stats, u64, STAT__MAX);
BPF_ARRAY(bpfpipe_rate, u32, 1);
BPF_F_TABLE("array", u32, struct bpfpipe_wakeup, bpfpipe_wakeup, 1, BPF_F_MMAPABLE);

static __always_inline void bpfpipe_count(int stat)
{
    u32 key = stat;
    u64 *value = bpfpipe_stats.lookup(&key);
    if (value)
        *value += 1;
}

/* Count one produced event and pass it through the sampling gate.
 * Returns the rate to stamp in the event (>= 1), or 0 when sampled out. */
static __always_inline u32 bpfpipe_gate(void)
{
    u32 key = 0;
    u32 *configured = bpfpipe_rate.lookup(&key);
    u32 rate = (configured && *configured > 1) ? *configured : 1;
    bpfpipe_count(STAT_EVENTS);
    if (rate > 1 && (bpf_get_prandom_u32() % rate) != 0) {
        bpfpipe_count(STAT_SAMPLED_OUT);
        return 0;
    }
    return rate;
}

/* Reserve `size` bytes in the ring buffer for an event that passed the gate;
 * counts a lost reservation when the ring is full. */
static __always_inline void *bpfpipe_reserve(u64 size)
{
    void *slot = events.ringbuf_reserve(size);
    if (!slot)
        bpfpipe_count(STAT_LOST_RESERVE);
    return slot;
}

static __always_inline void bpfpipe_fill_hdr(struct bpfpipe_hdr *hdr, u16 type, u32 rate)
{
    hdr->type = type;
    hdr->cpu = bpf_get_smp_processor_id();
    hdr->rate = rate;
    hdr->ts_ns = bpf_ktime_get_ns();
}

/* Count before submitting: once user space can see a record, its STAT_EMITTED
 * increment is already visible, so stats read after consuming never lag the ring.
 * `size` is what was reserved; use bpfpipe_submit(slot) with a typed slot. */
static __always_inline void bpfpipe_submit_sized(void *slot, u64 size)
{
    u32 key = 0;
    u64 flags = 0;
    struct bpfpipe_wakeup *wakeup = bpfpipe_wakeup.lookup(&key);
    if (wakeup) {
        u64 threshold = wakeup->threshold_bytes;
        if (threshold) {
            flags = BPF_RB_NO_WAKEUP;
            /* Past the threshold the reader has been woken already: skip the atomic. */
            if (*(volatile u64 *)&wakeup->pending_bytes < threshold) {
                u64 bytes = (size + BPFPIPE_RINGBUF_HDR_BYTES + 7) & ~7ULL; /* as the ring counts */
                u64 before = __sync_fetch_and_add(&wakeup->pending_bytes, bytes);
                if (before < threshold && before + bytes >= threshold)
                    flags = BPF_RB_FORCE_WAKEUP;
            }
        }
    }
    bpfpipe_count(STAT_EMITTED);
    events.ringbuf_submit(slot, flags);
}

#define bpfpipe_submit(slot) bpfpipe_submit_sized((slot), sizeof(*(slot)))

/* The heartbeat. The agent calls getpriority(BPFPIPE_HEARTBEAT_KEY, marker) on a
 * timer; `which` is no valid PRIO_* value, so the call fails with EINVAL and
 * changes nothing, but its tracepoint fires first. A program registers the
 * heartbeat with one line:
 *   TRACEPOINT_PROBE(syscalls, sys_enter_getpriority) { return bpfpipe_heartbeat(args->which, args->who); }
 * and emits one struct bpfpipe_heartbeat into its own ring buffer, only for the
 * agent's tgid and its own key (the loader sets both per loaded program; 0: none).
 * Not through the gate (never sampled, rate 1), but counted like any event:
 * STAT_EVENTS, then STAT_LOST_RESERVE or STAT_EMITTED; not STAT_PROCESSED, which
 * counts the program's real work (packets). */
#ifndef BPFPIPE_HEARTBEAT_KEY
#define BPFPIPE_HEARTBEAT_KEY 0
#endif
#ifndef BPFPIPE_HEARTBEAT_TGID
#define BPFPIPE_HEARTBEAT_TGID 0
#endif

static __always_inline int bpfpipe_heartbeat(s64 which, s64 who)
{
    if (BPFPIPE_HEARTBEAT_KEY == 0 || (s32)which != BPFPIPE_HEARTBEAT_KEY)
        return 0;
    if ((u32)(bpf_get_current_pid_tgid() >> 32) != BPFPIPE_HEARTBEAT_TGID)
        return 0;
    bpfpipe_count(STAT_EVENTS);
    struct bpfpipe_heartbeat *beat = bpfpipe_reserve(sizeof(*beat));
    if (!beat)
        return 0;
    bpfpipe_fill_hdr(&beat->hdr, BPFPIPE_EVENT_HEARTBEAT, 1);
    beat->marker = (u32)who;
    beat->tgid = BPFPIPE_HEARTBEAT_TGID;
    beat->__pad = 0;
    bpfpipe_submit(beat);
    return 0;
}

#endif /* BPFPIPE_H */
