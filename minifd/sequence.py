"""One sequence being generated: the tokens it takes, the text it streams, and the rules that end it.

A sequence ends at one of its stop ids (the EOS tokens), at a stop string in its text (cut before
it), after max_new_tokens tokens, or when it is cancelled. Its text streams to a sink piece by piece
as the tokens come, with what may still turn out to be a stop string held back.
"""

from minifd.model.tokenizer import IncrementalDecoder


class StopStrings:
    """Cuts streamed text before the first stop string. The end of the text that could be the start of
    one (a stop string may span several tokens) is held back until later text settles it."""

    def __init__(self, stops):
        self.stops = [stop for stop in stops if stop]
        self.held = ""

    def push(self, text):
        """-> (the text that is certainly no stop string's, whether a stop string has ended the text)"""
        text = self.held + text
        found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.held = ""
            return text[:min(found)], True
        kept = len(text) - self._start_of_a_stop(text)
        self.held = text[kept:]
        return text[:kept], False

    def flush(self):
        """-> what is held back, once no more text comes."""
        held, self.held = self.held, ""
        return held

    def _start_of_a_stop(self, text):
        # the length of the longest end of text that begins some stop string
        return max((length for stop in self.stops for length in range(1, min(len(stop), len(text) + 1))
                    if text.endswith(stop[:length])), default=0)


class Sequence:
    def __init__(self, prompt_ids, tokenizer, max_new_tokens, stop_ids=frozenset(), stop_strings=(), cached=0,
                 on_text=None):
        """prompt_ids: the tokens to continue; stop_ids: the tokens that end it (not part of its text);
        cached: how many leading prompt positions its KV-cache slot already holds; on_text(text): called
        with each new piece of text."""
        self.prompt_ids, self.max_new_tokens, self.stop_ids, self.cached = list(prompt_ids), max_new_tokens, stop_ids, cached
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self.stop_strings = StopStrings(stop_strings)
        # A stop string that is a special token (`<|eot_id|>`) never shows in the decoded text: its id stops.
        self.stop_string_ids = tokenizer.special_token_ids(stop_strings)
        self.on_text = on_text
        self.chosen = []  # every token chosen for it, the stop id that ended it included
        self.token_ids = []  # the generated tokens, without that stop id or special-token stop string
        self.pieces = []  # the text streamed
        self.finish_reason = None  # "eos", "stop", "length", "cancelled" or "error" once it has ended

    @property
    def running(self):
        return self.finish_reason is None

    @property
    def text(self):
        """The generated text as streamed, cut before a stop string."""
        return "".join(self.pieces)

    def ids_in_cache(self):
        """The tokens whose keys and values its cache slot holds: the prompt and every chosen token but
        the last (a decode step stores the token it is fed), or only the cached prompt positions when
        the prompt was never prefilled."""
        if not self.chosen:
            return self.prompt_ids[:self.cached]
        return self.prompt_ids + self.chosen[:-1]

    def accept(self, token):
        """Take the next chosen token (the sequence must be running)."""
        self.chosen.append(token)
        if token in self.stop_ids or token in self.stop_string_ids:
            self.finish("eos" if token in self.stop_ids else "stop")
            return
        self.token_ids.append(token)
        if self._stream(self.decoder.push(token)):
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.max_new_tokens:
            self.finish("length")

    def finish(self, reason):
        """End it for `reason`, streaming what the decoder and the stop strings held back (unless that
        completes a stop string after all)."""
        self.finish_reason = "stop" if self._stream(self.decoder.flush(), final=True) else reason

    def _stream(self, text, final=False):
        """Pass text through the stop strings on to the sink; -> whether a stop string ended it."""
        piece, stopped = self.stop_strings.push(text)
        if final and not stopped:
            piece += self.stop_strings.flush()
        if piece:
            self.pieces.append(piece)
            if self.on_text is not None:
                self.on_text(piece)
        return stopped
