/* bpfpipe.h — shared by every bpfpipe BPF program. One schema source: the
 * event structs here (and in each program's header) are what user space
 * decodes; the loader derives numpy dtypes from clang's layout of them.
 *
 * Every program gets:
 *   - `events`          the ring buffer (size from config: BPFPIPE_RINGBUF_PAGES pages)
 *   - `bpfpipe_stats`   per-CPU counters, indexed by enum bpfpipe_stat
 *   - `bpfpipe_rate`    the in-kernel sampling gate: rate N keeps 1 in N (0/1 keep all)
 *
 * Kernel-side conservation, per CPU and in total:
 *   STAT_EVENTS == STAT_SAMPLED_OUT + STAT_LOST_RESERVE + STAT_EMITTED
 * User space then accounts for every STAT_EMITTED event (read or drained).
 *
 * Each program's own header lists its events for the loader:
 *   #define BPFPIPE_EVENTS(X) X(type id >= 1, struct name, event name) ...
 * and every event struct begins with `struct bpfpipe_hdr hdr`.
 *
 * Compile programs through bpf/loader.py: bcc rewrites map method calls
 * (`bpfpipe_stats.lookup()` below) only in the main file, so the loader
 * splices this header into the program's text instead of letting clang
 * #include it.
 */
#ifndef BPFPIPE_H
#define BPFPIPE_H

#ifndef BPFPIPE_RINGBUF_PAGES
#define BPFPIPE_RINGBUF_PAGES 64
#endif
#ifndef BPFPIPE_MAP_SIZE
#define BPFPIPE_MAP_SIZE 65536
#endif

enum bpfpipe_stat {
    STAT_EVENTS = 0,       /* events produced: candidates for emission */
    STAT_SAMPLED_OUT = 1,  /* skipped by the sampling gate */
    STAT_LOST_RESERVE = 2, /* ring buffer full: reserve failed */
    STAT_EMITTED = 3,      /* submitted to the ring buffer */
    STAT_PROCESSED = 4,    /* program invocations (packets for XDP) */
    STAT_DROPPED = 5,      /* packets dropped (XDP) */
    STAT_ERRORS = 6,       /* helper failures, malformed input */
    STAT__MAX = 7,
};

/* Every event starts with this header. */
struct bpfpipe_hdr {
    u16 type;  /* event type id (per program, see its header) */
    u16 cpu;   /* bpf_get_smp_processor_id() */
    u32 rate;  /* sampling rate in effect when emitted: the event stands for `rate` events */
    u64 ts_ns; /* bpf_ktime_get_ns() */
};

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
