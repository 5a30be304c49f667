/* exec.h — what the exec program (exec.bpf.c) shares with user space: its
 * event schema (process exec and exit) and the value layout of exec_procs.
 *
 * One schema source: the loader derives numpy dtypes from clang's layout of the
 * structs listed in BPFPIPE_EVENTS below; nothing in Python restates them.
 * User space reads exec_procs too (bpf/programs.py: ExecProgram evicts the
 * entries with the oldest start_ns), so struct exec_proc lives here as well.
 * Records in the ring have two sizes (exec events are much larger than exit
 * events): read `type` from the header first.
 */
#ifndef BPFPIPE_EXEC_H
#define BPFPIPE_EXEC_H

#include "bpfpipe_types.h"

#define EXEC_COMM_LEN 16
#define EXEC_FILENAME_LEN 256
/* exit_code when the process ended without exit_group(2): killed by a signal,
 * or its last thread called exit(2). */
#define EXEC_EXIT_CODE_UNKNOWN (-1)

/* Type ids are unique across bpfpipe's programs and start at 1. */
enum exec_event_type {
    EVENT_EXEC = 1,
    EVENT_EXIT = 2,
};

/* A successful execve(2). */
struct exec_event {
    struct bpfpipe_hdr hdr;
    u32 pid;                          /* tgid after the exec */
    u32 ppid;                         /* parent tgid at fork; 0 if the fork was not seen */
    u32 uid;
    u32 filename_len;                 /* bytes in filename, without the NUL */
    char comm[EXEC_COMM_LEN];         /* NUL-padded */
    char filename[EXEC_FILENAME_LEN]; /* NUL-padded, truncated to EXEC_FILENAME_LEN - 1 */
};

/* A process (its thread group leader) exited. */
struct exit_event {
    struct bpfpipe_hdr hdr;
    u32 pid;
    u32 ppid;         /* parent tgid at fork; 0 if the fork was not seen */
    u32 uid;
    s32 exit_code;    /* exit_group(2) status & 0xff, or EXEC_EXIT_CODE_UNKNOWN */
    u64 lifetime_ns;  /* since fork (or since exec if the fork was not seen); 0 if neither */
    char comm[EXEC_COMM_LEN];
};

/* exec_procs value: what the program remembers about a live thread, keyed by tid. */
struct exec_proc {
    u64 start_ns;  /* fork time (exec time if the fork was not seen); 0 = unknown */
    u32 ppid;      /* parent tgid; 0 = unknown */
    s32 exit_code; /* from exit_group(2), else EXEC_EXIT_CODE_UNKNOWN */
};

/* X(type id, struct name, event name): what the loader turns into dtypes. */
#define BPFPIPE_EVENTS(X)                \
    X(EVENT_EXEC, exec_event, exec)      \
    X(EVENT_EXIT, exit_event, exit)

#endif /* BPFPIPE_EXEC_H */
