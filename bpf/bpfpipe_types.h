/* bpfpipe_types.h — what every bpfpipe BPF program shares with user space:
 * the event header, the per-CPU counter indices and the default sizes.
 * No maps and no helpers (those are kernel-only, in bpfpipe.h), as
 * libbpf-tools splits execsnoop.h from execsnoop.bpf.c.
 *
 * One schema source: user space never restates this file. The loader derives
 * the header's numpy dtype from clang's layout of struct bpfpipe_hdr, and
 * reads the STAT_* names and the BPFPIPE_* defaults from this text
 * (bpf/source.py: header_enum, header_define).
 *
 * Each program's own header (exec.h, ...) includes this one and lists its
 * events for the loader:
 *   #define BPFPIPE_EVENTS(X) X(type id >= 1, struct name, event name) ...
 * and every event struct begins with `struct bpfpipe_hdr hdr`.
 */
#ifndef BPFPIPE_TYPES_H
#define BPFPIPE_TYPES_H

/* Defaults; the loader passes the configured sizes as -D flags. */
#ifndef BPFPIPE_RINGBUF_PAGES
#define BPFPIPE_RINGBUF_PAGES 64
#endif
#ifndef BPFPIPE_MAP_SIZE
#define BPFPIPE_MAP_SIZE 65536
#endif

/* Rows of the per-CPU `bpfpipe_stats` array. Kernel-side conservation, per
 * CPU and in total:
 *   STAT_EVENTS == STAT_SAMPLED_OUT + STAT_LOST_RESERVE + STAT_EMITTED
 * User space then accounts for every STAT_EMITTED event (read or drained). */
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

/* The heartbeat (bpfpipe.h: bpfpipe_heartbeat()): an event the agent makes on a
 * timer to prove that events flow from the kernel through every stage. Its type id
 * is reserved in every program (programs number their own events below it); it is
 * never sampled (rate 1) and is consumed before the sink (Outcome.HEARTBEAT). */
#define BPFPIPE_EVENT_HEARTBEAT 255

struct bpfpipe_heartbeat {
    struct bpfpipe_hdr hdr;
    u64 marker; /* the agent's heartbeat number (getpriority's `who`) */
    u32 tgid;   /* the agent that asked for it */
    u32 __pad;
};

/* bpfpipe_wakeup[0]: wake-up moderation (see bpfpipe.h). An mmap'able array,
 * so the reader's per-read reset is a store, not a syscall. */
struct bpfpipe_wakeup {
    u64 pending_bytes;   /* ring bytes submitted since the reader last reset it (kernel adds, reader stores 0) */
    u64 threshold_bytes; /* force a wake-up when pending_bytes reaches this; 0 = the kernel's default wake-ups */
};

/* Bytes of the ring's own header before each record (BPF_RINGBUF_HDR_SZ). */
#define BPFPIPE_RINGBUF_HDR_BYTES 8

#endif /* BPFPIPE_TYPES_H */
