"""The task: sums of digits written in a small symbolic language, with a verifier and a programmatic teacher.

A problem is a list of digits, the prompt spells it (`7+5+9+3`), the answer is the sum. A completion is
one of three solution styles, all valid:

    left   7+5=12,12+9=21,21+3=24;24     running sums from the left
    right  3+9=12,12+5=17,17+7=24;24     running sums from the right
    direct ;24                           the answer at once

The verifier reads only the final answer (the number after the last `;`), so a chain with a slip is
wrong and a lucky direct answer is right. A *writer* (`Writer`) is a distribution over completions: a
mix of styles and a slip rate (each number it writes is off by one with that probability, and later
steps continue from what was written). Its exact per-character log-probabilities come from enumerating
every completion it can write (`Writer.distribution`), so a corpus written by one records the exact
behavior log-probs that `pear-data score --behavior-logprobs-field` reads.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

END = "\x00"  # the end of a completion (the tokenizer's EOS) in the enumeration; never written to text
SEPARATOR = "\n\n"  # pear-data's raw rendering puts this between prompt and completion (design 2.2)
_ANSWER = re.compile(r";(\d+)\s*$")


def prompt_text(digits: tuple[int, ...]) -> str:
    return "+".join(map(str, digits))


def chain(digits: tuple[int, ...], values: list[int]) -> str:
    """A running-sum chain over `digits` whose written partial sums are `values`, then the answer."""
    steps, left = [], digits[0]
    for digit, value in zip(digits[1:], values):
        steps.append(f"{left}+{digit}={value}")
        left = value
    return ",".join(steps) + f";{values[-1]}"


def reward(completion: str, digits: tuple[int, ...]) -> float:
    """1.0 when the completion's final answer is the sum of the digits, else 0.0."""
    match = _ANSWER.search(completion)
    return float(match is not None and int(match.group(1)) == sum(digits))


def problems(count: int, seed: int, lengths: tuple[int, ...] = (3, 4, 5), exclude: set | None = None
             ) -> list[tuple[int, ...]]:
    """`count` distinct problems (digit tuples 1..9 of the given lengths), none in `exclude`."""
    rng, seen, out = random.Random(seed), set(exclude or ()), []
    while len(out) < count:
        digits = tuple(rng.randint(1, 9) for _ in range(rng.choice(lengths)))
        if digits not in seen:
            seen.add(digits)
            out.append(digits)
    return out


@dataclass(frozen=True)
class Writer:
    """A distribution over completions: style probabilities and a per-number slip rate."""

    styles: dict[str, float] = field(default_factory=lambda: {"left": 1.0})
    slip: float = 0.0

    def distribution(self, digits: tuple[int, ...]) -> dict[str, float]:
        """Every completion this writer can write for `digits` (ending in END), with its probability."""
        out: dict[str, float] = {}
        for style, p_style in self.styles.items():
            if p_style <= 0:
                continue
            if style == "direct":
                for value, p in self._noisy(sum(digits)):
                    out[f";{value}{END}"] = out.get(f";{value}{END}", 0.0) + p_style * p
                continue
            order = digits if style == "left" else digits[::-1]
            for values, p in self._chains(order):
                text = chain(order, values) + END
                out[text] = out.get(text, 0.0) + p_style * p
        return out

    def _noisy(self, value: int) -> list[tuple[int, float]]:
        if self.slip <= 0:
            return [(value, 1.0)]
        return [(value, 1.0 - self.slip), (value - 1, self.slip / 2), (value + 1, self.slip / 2)]

    def _chains(self, order: tuple[int, ...]) -> list[tuple[list[int], float]]:
        paths = [([], 1.0, order[0])]
        for digit in order[1:]:
            paths = [(values + [v], p * q, v) for values, p, left in paths for v, q in self._noisy(left + digit)]
        return [(values, p) for values, p, _ in paths]

    def sample(self, digits: tuple[int, ...], rng: random.Random) -> tuple[str, list[float]]:
        """One completion (without END) and the log-prob of each of its characters and of the end."""
        dist = self.distribution(digits)
        texts = sorted(dist)
        text = rng.choices(texts, weights=[dist[t] for t in texts])[0]
        return text[:-1], char_logprobs(dist, text)


def char_logprobs(dist: dict[str, float], text: str) -> list[float]:
    """log p(text[i] | text[:i]) under `dist` (whole strings ending in END) for every character of `text`."""
    out, before = [], 1.0
    for i in range(len(text)):
        mass = sum(p for t, p in dist.items() if t.startswith(text[: i + 1]))
        out.append(math.log(mass / before) if mass < before else 0.0)
        before = mass
    return out


# The target's pretraining text prefers left chains; the teacher that writes the SFT corpus prefers the
# other two styles and slips more. Both are fixed here, before any comparison.
PRETRAIN_WRITER = Writer(styles={"left": 0.8, "direct": 0.2}, slip=0.3)
TEACHER = Writer(styles={"left": 0.2, "right": 0.4, "direct": 0.4}, slip=0.1)
