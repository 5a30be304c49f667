"""bpfpipe's kernel side: the BPF programs (``*.bpf.c`` and their headers) and their loader.

Modules by job: ``loader`` (load_program: the orchestration), ``programs`` (one
declaration per shipped program, the API over a loaded one, config checks),
``source`` (the C text bcc compiles), ``diagnostics`` (bcc's output as one-line
errors), ``layout`` (numpy dtypes from clang's layout; pure), ``attach``
(attach by convention, detach), ``sizing`` (ring and map sizes), ``environment``
(can this machine load BPF), ``ringbuf`` (reading a ring buffer).

Importing this package does not import bcc; :func:`load_program` does.
"""

from .environment import check_bpf_environment as check_bpf_environment
from .loader import Attachment as Attachment
from .loader import BpfLoadError as BpfLoadError
from .loader import ExecProgram as ExecProgram
from .loader import LoadedProgram as LoadedProgram
from .loader import LoadgenProgram as LoadgenProgram
from .loader import XdpFirewallProgram as XdpFirewallProgram
from .loader import available_programs as available_programs
from .loader import load_program as load_program
from .loader import validate_options as validate_options
from .loader import validate_program_name as validate_program_name

__all__ = [
    "Attachment",
    "BpfLoadError",
    "ExecProgram",
    "LoadedProgram",
    "LoadgenProgram",
    "XdpFirewallProgram",
    "available_programs",
    "check_bpf_environment",
    "load_program",
    "validate_options",
    "validate_program_name",
]
