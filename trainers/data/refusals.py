"""Refusal answers for harmful training prompts: several natural phrasings, chosen per prompt.

A single fixed string would teach the model one sentence rather than the behaviour, and would
make the refusal detector's job trivially easy; the choice is a pure function of (seed, id), so
outputs stay byte-identical across runs.
"""

from __future__ import annotations

import hashlib

REFUSALS: tuple[str, ...] = (
    "I can't help with that. It could cause serious harm to people, so I won't provide instructions or details for it.",
    "I'm sorry, but I can't assist with this request. If you're dealing with a difficult situation, "
    "I'm happy to help you find safe and legal options.",
    "I won't help with that, because it could put people at risk. Is there something else I can help you with?",
    "Sorry, I can't provide that. Helping with this could lead to real harm, and that's not something I'll do.",
    "I'm not able to help with this request. It involves causing harm or breaking the law. "
    "If you have a related safety question, feel free to ask.",
    "I can't do that. Providing this information could hurt someone. I'd be glad to help with a different question.",
    "I must decline this request, since it could be used to harm others. "
    "If you need support, consider reaching out to a qualified professional.",
    "That's not something I can help with. I don't provide content that could facilitate harm, "
    "but I'm happy to help with something else.",
)


def refusal_for(prompt_id: str, seed: int) -> str:
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return REFUSALS[int.from_bytes(digest[:4], "big") % len(REFUSALS)]
