"""Cost of cross-tokenizer alignment next to tokenization, on the GSM8K sample with the embedded pair.

Tokenizes every row with the target (SmolLM2, chat template) and the behavior
(Gemma-3-270M, raw template), then aligns them by character offsets
(`pear_data.align.align_row`), and prints the time of each step, target
completion tokens/s of the alignment and ms per row, plus the share of
completion characters in spans of one target token.

    python bench/align_throughput.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pear_data.align import AlignmentStats, align_row, turn_tokens
from pear_data.models import load_tokenizer, resolve_model
from pear_data.tokenize import ConversationTokenizer, TokenizeConfig

GSM8K = Path(__file__).resolve().parents[1] / "examples" / "data" / "gsm8k_sample.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="passes over the 64 rows")
    args = parser.parse_args()

    target = ConversationTokenizer(load_tokenizer(resolve_model("smollm2-135m-instruct")))
    behavior = ConversationTokenizer(load_tokenizer(resolve_model("gemma-3-270m")), TokenizeConfig(template="raw"))
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    conversations = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
                     for r in rows] * args.repeat

    t0 = time.perf_counter()
    target_rows = [target(c) for c in conversations]
    t1 = time.perf_counter()
    behavior_rows = [behavior(c) for c in conversations]
    t2 = time.perf_counter()
    stats = AlignmentStats()
    for conversation, t, b in zip(conversations, target_rows, behavior_rows):
        contents = [conversation[1]["content"]]
        stats.add(align_row(t, turn_tokens(b, contents, "behavior"), contents).stats)
    t3 = time.perf_counter()

    tokens = sum(int(t.completion_mask.sum()) for t in target_rows)
    print(f"{len(conversations)} rows, {tokens:,} target completion tokens")
    print(f"target tokenize    {t1 - t0:.3f} s")
    print(f"behavior tokenize  {t2 - t1:.3f} s")
    print(f"align              {t3 - t2:.3f} s  ({tokens / (t3 - t2) / 1e3:.0f}k target tokens/s, "
          f"{(t3 - t2) / len(conversations) * 1e3:.2f} ms/row)")
    print(f"chars in one-target-token spans: {stats.to_dict()['share_chars_in_one_token_spans']:.1%} "
          f"of {stats.completion_chars:,}")


if __name__ == "__main__":
    main()
