"""One module per `kedit` subcommand, each a thin call into the library."""


def add_model_args(p, *, default: str | None = None) -> None:
    """--model, --dtype and --device, shared by every command that loads a model."""
    from kedit_core.models import DEFAULT_MODEL

    p.add_argument("--model", default=default or DEFAULT_MODEL,
                   help="built-in alias, hub id, local directory or .gguf file (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")


def check_output_dir(path, *, field: str = "out") -> None:
    """Refuse, before any work, an output directory that cannot be created or written: a
    path component that is a file, or a directory (or its nearest existing parent) that the
    operating system says is not writable (EACCES, EROFS). Later write failures (a full disk)
    still reach the CLI as OSError naming the path."""
    import errno
    import os
    from pathlib import Path

    from kedit_core.errors import BadInputError

    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "the path" if probe == p else f"its parent {probe}"
        raise BadInputError(f"cannot be used as an output directory: {what} is not a directory",
                            file=str(p), field=field)
    if not os.access(probe, os.W_OK | os.X_OK):
        try:  # access() does not say why; statvfs does for a read-only file system
            ro = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            ro = False
        why = os.strerror(errno.EROFS if ro else errno.EACCES)
        where = "" if probe == p else f" (its parent {probe})"
        raise BadInputError(f"output directory is not writable{where}: {why}", file=str(p), field=field)
