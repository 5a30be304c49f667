"""The shipped programs' declarations, config checks, headers and C text: no root, no bcc.

Each shipped program is declared once (its class in ``bpf.programs``); these
tests pin that the declarations, the C sources and the presets agree, and that
a source's ``program``/``options`` are checked without loading anything.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from bpf.loader import validate_options, validate_program_name
from bpf.programs import (
    SHIPPED_PROGRAMS,
    STAT_NAMES,
    ExecProgram,
    LoadgenProgram,
    XdpFirewallProgram,
)
from bpf.sizing import DEFAULT_MAP_SIZE, DEFAULT_RING_BUFFER_PAGES, Sizes, choose_sizes
from bpf.source import (
    PROGRAM_DIR,
    SHARED_HEADER,
    available_programs,
    header_define,
    header_enum,
    program_text,
)
from pipeline.errors import ConfigError

# -- one declaration per shipped program ----------------------------------------------


def test_every_shipped_source_is_declared_once() -> None:
    assert sorted(SHIPPED_PROGRAMS) == available_programs() == ["exec", "loadgen", "xdp_firewall"]
    assert dict(SHIPPED_PROGRAMS) == {
        "exec": ExecProgram,
        "loadgen": LoadgenProgram,
        "xdp_firewall": XdpFirewallProgram,
    }


@pytest.mark.parametrize("name", sorted(SHIPPED_PROGRAMS))
def test_declarations_agree_with_the_c_sources(name: str) -> None:
    cls = SHIPPED_PROGRAMS[name]
    source = (PROGRAM_DIR / f"{name}.bpf.c").read_text()
    header = (PROGRAM_DIR / f"{name}.h").read_text()
    assert bool(re.search(rf"^int {name}\(struct xdp_md \*", source, re.MULTILINE)) == cls.xdp
    for map_name, field in cls.growing_map_timestamps.items():
        assert re.search(rf"\b{map_name}\b", source), map_name
        if field is not None:  # the value struct is shared with user space: it is in the header
            assert re.search(rf"\bu64 {field};", header), field


def test_constants_are_read_from_the_headers() -> None:
    assert STAT_NAMES == (
        "events",
        "sampled_out",
        "lost_reserve",
        "emitted",
        "processed",
        "dropped",
        "errors",
    )
    assert (DEFAULT_RING_BUFFER_PAGES, DEFAULT_MAP_SIZE) == (64, 65536)
    assert XdpFirewallProgram.latency_buckets == {
        0: "lt_100ns",
        1: "lt_500ns",
        2: "lt_1us",
        3: "lt_5us",
        4: "lt_10us",
        5: "ge_10us",
    }
    assert LoadgenProgram.max_events_per_call == 64


def test_presets_default_to_the_declared_names() -> None:
    from stages.programs import ExecConfig, LoadgenConfig, XdpFirewallConfig

    assert ExecConfig().program == "exec"
    assert LoadgenConfig().program == "loadgen"
    assert XdpFirewallConfig().program == "xdp_firewall"


# -- checking a source's config without loading -----------------------------------------


def test_program_names_are_checked_without_loading(tmp_path: Path) -> None:
    for name in SHIPPED_PROGRAMS:
        validate_program_name(name)
    with pytest.raises(ConfigError) as info:
        validate_program_name("nope")
    assert info.value.path == "program"
    assert info.value.problem == (
        f"no BPF program 'nope' in {PROGRAM_DIR} (available: exec, loadgen, xdp_firewall)"
    )

    (tmp_path / "mine.bpf.c").write_text("")
    validate_program_name("mine", tmp_path)
    with pytest.raises(ConfigError, match=r"^program: no BPF program 'exec' in .* \(available: mine\)$"):
        validate_program_name("exec", tmp_path)
    with pytest.raises(ConfigError, match=r"\(available: none\)$"):
        validate_program_name("mine", tmp_path / "empty")


@pytest.mark.parametrize(
    ("program", "options"),
    [
        ("exec", {}),
        ("loadgen", {}),
        ("xdp_firewall", {"interface": "eth0"}),
        ("xdp_firewall", {"interface": "eth0", "mode": "skb"}),
        ("xdp_firewall", {"interface": "eth0", "mode": "driver"}),
    ],
)
def test_valid_options(program: str, options: dict[str, object]) -> None:
    validate_options(program, options)


@pytest.mark.parametrize(
    ("program", "options", "path", "problem"),
    [
        ("exec", {"interface": "lo"}, "options.interface", "program 'exec' has no such option"),
        ("loadgen", {"mode": "skb", "filter": 1}, "options.filter", "program 'loadgen' has no such option"),
        (
            "xdp_firewall",
            {},
            "options.interface",
            "program 'xdp_firewall' is XDP: name the interface to attach to",
        ),
        ("xdp_firewall", {"interface": ""}, "options.interface", "program 'xdp_firewall' is XDP: name the"),
        ("xdp_firewall", {"interface": 2}, "options.interface", "program 'xdp_firewall' is XDP: name the"),
        (
            "xdp_firewall",
            {"interface": "lo", "mode": "hw"},
            "options.mode",
            "must be one of skb, driver, got 'hw'",
        ),
        (
            "xdp_firewall",
            {"interface": "lo", "burst": 3},
            "options.burst",
            "program 'xdp_firewall' has no such",
        ),
        ("nope", {}, "program", "no BPF program 'nope' in "),
    ],
)
def test_bad_options_name_the_path_within_the_source_table(
    program: str, options: dict[str, object], path: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        validate_options(program, options)
    assert info.value.path == path
    assert info.value.problem.startswith(problem)
    assert str(info.value).startswith(f"{path}: ")


def test_programs_from_elsewhere_say_whether_they_are_xdp() -> None:
    validate_options("custom", {}, xdp=False)
    validate_options("custom", {"interface": "lo"}, xdp=True)
    with pytest.raises(ConfigError, match=r"^options\.interface: program 'custom' is XDP"):
        validate_options("custom", {}, xdp=True)


# -- headers and the C text --------------------------------------------------------------


def test_shared_headers_hold_no_kernel_only_code() -> None:
    """Like libbpf-tools: what user space reads (bpfpipe_types.h, <program>.h) has no maps
    or helpers; those are in bpfpipe.h, which every program's .bpf.c includes."""
    kernel_only = re.compile(r"\bBPF_\w+\(|\bstatic\b")
    for header in [SHARED_HEADER, *(PROGRAM_DIR / f"{name}.h" for name in SHIPPED_PROGRAMS)]:
        text = header.read_text()
        assert not kernel_only.search(text), header.name
        assert '#include "bpfpipe.h"' not in text, header.name
    assert '#include "bpfpipe_types.h"' in (PROGRAM_DIR / "bpfpipe.h").read_text()
    for name in SHIPPED_PROGRAMS:
        includes = re.findall(
            r'^#include "([^"]+)"', (PROGRAM_DIR / f"{name}.bpf.c").read_text(), re.MULTILINE
        )
        assert includes == ["bpfpipe.h", f"{name}.h"], name


def test_includes_are_spliced_with_line_markers(tmp_path: Path) -> None:
    (tmp_path / "inner.h").write_text("int inner;\n")
    (tmp_path / "outer.h").write_text('#include "inner.h"\nint outer;\n')
    (tmp_path / "p.bpf.c").write_text(
        '#include <linux/ptrace.h>\n#include "outer.h"\nTRACEPOINT_PROBE(a, b)\n{\n    return 0;\n}\n'
    )
    text = program_text(tmp_path / "p.bpf.c", [tmp_path])
    main, inner, outer = tmp_path / "p.bpf.c", tmp_path / "inner.h", tmp_path / "outer.h"
    assert text.split("\n/* --- appended")[0].splitlines() == [
        f'#line 1 "{main}"',
        "#include <linux/ptrace.h>",  # not ours: clang includes it
        f'#line 1 "{outer}"',
        f'#line 1 "{inner}"',
        "int inner;",
        f'#line 2 "{outer}"',
        "int outer;",
        f'#line 3 "{main}"',
        "TRACEPOINT_PROBE(a, b)",
        f'#line 4 "{main}"',  # bcc inserts the argument struct before the probe: re-sync
        "{",
        "    return 0;",
        "}",
    ]
    assert "BPFPIPE_EVENTS(__BPFPIPE_SCHEMA)" in text


def test_shipped_programs_compile_as_one_text() -> None:
    for name in SHIPPED_PROGRAMS:
        text = program_text(PROGRAM_DIR / f"{name}.bpf.c", [PROGRAM_DIR])
        assert not re.search(r'^\s*#\s*include\s+"', text, re.MULTILINE), name  # every quoted include spliced
        assert (
            text.count(f'#line 1 "{SHARED_HEADER}"') == 2
        )  # via bpfpipe.h and <name>.h; its guard keeps one
        assert "bpfpipe_count(STAT_EVENTS)" in text


def test_header_constants(tmp_path: Path) -> None:
    header = tmp_path / "x.h"
    header.write_text(
        "enum e {\n    E_ONE = 1,\n    E_TWO_WORDS = 2,\n    E__MAX = 3,\n};\n#define X_SIZE 42\n"
    )
    assert header_enum(header, "E") == {1: "one", 2: "two_words"}
    assert header_define(header, "X_SIZE") == 42
    with pytest.raises(RuntimeError, match="lacks '#define Y <number>'"):
        header_define(header, "Y")


def test_sizes_default_round_and_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bpfpipe.bpf"):
        assert choose_sizes(None, None, 4096) == Sizes(64, 64 * 4096, 65536)
        assert caplog.records == []
        assert choose_sizes(5 * 4096, 1, 4096) == Sizes(8, 8 * 4096, 128)
    assert [r.getMessage() for r in caplog.records] == [
        "ring buffer size 20480 bytes is not a power-of-two number of pages; using 32768 bytes (8 pages)",
        "map size 1 is outside 128..4194304; using 128",
    ]
