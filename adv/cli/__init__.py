"""The ``adv`` command line.

Each subcommand is one module in this package exposing ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Errors a user can fix
(``AdvError``, ``ValueError``, ``FileNotFoundError``) become one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from adv.errors import AdvError
from adv.logs import stderr_logging

#: Subcommand modules, in the order ``adv --help`` lists them.
COMMANDS = ["info", "train", "eval", "defend", "data", "bundle"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: same one-line format, exit 2
        self.exit(2, f"adv: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="adv", description="Adversarial-robustness evaluation for image classifiers.")
    parser.add_argument("--version", action="version", version=f"adv {__import__('adv').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module_name in COMMANDS:
        module = importlib.import_module(f"adv.cli.{module_name}")
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # a terminal user needs the message, not the library line that raised it (Python prints both)
    print(f"adv: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    # both restore the caller's warning display and logging when main() returns
    with warnings.catch_warnings(), stderr_logging():
        warnings.showwarning = _one_line_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args._run(args) or 0)
    except (AdvError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"adv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
