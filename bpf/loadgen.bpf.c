/* loadgen.bpf.c — a ring-buffer load generator driven from user space.
 *
 * Each getppid(2) call by the process named in loadgen_cfg produces K events,
 * all through the sampling gate, so the kernel-side conservation law holds for
 * synthetic load exactly as for real events. Every other process's getppid()
 * costs one map lookup.
 */
#include "bpfpipe.h"
#include "loadgen.h"

BPF_ARRAY(loadgen_cfg, struct loadgen_config, 1);
BPF_PERCPU_ARRAY(loadgen_seq, u64, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    u32 zero = 0;
    struct loadgen_config *cfg = loadgen_cfg.lookup(&zero);
    if (!cfg || cfg->tgid == 0)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid != cfg->tgid)
        return 0;
    u64 *seq = loadgen_seq.lookup(&zero);
    if (!seq)
        return 0;
    u32 wanted = cfg->events_per_call;

    bpfpipe_count(STAT_PROCESSED);
    for (u32 i = 0; i < LOADGEN_MAX_EVENTS_PER_CALL; i++) {
        if (i >= wanted)
            break;
        u64 this_seq = *seq;
        *seq = this_seq + 1;
        u32 rate = bpfpipe_gate();
        if (!rate)
            continue;
        struct loadgen_event *event = bpfpipe_reserve(sizeof(*event));
        if (!event)
            continue;
        bpfpipe_fill_hdr(&event->hdr, EVENT_LOADGEN, rate);
        event->seq = this_seq;
        event->payload = ((u64)tgid << 32) | i;
        bpfpipe_submit(event);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_getpriority) { return bpfpipe_heartbeat(args->which, args->who); }
