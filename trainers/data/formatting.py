"""Chat-template formatting with response-only labels, and dynamic padding.

For a conversation ``[user, assistant]`` rendered by the tokenizer's chat template::

    ids    = prompt_ids (system + user + assistant header) ++ response_ids ++ [end_of_turn]
    labels = [-100] * len(prompt_ids)                     ++ response_ids ++ [end_of_turn]

so the loss covers only the assistant's words and the end-of-turn token that teaches it to stop.
Whatever the template appends after the end-of-turn token (ChatML's trailing newline) is cut.
Batches are padded to their own longest example (never to a global maximum), with labels -100
and attention 0 on padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


class FormattingError(ValueError):
    pass


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def prompt_length(self) -> int:
        return next(i for i, label in enumerate(self.labels) if label != IGNORE_INDEX)


def chat_messages(prompt: str, response: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(rendered["input_ids"])


def end_of_turn_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(tokenizer.eos_token)


def tokenize_chat(tokenizer, prompt: str, response: str) -> TokenizedExample:
    """Token ids and response-only labels of one conversation (see module docstring)."""
    prompt_ids = _ids(tokenizer, chat_messages(prompt), add_generation_prompt=True)
    full_ids = _ids(tokenizer, chat_messages(prompt, response), add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise FormattingError("the chat template does not render the prompt as a prefix of the conversation")
    eot = end_of_turn_id(tokenizer)
    response_ids = full_ids[len(prompt_ids):]
    if eot not in response_ids:
        raise FormattingError(f"the chat template does not close the assistant turn with {tokenizer.eos_token!r}")
    response_ids = response_ids[: response_ids.index(eot) + 1]
    return TokenizedExample(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
    )


def fit_to_length(
    tokenizer, prompt: str, response: str, max_length: int, overlong: str,
) -> tuple[TokenizedExample, str] | None:
    """The tokenized example and the prompt actually used, if it fits ``max_length``.

    ``drop``: None when too long. ``truncate_prompt``: the *start* of the user message is cut
    (the question usually sits at its end) until it fits; None when even an empty prompt would
    not fit. The chat template's own tokens are never cut.
    """
    example = tokenize_chat(tokenizer, prompt, response)
    if len(example.input_ids) <= max_length:
        return example, prompt
    if overlong == "drop":
        return None
    prompt_tokens = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for _ in range(4):  # re-tokenising a cut text can merge differently: converge in a few steps
        overflow = len(example.input_ids) - max_length
        if overflow <= 0:
            return example, prompt
        if overflow >= len(prompt_tokens):
            return None
        prompt_tokens = prompt_tokens[overflow:]
        prompt = tokenizer.decode(prompt_tokens)
        example = tokenize_chat(tokenizer, prompt, response)
    return (example, prompt) if len(example.input_ids) <= max_length else None


def pad_batch(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of this batch: input pad_id, label -100, attention 0."""
    if not examples:
        raise FormattingError("cannot pad an empty batch")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def right_padded(encoded: Sequence[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token rows right-padded to the longest. Under a causal mask the
    real tokens never attend to the pads after them, so every real position computes what it
    computes alone (positions start at 0 as unbatched)."""
    width = max(len(ids) for ids in encoded)
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in encoded], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in encoded], device=device)
    return ids, mask


def batches_by_length(texts: Sequence[str], tokenizer, add_special_tokens: bool, device, batch_size: int):
    """Each text tokenized once, then right-padded batches of similar length (longest first:
    little padding, memory peaks early), as (original indices, ids, mask); the callers put
    results back in input order."""
    encoded = [tokenizer(t, add_special_tokens=add_special_tokens).input_ids for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        yield (chunk, *right_padded([encoded[i] for i in chunk], pad, device))


def last_position_forward(model, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
    """One forward pass over a right-padded batch that projects only each row's last real
    position onto the vocabulary (the projection of every position would be a fifth of SmolLM2's
    compute): (model output, [batch, vocab] logits of those positions)."""
    last = mask.sum(dim=1) - 1
    keep = torch.unique(last)                     # sorted, so each row finds its column by search
    output = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, **kwargs)
    return output, output.logits[torch.arange(len(ids), device=ids.device), torch.searchsorted(keep, last)]
