"""What the second experiment measures on a checkpoint: pass@1, unbiased pass@k, each style's share and
accuracy, and the teacher's held-out NLL (the "SFT metric")."""

from __future__ import annotations

from math import comb

import cups
import torch


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased estimator of pass@k from `samples` draws of which `correct` are right: 1 - C(n-c, k) / C(n, k)."""
    if samples - correct < k:
        return 1.0
    return 1.0 - comb(samples - correct, k) / comb(samples, k)


def style_table(completions: list[str], rewards: list[float]) -> dict[str, dict]:
    """Per style (chain, direct, malformed): its share of the completions and its accuracy (None when unseen)."""
    styles = [cups.style(c) for c in completions]
    table = {}
    for name in cups.STYLES:
        mine = [r for r, s in zip(rewards, styles) if s == name]
        table[name] = {"share": len(mine) / len(styles), "accuracy": sum(mine) / len(mine) if mine else None}
    return table


@torch.no_grad()
def teacher_nll(model, tokenizer, problems: list) -> float:
    """The mean NLL per completion token (the end included) of the teacher's direct answers to `problems`."""
    import model as M
    from task import SEPARATOR

    rows = [(len(tokenizer(cups.prompt_text(p) + SEPARATOR)["input_ids"]),
             M.encode(tokenizer, cups.prompt_text(p), cups.direct_text(p))) for p in problems]
    width = max(len(full) for _, full in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (start, full) in enumerate(rows):
        ids[i, : len(full)] = torch.tensor(full)
        labels[i, start: len(full)] = torch.tensor(full[start:])
    model.eval()
    return model(input_ids=ids, attention_mask=ids != tokenizer.pad_token_id, labels=labels).loss.item()


def evaluate(model, tokenizer, problems: list, samples: int, k: int, seed: int, max_new_tokens: int) -> dict:
    """pass@1 and pass@k (unbiased, from `samples` draws per problem at temperature 1), styles, teacher NLL."""
    import model as M

    completions = M.sample(model, tokenizer, [cups.prompt_text(p) for p in problems], samples, temperature=1.0,
                           seed=seed, max_new_tokens=max_new_tokens)
    rewards = [[cups.reward(c, p) for c in cs] for cs, p in zip(completions, problems)]
    flat = [r for row in rewards for r in row]
    return {
        "pass@1": sum(flat) / len(flat),
        f"pass@{k}": sum(pass_at_k(samples, int(sum(row)), k) for row in rewards) / len(problems),
        "styles": style_table([c for cs in completions for c in cs], flat),
        "teacher_nll": teacher_nll(model, tokenizer, problems),
    }
