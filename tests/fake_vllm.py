"""Stand-ins for vLLM's objects, copied from vLLM's own source (vLLM is not installed here).

Each class names the file it copies; the behaviour the backend relies on (shapes, indexing rules, the
errors) is kept as vLLM has it, the rest is left out.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableSequence
from dataclasses import dataclass, field


@dataclass
class Logprob:
    """vllm/logprobs.py `Logprob` (vLLM 0.8 to 0.34: unchanged)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs(MutableSequence):
    """vllm/logprobs.py `FlatLogprobs` (vLLM 0.12 to 0.34; `__getitem__` on an int is the same in all).

    What `prompt_logprobs` is when a request sets `flat_logprobs=True`. `__getitem__` takes a Python `int` or
    a slice and raises TypeError on anything else: a numpy integer is not an `int`.
    """

    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append(self, logprobs_one_position: dict[int, Logprob] | None) -> None:
        self.start_indices.append(len(self.logprobs))
        if logprobs_one_position:
            for token_id, logprob in logprobs_one_position.items():
                self.token_ids.append(token_id)
                self.logprobs.append(logprob.logprob)
                self.ranks.append(logprob.rank)
                self.decoded_tokens.append(logprob.decoded_token)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)

    def __getitem__(self, index):
        if isinstance(index, int):
            return {
                self.token_ids[i]: Logprob(logprob=self.logprobs[i], rank=self.ranks[i],
                                           decoded_token=self.decoded_tokens[i])
                for i in range(self.start_indices[index], self.end_indices[index])
            }
        elif isinstance(index, slice):
            raise NotImplementedError("slices are not used by pear-data")
        else:
            raise TypeError(f"Invalid index type: {type(index)}")

    def __setitem__(self, item, value) -> None:
        raise TypeError("Cannot set logprobs in FlatLogprobs")

    def __delitem__(self, item) -> None:
        raise TypeError("Cannot delete logprobs from FlatLogprobs")

    def insert(self, index: int, value) -> None:
        raise TypeError("Cannot insert logprobs to FlatLogprobs")

    def __iter__(self) -> Iterator[dict[int, Logprob]]:
        for i in range(0, len(self.start_indices)):
            yield self.__getitem__(i)


def prompt_logprobs(token_ids: list[int], logprobs: list[float], *, flat: bool, rank: int = 3):
    """A request's `prompt_logprobs` with `prompt_logprobs=0`, built as vLLM builds it.

    vllm/logprobs.py `create_prompt_logprobs` (a FlatLogprobs or a list, then None for the first token) and
    `append_logprobs_for_next_position` (one dict per later position holding the prompt token only, whatever
    its rank, when the request asks for 0 top log-probs). logprobs[j] is the log-prob of token_ids[j + 1].
    """
    container = FlatLogprobs() if flat else []
    container.append(None)
    for token, value in zip(token_ids[1:], logprobs):
        container.append({token: Logprob(logprob=value, rank=rank)})
    return container
