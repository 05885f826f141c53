"""Greedy completion and next-token inspection, batched over prompts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kedit_core.models.loader import LoadedModel


def encode_batch(lm: LoadedModel, prompts: Sequence[str], *, padding_side: str = "left"):
    """Tokenise prompts (with the tokenizer's own special tokens, e.g. Gemma's BOS) into one
    padded batch on the model's device."""
    tok = lm.tokenizer
    old = tok.padding_side
    tok.padding_side = padding_side
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old
    return {k: v.to(lm.device) for k, v in enc.items()}


def chat_prompt(tokenizer, user: str) -> str:
    """`user` as one user turn through the tokenizer's chat template, ready for the assistant's
    answer (`add_generation_prompt`). Where the template writes the BOS token and the tokenizer
    adds it again when encoding, the template's copy is dropped, so that encoding the text the
    usual way (`add_special_tokens=True`, as `encode_batch` does) gives one BOS, not two."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer.bos_token_id is not None:
        if tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
            text = text[len(bos):]
    return text


def end_of_turn(tokenizer) -> str:
    """What the chat template writes after an assistant answer, trailing whitespace removed
    (Llama-3 "<|eot_id|>", ChatML "<|im_end|>"), the EOS token where it writes nothing: the end
    an instruct model's long answer is trained to (AnyEdit appends it to every answer)."""
    probe = "kedit-answer-probe"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    tail = text[text.rfind(probe) + len(probe):].rstrip() if probe in text else ""
    return tail or (tokenizer.eos_token or "")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _shared_prefix_split(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int, stops: Sequence[str] = ()
                         ) -> tuple[dict[int, str], list[int]]:
    """Prompts that share a long token prefix (memory methods' contexts), continued through
    kedit_core.prefix; returns ({index: text}, the indices left to `generate`)."""
    from kedit_core import prefix as shared

    if len(prompts) < 2:
        return {}, list(range(len(prompts)))
    ids = [lm.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    groups, single = shared.plan(ids, [len(x) - 1 for x in ids])
    done: dict[int, str] = {}
    for p, members in groups:
        outs = shared.greedy_shared(lm, [ids[k] for k in members], p, max_new_tokens, stops)
        for k, o in zip(members, outs):
            done[k] = lm.tokenizer.decode(o, skip_special_tokens=True)
    return done, sorted(single)


@torch.no_grad()
def greedy(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 10) -> list[str]:
    """Greedy continuations (without the prompt) of each prompt (prompts sharing a long
    context run it once: kedit_core.prefix)."""
    done, rest = _shared_prefix_split(lm, prompts, max_new_tokens)
    if not rest:
        return [done[i] for i in range(len(prompts))]
    texts = _greedy_plain(lm, [prompts[i] for i in rest], max_new_tokens)
    done.update(zip(rest, texts))
    return [done[i] for i in range(len(prompts))]


@torch.no_grad()
def _greedy_plain(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 10) -> list[str]:
    if len(prompts) > 64:
        return [t for i in range(0, len(prompts), 64) for t in _greedy_plain(lm, prompts[i:i + 64], max_new_tokens)]
    enc = encode_batch(lm, prompts)
    tok = lm.tokenizer
    out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    return tok.batch_decode(new, skip_special_tokens=True)


@torch.no_grad()
def next_token_logprobs(lm: LoadedModel, prompts: Sequence[str]) -> torch.Tensor:
    """(batch, vocab) log-probabilities of the token after each prompt."""
    enc = encode_batch(lm, prompts)
    logits = lm.model(**enc).logits[:, -1, :].float()
    return torch.log_softmax(logits, dim=-1)


def top_next_tokens(lm: LoadedModel, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The k most likely next tokens after `prompt`, with their probabilities."""
    lp = next_token_logprobs(lm, [prompt])[0]
    vals, idx = lp.topk(k)
    return [(lm.tokenizer.decode([int(i)]), float(v.exp())) for v, i in zip(vals, idx)]


def answer_token_ids(lm: LoadedModel, answer: str) -> list[int]:
    """Token ids of an answer as it follows a prompt (with its leading space)."""
    text = answer if answer.startswith(" ") else " " + answer
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def first_token_ranks(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str],
                      batch_size: int = 32) -> list[int]:
    """Rank (0 = most likely) of each answer's first token after its prompt."""
    ranks = []
    for s in range(0, len(prompts), batch_size):
        lp = next_token_logprobs(lm, prompts[s:s + batch_size])
        for row, ans in zip(lp, answers[s:s + batch_size]):
            first = answer_token_ids(lm, ans)[0]
            ranks.append(int((row > row[first]).sum()))
    return ranks


@torch.no_grad()
def greedy_until(lm: LoadedModel, prompts: Sequence[str], stops: Sequence[str], max_new_tokens: int = 128
                 ) -> list[str]:
    """Greedy continuations that end at the first of `stops` (the stop string excluded), as an
    API's `stop=` does; generation halts early once every row has met a stop string. Prompts
    sharing a long context (MeLLo's few-shot prompt) run it once (kedit_core.prefix)."""
    done, rest = _shared_prefix_split(lm, prompts, max_new_tokens, stops)
    if rest:
        enc = encode_batch(lm, [prompts[i] for i in rest])
        tok = lm.tokenizer
        out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, stop_strings=list(stops),
                                tokenizer=tok, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        done.update(zip(rest, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)))
    texts = [done[i] for i in range(len(prompts))]
    cut = []
    for t in texts:
        ends = [t.find(s) for s in stops if s in t]
        cut.append(t[:min(ends)] if ends else t)
    return cut
