"""``samedge pipeline | export | calibrate | build | validate | predict | segment | info``.

Errors from samedge's hierarchy are printed with their hint and exit non-zero without a traceback.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

from samedge.cli.parser import build_parser, family_options_for
from samedge.errors import SamedgeError


def main(argv: list[str] | None = None) -> int:
    from samedge.progress import Steps

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(family_options_for(argv)).parse_args(argv)
    steps = Steps(quiet=args.quiet)
    try:
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
