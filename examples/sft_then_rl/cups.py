"""The cup-swap task of the second experiment: track three cups through a list of swaps.

The cups start as `ABC`. A problem is a tuple of swaps, each a pair of positions 1..3; the prompt
spells them with a letter for each step (`a12 b23 c13`) and the answer is the final arrangement. Two valid
solution styles:

    chain   a12BAC b23BCA c13ACB;ACB    each step restated with the arrangement after it, then the answer
    direct  ;ACB                        the answer at once

The verifier reads only the arrangement after the last `;`. The target's own style is the chain: its
pretraining text is chains in which each written arrangement slips (another arrangement, drawn uniformly, is
written) with some probability, later steps continuing from what was written. Restating the step puts
everything it needs next to it, and the step letters make each swap of the prompt easy to find (with three
pairs of positions, the same swap recurs), which makes the chain quick to learn. The teacher is an oracle
that writes only direct answers, always right: its probability of each character and of the end is 1, so
its exact log-probs are zeros.
A direct answer needs the whole composition of swaps in one step, which a small model cannot learn
beyond its parity (an even number of swaps leaves an even permutation: 1 answer in 3 instead of 1 in 6); a
chain needs one swap per step, which it can.
"""

from __future__ import annotations

import itertools
import random
import re

START = "ABC"
PAIRS = ((1, 2), (1, 3), (2, 3))
STEPS = "abcdefghij"  # the letter of each step, in the prompt and in chains
ALPHABET = "ABC123" + STEPS + " ;\n"
# One token per step (a letter and its swap, `b23`), so that restating step k copies the one prompt token
# whose letter follows the last one restated.
MERGES = tuple((str(i), str(j)) for i, j in PAIRS) + tuple((s, f"{i}{j}") for s in STEPS for i, j in PAIRS)
ARRANGEMENTS = tuple("".join(p) for p in itertools.permutations(START))
STYLES = ("chain", "direct", "malformed")
_ANSWER = re.compile(r";([A-C]{3})$")
_CHAIN = re.compile(r"^[a-j][1-3]{2}[A-C]{3}( [a-j][1-3]{2}[A-C]{3})*;[A-C]{3}$")
_DIRECT = re.compile(r"^;[A-C]{3}$")

Problem = tuple[tuple[int, int], ...]


def swap(arrangement: str, pair: tuple[int, int]) -> str:
    cups, (i, j) = list(arrangement), pair
    cups[i - 1], cups[j - 1] = cups[j - 1], cups[i - 1]
    return "".join(cups)


def arrangements(problem: Problem) -> list[str]:
    """The arrangement after each swap; the last one is the answer."""
    out, current = [], START
    for pair in problem:
        current = swap(current, pair)
        out.append(current)
    return out


def steps_text(problem: Problem) -> list[str]:
    return [f"{letter}{i}{j}" for letter, (i, j) in zip(STEPS, problem)]


def prompt_text(problem: Problem) -> str:
    return " ".join(steps_text(problem))


def chain_text(problem: Problem, written: list[str]) -> str:
    """The chain that restates each step of `problem` with the arrangement written after it."""
    return " ".join(step + a for step, a in zip(steps_text(problem), written)) + ";" + written[-1]


def direct_text(problem: Problem) -> str:
    return ";" + arrangements(problem)[-1]


def reward(completion: str, problem: Problem) -> float:
    """1.0 when the arrangement after the last `;` (at the end of the completion) is the answer, else 0.0."""
    match = _ANSWER.search(completion.strip())
    return float(match is not None and match.group(1) == arrangements(problem)[-1])


def style(completion: str) -> str:
    """`chain`, `direct` or `malformed`, from the completion's form alone (right or wrong)."""
    text = completion.strip()
    if _DIRECT.match(text):
        return "direct"
    return "chain" if _CHAIN.match(text) else "malformed"


def problems(count: int, seed: int, swaps: tuple[int, int] = (4, 8), exclude: set | None = None,
             distinct: bool = True) -> list[Problem]:
    """`count` problems of swaps[0]..swaps[1] swaps (each a random pair of positions), none in `exclude`; all
    different when `distinct` (held-out sets), else drawn with repeats (training sets: short problems are few)."""
    rng, seen, out = random.Random(seed), set(exclude or ()), []
    while len(out) < count:
        problem = tuple(rng.choice(PAIRS) for _ in range(rng.randint(*swaps)))
        if problem not in seen:
            if distinct:
                seen.add(problem)
            out.append(problem)
    return out


def slipped_chain(problem: Problem, slip: float, rng: random.Random) -> str:
    """A chain in which each step writes a wrong arrangement (any other, uniformly) with probability `slip`; later
    steps follow what was written. A wrong arrangement, unlike a wrong swap, also breaks the answer's parity."""
    written, current = [], START
    for pair in problem:
        current = swap(current, pair)
        if rng.random() < slip:
            current = rng.choice([a for a in ARRANGEMENTS if a != current])
        written.append(current)
    return chain_text(problem, written)


def teacher(problem: Problem) -> tuple[str, list[float]]:
    """The oracle's completion and its log-prob of every character and of the end (all zero: it is certain)."""
    completion = direct_text(problem)
    return completion, [0.0] * (len(completion) + 1)
