"""``samedge pipeline | export | calibrate | build | validate | predict | segment | info``.

Errors from samedge's hierarchy are printed with their hint and exit non-zero without a traceback.
"""

from __future__ import annotations

import re
import sys

from rich.console import Console
from rich.markup import escape

from samedge.cli.parser import build_parser, family_options_for
from samedge.errors import SamedgeError


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--box -10,5,60,70`` → ``--box=-10,5,60,70``: argparse takes a value that starts with
    "-" and is not a plain number for an option, and would stop with "expected one argument"."""
    out: list[str] = []
    for token in argv:
        if out and out[-1] in ("--box", "--point", "--box3d") and re.match(r"^-[\d.]", token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    from samedge.progress import Steps
    from samedge.runtime.backends import check_threads

    argv = _attach_negative_values(sys.argv[1:] if argv is None else list(argv))
    args = build_parser(family_options_for(argv)).parse_args(argv)
    steps = Steps(quiet=args.quiet)
    try:
        check_threads(args.threads)
        return args.func(args, steps)
    except SamedgeError as exc:
        # soft_wrap: a long path must not be broken across lines (logs, grep, tests)
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(exc))}")
        return exc.exit_code
    except Exception as exc:  # calibrate/build/validate: exit 1 means "a gate failed", only that
        if not getattr(args, "strict_exit", False):
            raise
        import traceback

        traceback.print_exc()
        Console(stderr=True).print(f"[red]error:[/] {type(exc).__name__}: {escape(str(exc))}")
        return 2
