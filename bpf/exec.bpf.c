/* exec.bpf.c — process exec and exit events, from tracepoints only.
 *
 * No kernel struct is read (the build headers need not match the running
 * kernel): parent, start time and exit code come from tracepoint arguments
 * and helpers, joined through exec_procs.
 *
 *   sched_process_fork     remember child tid -> (parent tgid, fork time)
 *   sched_process_exec     emit an exec event
 *   sys_enter_exit_group   remember the exit status of the thread group
 *   sched_process_exit     forget the tid; for a group leader, emit an exit event
 *
 * Every exiting thread deletes its own entry, so exec_procs holds at most the
 * live threads that were forked (or exec'd) while the program was loaded.
 */
#include "bpfpipe.h"
#include "exec.h"

BPF_HASH(exec_procs, u32, struct exec_proc, BPFPIPE_MAP_SIZE);

static __always_inline void exec_remember(u32 tid, struct exec_proc *proc)
{
    /* A full map loses lineage for this process, not the event itself. */
    if (exec_procs.update(&tid, proc) != 0)
        bpfpipe_count(STAT_ERRORS);
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    struct exec_proc proc = {};
    u32 child = args->child_pid;

    bpfpipe_count(STAT_PROCESSED);
    proc.start_ns = bpf_ktime_get_ns();
    proc.ppid = bpf_get_current_pid_tgid() >> 32;
    proc.exit_code = EXEC_EXIT_CODE_UNKNOWN;
    exec_remember(child, &proc);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 pid = args->pid;
    u32 old_pid = args->old_pid;
    u32 ppid = 0;
    struct exec_proc *known;

    bpfpipe_count(STAT_PROCESSED);
    known = exec_procs.lookup(&pid);
    if (!known && old_pid != pid) {
        /* A non-leader thread exec'd and took over the group's pid. */
        known = exec_procs.lookup(&old_pid);
        if (known) {
            struct exec_proc moved = *known;
            exec_procs.delete(&old_pid);
            exec_remember(pid, &moved);
            known = exec_procs.lookup(&pid);
        }
    }
    if (known) {
        ppid = known->ppid;
    } else {
        struct exec_proc fresh = {};
        fresh.start_ns = bpf_ktime_get_ns();
        fresh.exit_code = EXEC_EXIT_CODE_UNKNOWN;
        exec_remember(pid, &fresh);
    }

    u32 rate = bpfpipe_gate();
    if (!rate)
        return 0;
    struct exec_event *event = bpfpipe_reserve(sizeof(*event));
    if (!event)
        return 0;
    /* Ring memory is not zeroed: clear the record so its NUL-padded strings
     * leak nothing from earlier events. (Whole struct: its 8-byte alignment
     * lets clang inline the stores instead of calling memset.) */
    __builtin_memset(event, 0, sizeof(*event));
    bpfpipe_fill_hdr(&event->hdr, EVENT_EXEC, rate);
    event->pid = pid;
    event->ppid = ppid;
    event->uid = (u32)bpf_get_current_uid_gid();
    bpf_get_current_comm(&event->comm, sizeof(event->comm));
    unsigned short offset = args->data_loc_filename & 0xFFFF;
    long copied = bpf_probe_read_kernel_str(event->filename, sizeof(event->filename),
                                            (char *)args + offset);
    if (copied > 0)
        event->filename_len = copied - 1;
    else if (copied < 0)
        bpfpipe_count(STAT_ERRORS);
    bpfpipe_submit(event);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    s32 status = args->error_code & 0xff;
    struct exec_proc *known;

    bpfpipe_count(STAT_PROCESSED);
    /* Keyed by tgid: whichever thread calls exit_group, the leader reports it. */
    known = exec_procs.lookup(&tgid);
    if (known) {
        known->exit_code = status;
    } else {
        struct exec_proc fresh = {};
        fresh.exit_code = status;
        exec_remember(tgid, &fresh);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u32 tgid = id >> 32;
    u64 now = bpf_ktime_get_ns();
    u64 start_ns = 0;
    u32 ppid = 0;
    s32 exit_code = EXEC_EXIT_CODE_UNKNOWN;
    struct exec_proc *known;

    bpfpipe_count(STAT_PROCESSED);
    known = exec_procs.lookup(&tid);
    if (known) {
        start_ns = known->start_ns;
        ppid = known->ppid;
        exit_code = known->exit_code;
        exec_procs.delete(&tid);
    }
    if (tid != tgid)
        return 0; /* a thread, not the process */

    u32 rate = bpfpipe_gate();
    if (!rate)
        return 0;
    struct exit_event *event = bpfpipe_reserve(sizeof(*event));
    if (!event)
        return 0;
    bpfpipe_fill_hdr(&event->hdr, EVENT_EXIT, rate);
    event->pid = tgid;
    event->ppid = ppid;
    event->uid = (u32)bpf_get_current_uid_gid();
    event->exit_code = exit_code;
    event->lifetime_ns = (start_ns && now > start_ns) ? now - start_ns : 0;
    bpf_get_current_comm(&event->comm, sizeof(event->comm));
    bpfpipe_submit(event);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_getpriority) { return bpfpipe_heartbeat(args->which, args->who); }
