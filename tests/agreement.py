"""Teacher-forced top-1 agreement: how often two engines pick the same next token over one fixed text."""

import numpy as np

from minifd.model.llama import KVCache

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden press into a system that could produce books quickly. "
        "Within a few decades printing shops had spread across Europe, and the price of books fell sharply. "
        "Scholars could compare identical copies of a text, which changed how knowledge was checked and shared.")


def teacher_forced_argmax(engine, tokens):
    """Feed `tokens` one at a time through prefill + decode -> the argmax after each position."""
    xp = engine.xp
    cache = KVCache.allocate(engine.config, 1, len(tokens), xp, engine.model.dtype)
    choices = [int(engine.model.prefill(cache, 0, tokens[:1]).argmax())]
    for position in range(1, len(tokens)):
        logits = engine.model.decode(cache, np.array([tokens[position]]), np.array([position], dtype=np.int32))
        choices.append(int(logits[0].argmax()))
    return np.array(choices)
