"""The paced producer the loadgen benchmarks share: a process that calls getppid()
``calls_per_s`` times a second (the loadgen BPF program turns each call into K events)
and dies with the benchmark (PR_SET_PDEATHSIG)."""

PACED_PRODUCER = """\
import ctypes, os, signal, sys, time
ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the benchmark
getppid = os.getppid
calls_per_s = float(sys.argv[1])
start = time.monotonic()
done = 0
while True:
    due = int((time.monotonic() - start) * calls_per_s)
    if due <= done:
        time.sleep(0.0005)
        continue
    for _ in range(due - done):
        getppid()
    done = due
"""
