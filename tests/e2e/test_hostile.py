"""Hostile input, hostile outputs and signals at any moment (issue 13), the CLI run as a user runs it.

Whatever goes wrong, the user gets at most a line or two on stderr, never a traceback,
and an exit code a script can rely on: 2 for bad config or usage (an unwritable output
path included, found before any BPF program loads), 130/143 for a SIGINT/SIGTERM before
the pipeline started (or a second one that aborted it), 0 for a graceful stop (also when
the output is gone: closed stdout, full disk), 1 when the drain missed
``shutdown.drain_timeout_s`` (a stdout nobody reads). Log lines (logfmt, ``ts=...``) are
on stderr too; bpfpipe's own lines start with ``bpfpipe: ``. A flood of identical log
lines is folded into one line and a count.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli import (
    BPFPIPE,
    CLEAN_ENV,
    NO_SERVERS,
    assert_accounts_balance,
    assert_one_line_error,
    bpfpipe,
    own_lines,
    spawn,
    write_module,
)
from _tmpfs import mounted_tmpfs

# -- hostile config files and flags ---------------------------------------------------

DEEP_ARRAY = "a = " + "[" * 100_000 + "]" * 100_000 + "\n"
DEEP_TABLE = '[sink]\nuse = "null"\nconfig = ' + "{a = " * 40 + "1" + "}" * 40 + "\n"
HUGE = "# padding\n" * 200_000  # 2 MB


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'log_level = "\xff"\n', "config file is not valid UTF-8 (byte 13); save it as UTF-8"),
        ('log_level = "info"\n'.encode("utf-16"), "config file is UTF-16; save it as UTF-8"),
        (DEEP_ARRAY.encode(), "nested more than 32 levels deep"),
        (HUGE.encode(), "config file is larger than 1 MiB, the limit; is it the right file?"),
    ],
    ids=["invalid-utf8", "utf16", "deep-array", "huge"],
)
def test_unreadable_config_file_is_one_line_exit_2(tmp_path: Path, content: bytes, problem: str) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(content)
    assert_one_line_error(bpfpipe("check", str(config)), 2, f"{config}: {problem}")


def test_deep_stage_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(DEEP_TABLE)
    path = "sink.config" + ".a" * 30
    assert_one_line_error(bpfpipe("check", str(config)), 2, f"{path}: nested more than 32 levels deep")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xef\xbb\xbfmetrics_port = 9100\n")
    proc = bpfpipe("check", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "metrics_port = 9100" in proc.stdout


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "-inf"])
def test_duration_must_be_finite_and_positive(value: str) -> None:
    proc = bpfpipe("run", "--source", "synthetic", f"--duration={value}", timeout=10)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"bpfpipe: error: argument --duration: expected a finite number of seconds > 0, got '{value}'"
        " (see 'bpfpipe --help')"
    ]


@pytest.mark.parametrize(
    ("env", "flags", "shown"),
    [
        ({"BPF_LOG_LEVEL": "loud"}, ["--log-level", "info"], 'log_level = "info"'),
        ({"METRICS_PORT": "abc"}, ["--metrics-port", "9100"], "metrics_port = 9100"),
    ],
)
def test_flags_override_a_bad_environment(env: dict[str, str], flags: list[str], shown: str) -> None:
    proc = bpfpipe("check", *flags, env=env)
    assert proc.returncode == 0, proc.stderr
    assert shown in proc.stdout


def test_bad_debug_env_overridden_by_debug_flag() -> None:
    proc = bpfpipe("--debug", "check", env={"BPF_DEBUG": "maybe"})
    assert proc.returncode == 0, proc.stderr
    assert "enable_debug = true" in proc.stdout


def test_bad_environment_without_a_flag_is_one_line_exit_2() -> None:
    assert_one_line_error(
        bpfpipe("check", env={"BPF_LOG_LEVEL": "loud"}),
        2,
        'log_level: expected one of "debug", "info", "warning", "error", "critical", got "loud"',
    )


PLUGINS = {
    "exits": "import sys\nsys.exit(3)\n",
    "interrupts": "raise KeyboardInterrupt\n",
    "multiline": """
        from pipeline import BatchStage

        class Stage(BatchStage):
            def __init__(self, config, ctx):
                raise ValueError("first line\\nsecond line\\n  third")

            def process(self, batch):
                return batch
    """,
    "badresolve": """
        from pipeline import BatchStage

        class Stage(BatchStage):
            @classmethod
            def resolve_config(cls, config, settings):
                raise ValueError("needs a kernel newer than 9.9")

            def process(self, batch):
                return batch
    """,
}


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("exits", "stage 'exits:Stage': importing 'exits' raised SystemExit: 3"),
        ("interrupts", "stage 'interrupts:Stage': importing 'interrupts' raised KeyboardInterrupt"),
        (
            "multiline",
            "stage 'multiline:Stage': constructing it raised ValueError: first line second line third",
        ),
        ("badresolve", "stage 'badresolve:Stage': stages[0].config: needs a kernel newer than 9.9"),
    ],
)
def test_failing_plugin_is_named_in_one_line(tmp_path: Path, module: str, message: str) -> None:
    write_module(tmp_path, module, PLUGINS[module])
    config = tmp_path / "c.toml"
    config.write_text(f'[source]\nuse = "synthetic"\n[[stages]]\nuse = "{module}:Stage"\n')
    proc = bpfpipe("check", str(config), env={"PYTHONPATH": str(tmp_path)})
    assert_one_line_error(proc, 2, message)


# -- signals at any moment ------------------------------------------------------------

SLOW_SINK = """
    import trio
    from pipeline import BatchSink

    class Sink(BatchSink):
        async def write(self, batch):
            await trio.sleep(0.2)
"""


def _wait_for(predicate: object, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _bcc_loaded(proc: subprocess.Popen[str]) -> bool:
    """The source's worker thread has imported bcc: the BPF compile is under way."""
    try:
        return "libbcc" in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


def _finish(proc: subprocess.Popen[str]) -> str:
    _, stderr = proc.communicate(timeout=30)
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    return stderr


@pytest.mark.bpf
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_bpf_compile_is_a_clean_startup_interrupt(signum: int, code: int) -> None:
    proc = spawn("run", "--source", "exec", "--log-level", "warning")
    _wait_for(lambda: _bcc_loaded(proc) or proc.poll() is not None, "the BPF compile")
    proc.send_signal(signum)
    stderr = _finish(proc)
    assert proc.returncode == code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[-1] == "bpfpipe: interrupted during startup", stderr


def _mapped(proc: subprocess.Popen[str], library: str) -> bool:
    try:
        return library in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_importing_numpy_and_trio_is_a_clean_startup_interrupt(
    tmp_path: Path, signum: int, code: int
) -> None:
    # The heavy imports happen after main() has installed its handlers; catch the
    # process in them (numpy's core is mapped: the ~0.2 s import is under way).
    proc = spawn("run", "--source", "synthetic", "--sink", "null", "--duration", "30")
    deadline = time.monotonic() + 20
    while not _mapped(proc, "_multiarray_umath"):
        assert time.monotonic() < deadline and proc.poll() is None, "numpy was never imported"
        time.sleep(0.001)
    proc.send_signal(signum)
    stderr = _finish(proc)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == "bpfpipe: interrupted during startup", stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_importing_a_plugin_is_a_clean_startup_interrupt(
    tmp_path: Path, signum: int, code: int
) -> None:
    marker = tmp_path / "importing"
    write_module(
        tmp_path,
        "slowimport",
        f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(20)\n",
    )
    config = tmp_path / "c.toml"
    config.write_text('[source]\nuse = "synthetic"\n[[stages]]\nuse = "slowimport:Stage"\n')
    proc = spawn("run", "--config", str(config), env={"PYTHONPATH": str(tmp_path)})
    _wait_for(marker.exists, "the plug-in import")
    proc.send_signal(signum)
    stderr = _finish(proc)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines() == ["bpfpipe: interrupted during startup"]


def _running(tmp_path: Path, *, sink: str = "null", drain_timeout_s: float = 30.0) -> subprocess.Popen[str]:
    write_module(tmp_path, "slowsink", SLOW_SINK)
    config = tmp_path / "c.toml"
    config.write_text(
        '[source]\nuse = "synthetic"\nconfig = { rate_per_s = 20000, batch_size = 100 }\n'
        f'[sink]\nuse = "{sink}"\n[shutdown]\ndrain_timeout_s = {drain_timeout_s}\n'
    )
    proc = spawn("run", "--config", str(config), env={"PYTHONPATH": str(tmp_path)})
    _read_until_started(proc)
    time.sleep(0.5)
    return proc


def _read_until_started(proc: subprocess.Popen[str]) -> None:
    """Consume stderr up to the ``pipeline started`` line (startup step lines come first)."""
    assert proc.stderr is not None
    read = []
    while not read or 'msg="pipeline started"' not in read[-1]:
        line = proc.stderr.readline()
        if not line:  # it exited before starting: reap it, say why
            proc.kill()
            proc.wait(timeout=30)
            raise AssertionError("".join(read))
        read.append(line)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_running_stops_gracefully_exit_0(tmp_path: Path, signum: int) -> None:
    proc = _running(tmp_path)
    proc.send_signal(signum)
    stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    fields = assert_accounts_balance(stderr)
    assert "outcome_stage_dropped" not in fields or "shutdown" not in stderr


def test_sighup_reloads_and_carries_on(tmp_path: Path) -> None:
    proc = _running(tmp_path)
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    assert proc.poll() is None, "SIGHUP killed the agent"
    proc.send_signal(signal.SIGTERM)
    stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    assert stderr.count('msg="config reloaded: no change" trigger=SIGHUP') == 1, stderr  # the same file
    assert_accounts_balance(stderr)


def test_second_signal_aborts_exit_130(tmp_path: Path) -> None:
    proc = _running(tmp_path, sink="slowsink:Sink")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stderr = _finish(proc)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "bpfpipe: aborted by a second signal"
    assert "outcome_stage_dropped" in stderr
    assert_accounts_balance(stderr)


def test_drain_past_its_deadline_aborts_exit_1(tmp_path: Path) -> None:
    proc = _running(tmp_path, sink="slowsink:Sink", drain_timeout_s=0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stderr = _finish(proc)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1] == (
        "bpfpipe: error: draining did not finish within shutdown.drain_timeout_s = 0.5 s;"
        " aborted (what was in flight is recorded as dropped, reason 'shutdown')"
    )
    assert "drain deadline passed: aborting" in stderr
    assert_accounts_balance(stderr)


# -- `check` checks what `run` checks -------------------------------------------------

SAME_ERRORS = [
    (
        '[source]\nuse = "xdp_firewall"\nconfig = { options = { interface = "lo", mode = "turbo" } }\n',
        "stage 'xdp_firewall': source.config.options.mode: must be one of skb, driver, got 'turbo'",
    ),
    (
        '[source]\nuse = "ringbuf"\nconfig = { program = "nosuch" }\n',
        "stage 'ringbuf': source.config.program: no BPF program 'nosuch' in ",
    ),
    (
        '[source]\nuse = "synthetic"\n[[stages]]\nuse = "breaker"\n'
        'config = { primary = "noop", primary_config = { bogus = 1 } }\n',
        "stage 'breaker': config.primary_config.bogus: unknown key",
    ),
    (
        '[source]\nuse = "synthetic"\nconfig = { seed = -1 }\n',
        "stage 'synthetic': source.config.seed: expected int >= 0, got -1",
    ),
    (
        '[source]\nuse = "synthetic"\n[[stages]]\nuse = "multiline:Stage"\n',
        "stage 'multiline:Stage': constructing it raised ValueError: first line second line third",
    ),
]


@pytest.mark.parametrize(
    ("text", "message"), SAME_ERRORS, ids=["xdp-mode", "ringbuf", "breaker", "seed", "ctor"]
)
def test_check_and_run_fail_alike_and_run_fails_fast(tmp_path: Path, text: str, message: str) -> None:
    write_module(tmp_path, "multiline", PLUGINS["multiline"])
    config = tmp_path / "c.toml"
    config.write_text(text)
    env = {"PYTHONPATH": str(tmp_path)}
    check = bpfpipe("check", str(config), env=env)
    started = time.monotonic()
    run = bpfpipe("run", "--config", str(config), env=env, timeout=30)
    assert time.monotonic() - started < 5, "run did not fail before loading BPF"
    for proc in (check, run):
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"bpfpipe: error: {message}"), proc.stderr
        assert "Traceback" not in proc.stderr
    assert check.stderr == run.stderr
    assert "attached BPF program" not in run.stderr


# -- a log flood ----------------------------------------------------------------------

FAILING_STAGE = """
    from pipeline import BatchStage

    class Stage(BatchStage):
        def process(self, batch):
            raise RuntimeError("enrichment backend unreachable")
"""


def test_a_stage_failing_every_batch_logs_a_handful_of_lines(tmp_path: Path) -> None:
    write_module(tmp_path, "failing", FAILING_STAGE)
    config = tmp_path / "c.toml"
    config.write_text(
        '[source]\nuse = "synthetic"\nconfig = { rate_per_s = 200000, batch_size = 64 }\n'
        '[[stages]]\nuse = "failing:Stage"\n[sink]\nuse = "null"\n'
    )
    proc = bpfpipe("run", "--config", str(config), "--duration", "1", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert own_lines(proc.stderr) == []
    # Not one per batch (thousands): the lifecycle's step lines aside, a handful.
    lines = [line for line in proc.stderr.splitlines() if "logger=bpfpipe.steps" not in line]
    assert len(lines) <= 8, proc.stderr
    failed = [line for line in lines if "process() failed in stage 'failing:Stage'" in line]
    assert len(failed) == 2, proc.stderr  # the first, then the summary
    match = re.search(r" repeated=(\d+)$", failed[1])
    assert match is not None, failed[1]
    repeated = int(match[1])
    assert f"(repeated {repeated:,} times in the last " in failed[1]
    errors = [line for line in lines if 'msg="stage had errors"' in line]
    assert len(errors) == 1 and f" errors={repeated + 1} " in errors[0], proc.stderr  # counters count all
    assert repeated > 100
    fields = assert_accounts_balance(proc.stderr)
    assert fields["outcome_stage_dropped"] == fields["produced"] > 0


# -- hostile outputs ------------------------------------------------------------------

FAST_SOURCE = '[source]\nuse = "synthetic"\nconfig = { rate_per_s = 100000, batch_size = 256 }\n'


@contextlib.contextmanager
def _stalled_fifo(tmp_path: Path, *, full: bool) -> Iterator[int]:
    """The write end of a FIFO whose reader never reads (``full``: its buffer filled already)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(fifo, os.O_WRONLY)
    try:
        if full:
            os.set_blocking(writer, False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(writer, b"x" * 65536)
            os.set_blocking(writer, True)
        yield writer
    finally:
        os.close(writer)
        os.close(reader)


def _spawn_with(stdout: int, stderr: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*BPFPIPE, *args],
        stdout=stdout,
        stderr=stderr,
        text=True,
        env={**CLEAN_ENV, **NO_SERVERS},
        start_new_session=True,
    )


def test_stdout_never_read_stops_at_the_drain_deadline_exit_1(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(FAST_SOURCE + "[shutdown]\ndrain_timeout_s = 2\n")
    with _stalled_fifo(tmp_path, full=False) as stdout:
        proc = _spawn_with(stdout, subprocess.PIPE, "run", "--config", str(config))
        _read_until_started(proc)
        time.sleep(1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stderr = _finish(proc)
        assert time.monotonic() - sent < 2 + 2, "the stuck write held the stop past the drain deadline"
    assert proc.returncode == 1, stderr
    assert own_lines(stderr) == [
        "bpfpipe: error: draining did not finish within shutdown.drain_timeout_s = 2 s;"
        " aborted (what was in flight is recorded as dropped, reason 'shutdown')"
    ]
    fields = assert_accounts_balance(stderr)
    assert fields["outcome_stage_dropped"] > 0


def test_stderr_never_read_still_stops_on_sigint_exit_0(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(FAST_SOURCE + "[shutdown]\ndrain_timeout_s = 2\n")
    events = tmp_path / "events.jsonl"
    with _stalled_fifo(tmp_path, full=True) as stderr, events.open("wb") as stdout:
        proc = _spawn_with(stdout.fileno(), stderr, "run", "--config", str(config))
        _wait_for(lambda: events.stat().st_size > 0 or proc.poll() is not None, "events on stdout")
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        # The drain (fast here) plus one grace period of 2 s for the logs, not one per line.
        assert time.monotonic() - sent < 2 + 2 + 1
    assert proc.returncode == 0


def _jsonl_lines(path: Path) -> int:
    data = path.read_bytes()
    assert data.endswith(b"\n"), data[-200:]
    lines = data.splitlines()
    for line in lines:
        json.loads(line)  # whole lines only
    return len(lines)


def test_disk_full_jsonl_sink_keeps_whole_lines_and_stops_exit_1(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "mnt") as mnt:
        out = mnt / "events.jsonl"
        config = tmp_path / "c.toml"
        config.write_text(FAST_SOURCE + f'[sink]\nuse = "jsonl"\nconfig = {{ path = "{out}" }}\n')
        on_disk = 0
        for _ in range(2):  # the second run appends to the full file
            proc = bpfpipe("run", "--config", str(config), "--duration", "10", timeout=30)
            assert proc.returncode == 1, proc.stderr
            (line,) = own_lines(proc.stderr)
            assert line.startswith("bpfpipe: error: output of stage 'jsonl' closed: "), line
            assert "No space left on device" in line
            fields = assert_accounts_balance(proc.stderr)
            now_on_disk = _jsonl_lines(out)
            assert fields.get("outcome_delivered", 0) == now_on_disk - on_disk
            on_disk = now_on_disk
        assert on_disk > 100


FAILING_SINK = """
    from pipeline import BatchSink

    class Sink(BatchSink):
        async def write(self, batch):
            raise ConnectionError("collector unreachable")
"""


def test_disk_full_spool_keeps_whole_lines_exit_0(tmp_path: Path) -> None:
    write_module(tmp_path, "badsink", FAILING_SINK)
    with mounted_tmpfs(tmp_path / "mnt") as mnt:
        spool = mnt / "spool.jsonl"
        config = tmp_path / "c.toml"
        config.write_text(
            FAST_SOURCE + '[sink]\nuse = "breaker_sink"\n'
            f'config = {{ primary = "badsink:Sink", fallback_config = {{ path = "{spool}" }} }}\n'
        )
        on_disk = 0
        for _ in range(2):
            proc = bpfpipe(
                "run",
                "--config",
                str(config),
                "--duration",
                "1",
                env={"PYTHONPATH": str(tmp_path)},
                timeout=30,
            )
            assert proc.returncode == 0, proc.stderr
            assert own_lines(proc.stderr) == []
            lines = [line for line in proc.stderr.splitlines() if "logger=bpfpipe.steps" not in line]
            assert len(lines) <= 10, proc.stderr  # failures folded (the lifecycle's step lines aside)
            assert "No space left on device" in proc.stderr
            fields = assert_accounts_balance(proc.stderr)
            now_on_disk = _jsonl_lines(spool)
            assert fields.get("outcome_fallback", 0) == now_on_disk - on_disk
            on_disk = now_on_disk
        assert on_disk > 100


def test_closed_stdout_stops_gracefully_exit_1() -> None:
    reader, writer = os.pipe()
    os.close(reader)
    try:
        proc = subprocess.run(
            [*BPFPIPE, "run", "--source", "synthetic"],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            env={**CLEAN_ENV, **NO_SERVERS},
            timeout=30,
        )
    finally:
        os.close(writer)
    assert proc.returncode == 1, proc.stderr
    assert own_lines(proc.stderr) == [
        "bpfpipe: error: output of stage 'jsonl' closed: stdout: Broken pipe;"
        " stopped (the rest is recorded as dropped)"
    ]
    assert proc.stderr.count("output closed (stdout: Broken pipe): stopping") == 1, proc.stderr
    fields = assert_accounts_balance(proc.stderr)
    assert "outcome_delivered" not in fields


@pytest.mark.parametrize("where", ["missing-directory", "directory", "read-only-mount"])
def test_unopenable_output_fails_before_loading_bpf_exit_2(tmp_path: Path, where: str) -> None:
    with contextlib.ExitStack() as stack:
        if where == "missing-directory":
            path, problem = (
                tmp_path / "nosuch" / "events.jsonl",
                f"directory {tmp_path / 'nosuch'} does not exist",
            )
        elif where == "directory":
            path, problem = tmp_path, f"{tmp_path} is a directory"
        else:
            mnt = stack.enter_context(mounted_tmpfs(tmp_path / "mnt", "ro,size=64k"))
            path, problem = mnt / "events.jsonl", f"directory {mnt} is not writable"
        config = tmp_path / "c.toml"
        config.write_text(f'[sink]\nuse = "jsonl"\nconfig = {{ path = "{path}" }}\n')  # the exec source (BPF)
        started = time.monotonic()
        proc = bpfpipe("run", "--config", str(config), timeout=30)
        assert time.monotonic() - started < 2, "it did not fail before compiling BPF"
    assert_one_line_error(proc, 2, f"stage 'jsonl': sink.config.path: cannot write: {problem}")
    assert "attached BPF program" not in proc.stderr
