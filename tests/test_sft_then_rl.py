"""The SFT -> RL experiment (examples/sft_then_rl): its pure parts, and the smoke preset end to end, twice."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest

from .example_runs import EXAMPLE, run_preset

sys.path.insert(0, str(EXAMPLE))

import report  # noqa: E402
import task  # noqa: E402

ARMS = ["plain", "pear_token_static", "pear_block_static", "pear_sequence_static", "pear_token_online",
        "plain_3x", "plain_10x", "pear_sequence_static_clip_narrow"]


def test_writer_distribution_enumerates_every_completion_with_its_probability():
    writer = task.Writer(styles={"left": 0.5, "right": 0.25, "direct": 0.25}, slip=0.2)
    digits = (3, 9, 3)
    dist = writer.distribution(digits)
    assert math.isclose(sum(dist.values()), 1.0)
    # plain loop: 2 chain styles x 3^2 slip paths + 3 direct answers; left and right chains of a palindrome
    # spell the same text, so their probabilities add up.
    assert len(dist) == 9 + 3
    exact = f"3+9=12,12+3=15;15{task.END}"
    assert math.isclose(dist[exact], 0.75 * 0.8 * 0.8)
    assert all(text.endswith(task.END) for text in dist)


def test_char_logprobs_factor_the_completion_probability():
    writer = task.TEACHER
    rng = random.Random(0)
    for digits in task.problems(40, seed=3):
        text, logprobs = writer.sample(digits, rng)
        dist = writer.distribution(digits)
        assert len(logprobs) == len(text) + 1  # every character and the end
        assert all(lp <= 0.0 for lp in logprobs)
        assert math.isclose(math.exp(sum(logprobs)), dist[text + task.END], rel_tol=1e-9)
        # each factor against a plain loop over the completions sharing the prefix
        full = text + task.END
        for i, lp in enumerate(logprobs):
            num = sum(p for t, p in dist.items() if t[: i + 1] == full[: i + 1])
            den = sum(p for t, p in dist.items() if t[:i] == full[:i])
            assert math.isclose(lp, math.log(num / den), abs_tol=1e-12)


def test_reward_reads_only_the_final_answer():
    assert task.reward("7+5=12,12+9=21;21", (7, 5, 9)) == 1.0
    assert task.reward(";21", (7, 5, 9)) == 1.0
    assert task.reward("7+5=13,13+9=22;22", (7, 5, 9)) == 0.0
    assert task.reward("7+5=12,12+9=21", (7, 5, 9)) == 0.0
    assert task.reward("", (7, 5, 9)) == 0.0


def test_problem_sets_are_disjoint():
    test = task.problems(50, seed=1)
    train = task.problems(500, seed=2, exclude=set(test))
    assert len(set(test)) == 50 and not set(test) & set(train)


def test_paired_ci_matches_a_hand_computation():
    out = report.paired_ci([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])
    diffs = [0.1, 0.2, 0.3]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert math.isclose(out["mean"], mean)
    assert math.isclose(out["ci95"][1] - mean, 4.303 * sd / math.sqrt(3))
    assert report.paired_ci([0.5], [0.4])["ci95"] is None


@pytest.mark.slow
def test_smoke_preset_end_to_end_is_deterministic(tmp_path):
    results = run_preset("smoke", tmp_path / "a")
    assert results["preset"] == "smoke" and results["seeds"] == [0]
    assert sorted(results["arms"]) == sorted(ARMS)
    for name, arm in results["arms"].items():
        for stage in ("pre_rl", "post_rl"):
            for metric in ("pass@1", "pass@8"):
                value = arm["seeds"]["0"][stage][metric]
                assert 0.0 <= value <= 1.0
            assert arm["seeds"]["0"][stage]["pass@1"] <= arm["seeds"]["0"][stage]["pass@8"]
        assert len(arm["rl_reward_mean"]) == 2  # the smoke preset's GRPO steps
        if name.startswith("plain"):
            assert arm["weights"] is None
        else:
            assert 0.0 < arm["weights"]["ess_fraction"] <= 1.0
    # SFT beats chance (the untrained model), and the pipeline wrote what it says
    assert results["arms"]["plain"]["seeds"]["0"]["pre_rl"]["pass@8"] > results["before_sft"]["untrained"]["pass@8"]
    scored = tmp_path / "a" / "scored"
    manifest = json.loads((scored / "manifest.json").read_text())
    assert manifest["rows"]["out"] == 128 and manifest["behavior"]["recorded_field"] == "teacher_logprobs"
    assert (tmp_path / "a" / "results.png").stat().st_size > 0
    # the same preset and seeds give the same results.json
    again = run_preset("smoke", tmp_path / "b")
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
    assert again == results
