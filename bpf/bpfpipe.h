/* bpfpipe.h — the kernel side every bpfpipe BPF program includes: the maps
 * and helpers that implement the sampling gate and the ring buffer's
 * conservation law. What user space shares with the kernel (event header,
 * counter indices, defaults) is in bpfpipe_types.h, included here.
 *
 * Every program gets:
 *   - `events`          the ring buffer (size from config: BPFPIPE_RINGBUF_PAGES pages)
 *   - `bpfpipe_stats`   per-CPU counters, indexed by enum bpfpipe_stat
 *   - `bpfpipe_rate`    the in-kernel sampling gate: rate N keeps 1 in N (0/1 keep all)
 *
 * A program emits an event with bpfpipe_gate() -> bpfpipe_reserve() ->
 * bpfpipe_fill_hdr() -> bpfpipe_submit(); each step counts, so
 *   STAT_EVENTS == STAT_SAMPLED_OUT + STAT_LOST_RESERVE + STAT_EMITTED
 * holds by construction.
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
 * increment is already visible, so stats read after consuming never lag the ring. */
static __always_inline void bpfpipe_submit(void *slot)
{
    bpfpipe_count(STAT_EMITTED);
    events.ringbuf_submit(slot, 0);
}

#endif /* BPFPIPE_H */
