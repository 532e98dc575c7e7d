"""The ``refimpl`` command (placeholder until the conformance harness lands)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refimpl")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and a self-check of the LoRA invariants")
    args = parser.parse_args(argv)
    if args.command == "info":
        from refimpl import selfcheck

        return selfcheck.main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
