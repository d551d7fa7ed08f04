"""Synthetic long-context retrieval tasks, generated offline and deterministically from a seed.

Tasks (``SYNTHETIC_TASKS``):

- ``passkey``: the classic "The pass key is NNNNN. Remember it." hidden in the classic repeated
  filler ("The grass is green. The sky is blue. …").
- ``niah_single``: one "special magic number for <key>" needle in a varied haystack.
- ``niah_multikey``: several key → value needles; the question asks for one key.
- ``niah_multivalue``: one key with several values; all of them must be returned.

The varied haystack comes from a built-in word list and sentence grammar (no external corpus).
Randomness comes only from ``random.Random`` instances seeded with integers derived by sha256
from (seed, task, length, depth, index), so output is identical across machines and Python
versions (``hash()`` is never used).

Context sizing: the filler is made of sentences whose token counts (each counted once, with its
leading space) are summed, which is exact for the usual pre-tokenizing tokenizers (BPE/byte-level,
SentencePiece, whitespace). The full context is then counted with ``count_tokens`` and trimmed or
topped up until ``count_tokens(context) <= target`` and within ``max(3, 2%)`` tokens of it. With
``verify="auto"`` the full count is done for the first examples and then on a sample; once the
summed estimate ever differs from the real count, every example is counted (``"all"`` always
counts). Unverified examples aim a small margin below the target so that stays <= target.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import re
from itertools import accumulate
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from kv_transition.config.schema import SyntheticCfg
from kv_transition.datasets.schema import Example, stable_id
from kv_transition.errors import DataError

GENERATOR_VERSION = 1

SYNTHETIC_TASKS: tuple[str, ...] = ("passkey", "niah_single", "niah_multikey", "niah_multivalue")

#: per-task prompt templates, in the same shape as LongBench's dataset2prompt ({context}, {input})
SYNTHETIC_PROMPTS: dict[str, str] = {
    "passkey": (
        "There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about it.\n\n{context}\n\n"
        "{input} Answer with the pass key only."
    ),
    "niah_single": (
        "Some special magic numbers are hidden within the following text. Make sure to memorize "
        "them. I will quiz you about the numbers afterwards.\n\n{context}\n\n"
        "{input} Answer with the number only."
    ),
    "niah_multikey": (
        "Some special magic numbers are hidden within the following text. Make sure to memorize "
        "them. I will quiz you about the numbers afterwards.\n\n{context}\n\n"
        "{input} Answer with the number only."
    ),
    "niah_multivalue": (
        "Some special magic numbers are hidden within the following text. Make sure to memorize "
        "them. I will quiz you about the numbers afterwards.\n\n{context}\n\n"
        "{input} Answer with the numbers only, separated by commas."
    ),
}

#: per-task generation budget (max new tokens), like LongBench's dataset2maxlen
SYNTHETIC_MAXLEN: dict[str, int] = {
    "passkey": 16,
    "niah_single": 24,
    "niah_multikey": 24,
    "niah_multivalue": 48,
}

#: how each task is scored: "exact" = the single answer string; "contains_all" = every value
SYNTHETIC_METRICS: dict[str, str] = {
    "passkey": "exact",
    "niah_single": "exact",
    "niah_multikey": "exact",
    "niah_multivalue": "contains_all",
}

#: synthetic tasks that skip the chat template (none: all are instruction prompts)
SYNTHETIC_NO_CHAT_TEMPLATE_TASKS: frozenset[str] = frozenset()

# --------------------------------------------------------------------------------------------
# Built-in filler text
# --------------------------------------------------------------------------------------------

CLASSIC_FILLER: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

_ADJ = (
    "quiet", "ancient", "bright", "narrow", "gentle", "heavy", "distant", "golden", "hidden",
    "crowded", "empty", "patient", "curious", "careful", "silver", "wooden", "frozen", "sunny",
    "humble", "restless", "clever", "tired", "proud", "fragile", "sturdy", "modest", "noisy",
    "polished", "rusty", "fresh", "wild", "calm", "bitter", "sweet", "steep", "shallow",
)
_NOUN = (
    "river", "village", "teacher", "lantern", "harbor", "garden", "library", "merchant",
    "mountain", "window", "bridge", "orchard", "painter", "traveler", "market", "forest",
    "kitchen", "letter", "sailor", "meadow", "tower", "farmer", "carriage", "valley", "notebook",
    "festival", "workshop", "island", "baker", "clock", "road", "cathedral", "stream", "poet",
    "blanket", "ladder", "chapel", "fountain", "shepherd", "violin",
)
_PLURAL = (
    "children", "travelers", "merchants", "sparrows", "fishermen", "students", "neighbors",
    "musicians", "gardeners", "pilgrims", "clouds", "lanterns", "wagons", "sheep", "tourists",
)
_VERB_PAST = (
    "walked", "rested", "waited", "wandered", "paused", "lingered", "drifted", "stood",
    "slept", "worked", "sang", "listened", "watched", "gathered", "rolled", "leaned",
)
_VERB_PRES = (
    "gather", "wander", "rest", "sing", "argue", "laugh", "trade", "wait", "listen", "work",
    "dance", "linger", "chatter", "whisper",
)
_PREP = ("near", "beside", "behind", "under", "across", "along", "toward", "around", "past", "beyond")
_TIME = (
    "at dawn", "in the evening", "after the storm", "before supper", "during the winter",
    "on market day", "at noon", "late at night", "in early spring", "after the harvest",
)
_ADV = ("slowly", "quietly", "happily", "carefully", "loudly", "patiently", "briskly", "softly")
_NAME = (
    "Anna", "Tomas", "Mira", "Elias", "Clara", "Jonah", "Lena", "Oskar", "Ruth", "Felix",
    "Ines", "Hugo", "Nora", "Paul", "Vera", "Simon",
)
_SHORT = (
    "It was quiet.", "Time passed.", "Nothing changed.", "Birds sang.", "The wind rose.",
    "Rain fell.", "Night came.", "All was well.",
)
_TEMPLATES = (
    "The {adj} {noun} {vpast} {prep} the {adj2} {noun2} {time}.",
    "{name} {vpast} {prep} the {noun} {time}, and the {noun2} seemed {adj}.",
    "In the {adj} {noun}, the {plural} {vpres} {adv}.",
    "Every morning the {plural} {vpres} {prep} the {adj} {noun}.",
    "Nobody expected the {noun} to be so {adj}.",
    "{name} said that the {noun} was {adj} and {adj2}.",
    "Far {prep} the {noun2}, a {adj} {noun} {vpast} {adv}.",
    "The {plural} remembered the {adj} {noun} {time}.",
    "When {name} reached the {noun}, the {plural} {vpres} {adv}.",
    "A {adj} {noun} is rarely found {prep} a {adj2} {noun2}.",
)

# Keys for the niah tasks: hyphenated word pairs that never occur in the filler.
_KEY_A = (
    "amber", "cobalt", "crimson", "emerald", "indigo", "ivory", "jade", "magenta", "ochre",
    "scarlet", "teal", "umber", "violet", "saffron", "azure", "russet",
)
_KEY_B = (
    "otter", "falcon", "badger", "heron", "lynx", "marten", "osprey", "panther", "raven",
    "salmon", "tapir", "walrus", "weasel", "bison", "condor", "gecko",
)


def _derive_seed(*parts: Any) -> int:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return int.from_bytes(hashlib.sha256(blob.encode("ascii")).digest()[:8], "big")


_A_VOWEL = re.compile(r"\b([Aa]) ([aeiou])")


def _make_sentence(rng: random.Random) -> str:
    tpl = _TEMPLATES[rng.randrange(len(_TEMPLATES))]
    noun = rng.choice(_NOUN)
    noun2 = rng.choice(_NOUN)
    adj = rng.choice(_ADJ)
    adj2 = rng.choice(_ADJ)
    s = tpl.format(
        adj=adj, adj2=adj2, noun=noun, noun2=noun2, plural=rng.choice(_PLURAL),
        vpast=rng.choice(_VERB_PAST), vpres=rng.choice(_VERB_PRES), prep=rng.choice(_PREP),
        time=rng.choice(_TIME), adv=rng.choice(_ADV), name=rng.choice(_NAME),
    )
    s = _A_VOWEL.sub(r"\1n \2", s)
    return s[0].upper() + s[1:]


@dataclass
class _Pool:
    """Filler sentences with their token counts (each counted with a leading space)."""

    sentences: list[str]
    counts: list[int]
    cyclic: bool  # classic filler: used in order, cycling
    by_count: list[tuple[int, int]]  # sorted (count, index) for gap filling
    keys: list[int]  # the counts of by_count

    @classmethod
    def build(cls, sentences: list[str], count_tokens: Callable[[str], int], cyclic: bool) -> "_Pool":
        counts = [max(0, int(count_tokens(" " + s))) for s in sentences]
        if any(c <= 0 for c in counts):
            raise DataError("count_tokens returned 0 tokens for a filler sentence; cannot size contexts")
        by_count = sorted((c, i) for i, c in enumerate(counts))
        return cls(sentences, counts, cyclic, by_count, [c for c, _ in by_count])

    def fit(self, gap: int, rng: random.Random) -> Optional[int]:
        """Index of a sentence with the largest count <= gap (random among equals), or None."""
        keys = self.keys
        hi = bisect.bisect_right(keys, gap)
        if hi == 0:
            return None
        c = keys[hi - 1]
        lo = bisect.bisect_left(keys, c)
        return self.by_count[lo + rng.randrange(hi - lo)][1]


_POOL_SIZE = 2048


def _varied_pool(seed: int, count_tokens: Callable[[str], int]) -> _Pool:
    rng = random.Random(_derive_seed("kvt-synthetic-pool", GENERATOR_VERSION, seed))
    seen: set[str] = set()
    sentences: list[str] = list(_SHORT)
    seen.update(sentences)
    while len(sentences) < _POOL_SIZE:
        s = _make_sentence(rng)
        if s not in seen:
            seen.add(s)
            sentences.append(s)
    return _Pool.build(sentences, count_tokens, cyclic=False)


# --------------------------------------------------------------------------------------------
# Needles and questions
# --------------------------------------------------------------------------------------------


@dataclass
class _Spec:
    question: str
    answers: list[str]
    needles: list[str]  # needle sentences; needles[0] is the target, placed at the requested depth
    params: dict[str, Any]


def _distinct_numbers(rng: random.Random, n: int, lo: int, hi: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = str(rng.randint(lo, hi))
        if v not in out:
            out.append(v)
    return out


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = [f"{a}-{b}" for a in _KEY_A for b in _KEY_B]
    return rng.sample(pairs, n)


def _spec(task: str, rng: random.Random, num_keys: int, num_values: int) -> _Spec:
    if task == "passkey":
        (value,) = _distinct_numbers(rng, 1, 10000, 99999)
        return _Spec(
            question="What is the pass key?",
            answers=[value],
            needles=[f"The pass key is {value}. Remember it."],
            params={"filler": "classic", "needle_key": None},
        )
    if task == "niah_single":
        (key,) = _keys(rng, 1)
        (value,) = _distinct_numbers(rng, 1, 1000000, 9999999)
        return _Spec(
            question=f"What is the special magic number for {key} mentioned in the provided text?",
            answers=[value],
            needles=[f"The special magic number for {key} is: {value}."],
            params={"filler": "varied", "needle_key": key},
        )
    if task == "niah_multikey":
        keys = _keys(rng, num_keys)
        values = _distinct_numbers(rng, num_keys, 1000000, 9999999)
        return _Spec(
            question=f"What is the special magic number for {keys[0]} mentioned in the provided text?",
            answers=[values[0]],
            needles=[f"The special magic number for {k} is: {v}." for k, v in zip(keys, values)],
            params={"filler": "varied", "needle_key": keys[0], "num_keys": num_keys,
                    "distractor_keys": keys[1:]},
        )
    if task == "niah_multivalue":
        (key,) = _keys(rng, 1)
        values = _distinct_numbers(rng, num_values, 1000000, 9999999)
        return _Spec(
            question=(
                f"What are all the special magic numbers for {key} mentioned in the provided text? "
                f"There are {num_values} of them."
            ),
            answers=values,
            needles=[f"One of the special magic numbers for {key} is: {v}." for v in values],
            params={"filler": "varied", "needle_key": key, "num_values": num_values},
        )
    raise DataError(_unknown(task))  # pragma: no cover - validated before


def _unknown(task: str) -> str:
    import difflib

    near = difflib.get_close_matches(task, SYNTHETIC_TASKS, n=1, cutoff=0.6)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return f"unknown synthetic task {task!r}.{hint} Valid tasks: {', '.join(SYNTHETIC_TASKS)}"


# --------------------------------------------------------------------------------------------
# Context assembly
# --------------------------------------------------------------------------------------------


class _Verifier:
    """Decides which examples get a full count_tokens(context) check (see module docstring)."""

    CALIBRATE = 8  # first examples always verified
    EVERY = 100  # afterwards, one in EVERY

    def __init__(self, mode: str):
        self.mode = mode
        self.n = 0
        self.mismatch = False

    def should_verify(self) -> bool:
        self.n += 1
        if self.mode == "all" or self.mismatch:
            return True
        return self.n <= self.CALIBRATE or self.n % self.EVERY == 0

    def margin(self, target: int) -> int:
        """Slack kept below the target when the example may not be verified."""
        if self.mode == "all" or self.mismatch:
            return 0
        return max(1, target // 200)


def _tolerance(target: int) -> int:
    return max(3, target // 50)


class _Parts:
    """The context as parallel lists: text, token count (with leading space), needle index or -1."""

    __slots__ = ("texts", "counts", "kinds")

    def __init__(self, texts: list[str], counts: list[int], kinds: list[int]):
        self.texts, self.counts, self.kinds = texts, counts, kinds

    def text(self) -> str:
        return " ".join(self.texts)

    def estimate(self, first_count: int) -> int:
        return sum(self.counts) - self.counts[0] + first_count

    def drop_filler(self, excess: int) -> None:
        """Remove filler from the end (never needles) until >= excess tokens are gone."""
        removed = 0
        i = len(self.texts) - 1
        while removed < excess and i >= 0:
            if self.kinds[i] < 0 and len(self.texts) > 1:
                removed += self.counts[i]
                del self.texts[i], self.counts[i], self.kinds[i]
            i -= 1
        if removed < excess:
            raise DataError(
                "synthetic context cannot be trimmed to its target length (needles alone exceed it)"
            )

    def append(self, text: str, count: int) -> None:
        self.texts.append(text)
        self.counts.append(count)
        self.kinds.append(-1)


def _draw_filler(pool: _Pool, budget: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Filler sentence indices whose summed counts stay <= budget, and their running sums."""
    counts = pool.counts
    n = len(counts)
    avg = max(1.0, sum(counts) / n)
    seq: list[int] = []
    acc: list[int] = []
    total = 0
    cyc = rng.randrange(n) if pool.cyclic else 0
    while True:
        want = int((budget - total) / avg * 1.1) + 8
        if pool.cyclic:
            batch = [(cyc + i) % n for i in range(len(seq), len(seq) + want)]
        else:
            batch = [int(x * n) for x in (rng.random() for _ in range(want))]
        new_acc = list(accumulate((counts[j] for j in batch), initial=total))[1:]
        k = bisect.bisect_right(new_acc, budget)
        seq.extend(batch[:k])
        acc.extend(new_acc[:k])
        if k < len(batch):
            break
        total = acc[-1] if acc else 0
    total = acc[-1] if acc else 0
    while True:  # top up the gap with the best-fitting sentences
        j = pool.fit(budget - total, rng)
        if j is None:
            break
        seq.append(j)
        total += counts[j]
        acc.append(total)
    return seq, acc


def _build_context(
    spec: _Spec,
    pool: _Pool,
    target: int,
    depth: float,
    rng: random.Random,
    count_tokens: Callable[[str], int],
    verifier: _Verifier,
) -> tuple[str, dict[str, Any]]:
    needle_counts = [int(count_tokens(" " + n)) for n in spec.needles]
    needle_total = sum(needle_counts)
    verify = verifier.should_verify()
    goal = target - (0 if verify else verifier.margin(target))
    budget = goal - needle_total
    if budget < 0:
        raise DataError(
            f"synthetic target length {target} tokens is too small for the needles "
            f"({needle_total} tokens); use a larger length"
        )

    # 1. filler up to the budget
    filler, acc = _draw_filler(pool, budget, rng)
    cum = [0] + acc
    parts = _Parts(
        [pool.sentences[j] for j in filler], [pool.counts[j] for j in filler], [-1] * len(filler)
    )

    # 2. needles: the target at `depth` (in filler tokens), the others at random depths
    depths = [depth] + [rng.random() for _ in spec.needles[1:]]
    placed: list[tuple[int, int]] = []
    for k, d in enumerate(depths):
        want = d * cum[-1]
        b = bisect.bisect_left(cum, want)
        if b > 0 and (b == len(cum) or want - cum[b - 1] <= cum[b] - want):
            b -= 1
        placed.append((b, k))
    for b, k in sorted(placed, reverse=True):  # insert back to front: boundaries stay valid
        parts.texts.insert(b, spec.needles[k])
        parts.counts.insert(b, needle_counts[k])
        parts.kinds.insert(b, k)

    # 3. exact first piece (no leading space), trim to the goal, then verify if chosen
    first_count = int(count_tokens(parts.texts[0]))
    est = parts.estimate(first_count)
    while est > goal:
        parts.drop_filler(est - goal)
        first_count = int(count_tokens(parts.texts[0]))
        est = parts.estimate(first_count)
    context = parts.text()
    measured: Optional[int] = None
    if verify:
        tol = _tolerance(target)
        for _ in range(12):
            measured = int(count_tokens(context))
            if measured != est:
                verifier.mismatch = True
            if measured > target:
                parts.drop_filler(measured - target)
            elif target - measured > tol:
                j = pool.fit(target - measured, rng)
                if j is None:
                    break
                parts.append(pool.sentences[j], pool.counts[j])  # at the end: needle depths kept
            else:
                break
            first_count = int(count_tokens(parts.texts[0]))
            est = parts.estimate(first_count)
            context = parts.text()
        else:
            measured = int(count_tokens(context))
        if measured > target:
            raise DataError(
                f"could not size a synthetic {spec.params.get('filler')} context to {target} tokens "
                f"(got {measured}); the tokenizer is far from additive over sentences"
            )

    # 4. where the needles ended up
    char_off = [0] * len(spec.needles)
    tok_off = [0] * len(spec.needles)
    pos = tok = 0
    for text, c, kind in zip(parts.texts, parts.counts, parts.kinds):
        if kind >= 0:
            char_off[kind] = pos
            tok_off[kind] = tok
        pos += len(text) + 1
        tok += c
    info = {
        "context_tokens": measured if measured is not None else est,
        "context_tokens_measured": measured is not None,
        "needle_char_offsets": char_off,
        "needle_token_offsets": tok_off,
        "needle_depths_actual": [round(t / max(1, est), 4) for t in tok_off],
    }
    return context, info


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def validate_tasks(tasks: list[str]) -> None:
    if not tasks:
        raise DataError("dataset.synthetic.tasks is empty")
    for t in tasks:
        if t not in SYNTHETIC_TASKS:
            raise DataError(_unknown(t))
    if len(set(tasks)) != len(tasks):
        raise DataError(f"dataset.synthetic.tasks lists a task twice: {tasks}")


def generate_synthetic(
    cfg: SyntheticCfg,
    count_tokens: Callable[[str], int],
    *,
    verify: Optional[Literal["auto", "all"]] = None,
) -> list[Example]:
    """Generate the configured synthetic examples (task, length, depth, index order).

    ``count_tokens`` is the model tokenizer's count (no special tokens). ``verify`` overrides
    ``cfg.verify_tokens``.
    """
    validate_tasks(cfg.tasks)
    mode = verify or cfg.verify_tokens
    if mode not in ("auto", "all"):
        raise DataError(f"dataset.synthetic.verify_tokens must be 'auto' or 'all', not {mode!r}")
    num_keys, num_values = cfg.num_keys, cfg.num_values
    pools: dict[str, _Pool] = {}
    verifiers: dict[str, _Verifier] = {}
    out: list[Example] = []
    for task in cfg.tasks:
        for length in cfg.lengths:
            for depth in cfg.depths:
                for index in range(cfg.n_per_length):
                    rng = random.Random(
                        _derive_seed("kvt-synthetic", GENERATOR_VERSION, cfg.seed, task, length, depth, index)
                    )
                    spec = _spec(task, rng, num_keys, num_values)
                    filler = spec.params["filler"]
                    if filler not in pools:
                        pools[filler] = (
                            _Pool.build(list(CLASSIC_FILLER), count_tokens, cyclic=True)
                            if filler == "classic"
                            else _varied_pool(cfg.seed, count_tokens)
                        )
                        verifiers[filler] = _Verifier(mode)
                    context, info = _build_context(
                        spec, pools[filler], length, depth, rng, count_tokens, verifiers[filler]
                    )
                    meta: dict[str, Any] = {
                        "source": "synthetic",
                        "task": task,
                        "language": "en",
                        "target_tokens": length,
                        "depth": depth,
                        "seed": cfg.seed,
                        "index": index,
                        "metric": SYNTHETIC_METRICS[task],
                        "generator_version": GENERATOR_VERSION,
                        **spec.params,
                        **info,
                    }
                    out.append(
                        Example(
                            example_id=stable_id(
                                "synthetic", GENERATOR_VERSION, task, cfg.seed, length, depth, index
                            ),
                            question=spec.question,
                            context=context,
                            answers=spec.answers,
                            meta=meta,
                        )
                    )
    return out
