"""Incremental detokenization with stop strings (pure Python; no torch).

Decoding the whole answer at every token is O(n^2) over a request. Here each token decodes a short window
(the previous "prefix" tokens and the new ones) and appends only the text that window adds, as vLLM's
incremental detokenizer does; text stays exactly ``tokenizer.decode(ids, skip_special_tokens=True)`` for
byte-level BPE and SentencePiece tokenizers (the test suite checks it on the served tokenizer). An
incomplete UTF-8 sequence (the window decodes to a trailing U+FFFD) waits for the next token.

Stop strings are searched only in the text that can contain a new match (the new text plus the longest stop
string's length - 1 before it), and that many characters are held back from streaming until they cannot
start a match any more.
"""

from __future__ import annotations

from typing import Any, Callable


class Detokenizer:
    def __init__(self, tokenizer: Any, stops: list[str] | None = None,
                 on_delta: Callable[[str], None] | None = None):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start (tokens already turned into text, kept for context)
        self.read = 0  # tokens whose text is in self.text
        self.text = ""
        self.stops = [s for s in (stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.emitted = 0
        self.on_delta = on_delta
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> bool:
        """Add one generated token; returns True when a stop string ended the text (text is cut before it)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return False
        before = len(self.text)
        self.text += new_text[len(prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        if self.stops:
            start = max(0, before - self.hold)
            cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.stopped = True
                return True
        if self.on_delta is not None:
            safe = len(self.text) - self.hold
            if safe > self.emitted:
                self.on_delta(self.text[self.emitted:safe])
                self.emitted = safe
        return False

    def finish(self) -> str:
        """The final text (an incomplete trailing character is kept as decode() renders it); the held-back
        tail is streamed."""
        if not self.stopped and self.read < len(self.ids):
            prefix_text = self._decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
            tail = self._decode(self.ids[self.prefix:])
            if len(tail) > len(prefix_text):
                self.text += tail[len(prefix_text):]
            self.read = len(self.ids)
        if self.on_delta is not None and len(self.text) > self.emitted:
            self.on_delta(self.text[self.emitted:])
            self.emitted = len(self.text)
        return self.text
