"""`kedit generate --model SPEC "PROMPT"`: greedy completion and the top-5 next tokens."""

from __future__ import annotations

from pipelines.commands import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="greedy completion of a prompt, with the top next tokens")
    add_model_args(p)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--top", type=int, default=5, help="next tokens to show (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from kedit_core.generation import greedy, top_next_tokens
    from kedit_core.models import load

    lm = load(args.model, dtype=args.dtype, device=args.device)
    print(f"{args.prompt}\033[1m{greedy(lm, [args.prompt], args.max_new_tokens)[0]}\033[0m")
    print(f"top {args.top} next tokens:")
    for text, prob in top_next_tokens(lm, args.prompt, args.top):
        print(f"  {text!r:>16}  {prob:.3f}")
    return 0
