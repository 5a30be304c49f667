/* loadgen.h — event schema of the load generator (loadgen.bpf.c).
 *
 * The load generator turns each getppid(2) call of one configured process
 * into K fixed-size events, so benchmarks and overload tests can drive the
 * ring buffer hard from user space with a tight os.getppid() loop.
 */
#ifndef BPFPIPE_LOADGEN_H
#define BPFPIPE_LOADGEN_H

#include "bpfpipe_types.h"

/* Upper bound on events per call: keeps the loop bounded for the verifier. */
#define LOADGEN_MAX_EVENTS_PER_CALL 64

/* Type ids are unique across bpfpipe's programs and start at 1. */
enum loadgen_event_type {
    EVENT_LOADGEN = 4,
};

struct loadgen_event {
    struct bpfpipe_hdr hdr;
    u64 seq;     /* per-CPU count of produced events, before the gate: gaps are sampled or lost */
    u64 payload; /* tgid << 32 | index of the event within its call */
};

/* loadgen_cfg[0] */
struct loadgen_config {
    u32 tgid;            /* only this process's getppid() calls produce events; 0 = off */
    u32 events_per_call; /* K, clamped to LOADGEN_MAX_EVENTS_PER_CALL */
};

/* X(type id, struct name, event name): what the loader turns into dtypes. */
#define BPFPIPE_EVENTS(X) \
    X(EVENT_LOADGEN, loadgen_event, loadgen)

#endif /* BPFPIPE_LOADGEN_H */
