"""bpfpipe's kernel side: the BPF programs (``*.bpf.c`` and their headers) and their loader.

Importing this package does not import bcc; :func:`load_program` does.
"""

from .environment import check_bpf_environment as check_bpf_environment
from .loader import Attachment as Attachment
from .loader import BpfLoadError as BpfLoadError
from .loader import LoadedProgram as LoadedProgram
from .loader import LoadgenProgram as LoadgenProgram
from .loader import XdpFirewallProgram as XdpFirewallProgram
from .loader import available_programs as available_programs
from .loader import load_program as load_program

__all__ = [
    "Attachment",
    "BpfLoadError",
    "LoadedProgram",
    "LoadgenProgram",
    "XdpFirewallProgram",
    "available_programs",
    "check_bpf_environment",
    "load_program",
]
