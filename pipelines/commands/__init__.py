"""One module per `kedit` subcommand, each a thin call into the library."""


def add_model_args(p, *, default: str | None = None) -> None:
    """--model, --dtype and --device, shared by every command that loads a model."""
    from kedit_core.models import DEFAULT_MODEL

    p.add_argument("--model", default=default or DEFAULT_MODEL,
                   help="built-in alias, hub id, local directory or .gguf file (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
