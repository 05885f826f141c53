"""The `kedit` command line. Each subcommand is one module in `pipelines.commands` with
`add_parser(subparsers)` and `run(args) -> int`; this file only dispatches and turns errors
into exit codes: 0 ok, 2 bad input (one line naming file, record and field), 1 internal.
An OSError that the user can fix (USER_OS_ERRORS: a read-only or full disk, no permission, a
file where a directory belongs) and that names its path is bad input too: one line naming
the path."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

# errno values of an OSError that the user can fix (the path they gave, their disk).
USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                  errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG}

COMMANDS = ["models", "methods", "data", "generate", "edit_local", "stats", "edit", "evaluate", "train", "audit", "bench", "tune", "export",
            "ui",
            "quickstart"]


def build_parser() -> argparse.ArgumentParser:
    from kedit_core import __version__

    p = argparse.ArgumentParser(prog="kedit", description="Knowledge editing for language models.")
    p.add_argument("--version", action="version", version=f"kedit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages and tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pipelines.commands.{name}").add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from kedit_core.errors import BadInputError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except BadInputError as e:
        if args.verbose:
            logging.exception("bad input")
        print(f"kedit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A write or read the operating system refused on a path the user chose (read-only
        # or full disk, no permission, a file where a directory belongs): bad input, naming
        # the path. Other OSErrors (without a path, or a missing file) stay internal errors.
        if e.errno not in USER_OS_ERRORS or not (e.filename or e.errno in (errno.ENOSPC, errno.EDQUOT)):
            return _internal(e)
        if args.verbose:
            logging.exception("bad input")
        where = f"{e.filename}: " if e.filename else ""
        print(f"kedit: error: {where}{e.strerror or os.strerror(e.errno)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kedit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        from pipelines.workers import WorkerFailure

        if isinstance(e, WorkerFailure):
            # a worker that cannot go on: not the user's input (exit 1), not an internal error;
            # the message says what happened and that the run directory resumes
            if args.verbose:
                logging.exception("worker failure")
            print(f"kedit: worker failure: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
        disk = _disk_error(e)
        if disk is None:
            return _internal(e)
        if args.verbose:
            logging.exception("bad input")
        print(f"kedit: error: {disk}", file=sys.stderr)
        return 2


def _disk_error(e: BaseException) -> str | None:
    """'PATH: reason' for a write that the operating system refused inside a library that
    reports it as its own error type (safetensors: 'I/O error: ... (os error 30) at path
    "..."'), when the errno is one the user can fix; else None. A temporary file's path is
    reported as its directory."""
    import re

    if type(e).__name__ != "SafetensorError":
        return None
    text = str(e)
    m = re.search(r"\(os error (\d+)\)", text)
    if not m or int(m.group(1)) not in USER_OS_ERRORS:
        return None
    path = re.search(r'at path "([^"]+)"', text)
    where = ""
    if path:
        p = path.group(1)
        name = os.path.basename(p)
        where = (os.path.dirname(p) if name.startswith(".") or ".tmp" in name else p) + ": "
    return f"{where}{os.strerror(int(m.group(1)))}"


def _internal(e: BaseException) -> int:
    logging.getLogger("kedit").debug("internal error", exc_info=e)
    msg = " ".join(str(e).split())[:300]
    print(f"kedit: internal error: {type(e).__name__}: {msg} (run with -v for the traceback)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
