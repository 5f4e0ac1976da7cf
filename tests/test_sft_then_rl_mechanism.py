"""The second SFT -> RL experiment (examples/sft_then_rl, presets mechanism*): the cup-swap task, the metrics,
the statistics of the readings, and the smoke preset end to end, twice."""

from __future__ import annotations

import itertools
import json
import math
import random
import sys

import pytest

from .example_runs import EXAMPLE, run_preset

sys.path.insert(0, str(EXAMPLE))

import cups  # noqa: E402
import mechanism_report as report  # noqa: E402
from metrics import pass_at_k, style_table  # noqa: E402


def test_chain_and_direct_answers_are_right_and_classified():
    problem = ((1, 2), (2, 3), (1, 3))
    assert cups.arrangements(problem) == ["BAC", "BCA", "ACB"]
    chain = cups.chain_text(problem, cups.arrangements(problem))
    assert cups.prompt_text(problem) == "a12 b23 c13" and chain == "a12BAC b23BCA c13ACB;ACB"
    for completion, style in ((chain, "chain"), (";ACB", "direct")):
        assert cups.style(completion) == style and cups.reward(completion, problem) == 1.0
    assert cups.reward(";ABC", problem) == 0.0
    assert cups.reward("a12BAC b23BCA c13ACB", problem) == 0.0  # no answer after `;`
    assert cups.reward("ACB", problem) == 0.0
    assert cups.style("a12BAC b23B;ACB") == "malformed" and cups.style("") == "malformed"


def test_a_slipped_chain_is_wrong_and_consistent():
    rng = random.Random(0)
    for problem in cups.problems(200, seed=1):
        clean = cups.slipped_chain(problem, 0.0, rng)
        assert cups.reward(clean, problem) == 1.0
        slipped = cups.slipped_chain(problem, 1.0, rng)
        steps = slipped.split(";")[0].split(" ")
        assert [s[:3] for s in steps] == cups.steps_text(problem)  # the steps are restated right
        assert cups.style(slipped) == "chain" and slipped.endswith(";" + steps[-1][3:])
        # every step writes another arrangement than its swap makes of the arrangement written before it
        written = [cups.START] + [s[3:] for s in steps]
        assert all(a in cups.ARRANGEMENTS for a in written)
        assert all(cups.swap(before, pair) != after for before, pair, after in zip(written, problem, written[1:]))


def test_teacher_writes_the_answer_with_certainty():
    for problem in cups.problems(20, seed=2):
        completion, logprobs = cups.teacher(problem)
        assert completion == cups.direct_text(problem) and cups.reward(completion, problem) == 1.0
        assert logprobs == [0.0] * (len(completion) + 1)  # every character and the end


def test_problem_sets_are_disjoint_and_in_range():
    test = cups.problems(50, seed=1, swaps=(2, 8))
    train = cups.problems(500, seed=2, swaps=(2, 8), exclude=set(test), distinct=False)
    assert len(set(test)) == 50 and not set(test) & set(train)
    assert len(set(train)) < 500  # 2-swap problems are only 9, drawn with repeats
    assert all(2 <= len(p) <= 8 and all(pair in cups.PAIRS for pair in p) for p in test + train)


def test_a_step_is_one_token_and_text_round_trips():
    import model

    tokenizer = model.build_tokenizer(cups.ALPHABET, cups.MERGES)
    problem = ((1, 2), (2, 3), (1, 3))
    text = cups.prompt_text(problem) + "\n\n" + cups.chain_text(problem, cups.arrangements(problem))
    ids = tokenizer(text)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids[:5]] == ["a12", " ", "b23", " ", "c13"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer(";ACB")["input_ids"]) == 4  # the teacher's answers: one token per character


def test_pass_at_k_is_the_unbiased_estimator():
    # brute force: the share of k-subsets of n draws (c right) that hold at least one right draw
    n, k = 8, 3
    for c in range(n + 1):
        draws = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(draws, k))
        assert math.isclose(pass_at_k(n, c, k), sum(max(s) for s in subsets) / len(subsets))
    assert pass_at_k(16, 4, 1) == 4 / 16


def test_style_table_shares_and_accuracies():
    table = style_table(["a12BAC;BAC", ";ABC", ";ABC", "xx"], [1.0, 1.0, 0.0, 0.0])
    assert table["chain"] == {"share": 0.25, "accuracy": 1.0}
    assert table["direct"] == {"share": 0.5, "accuracy": 0.5}
    assert table["malformed"] == {"share": 0.25, "accuracy": 0.0}


def test_paired_p_matches_student_t_quantiles():
    # t = 2.776 with 4 degrees of freedom is the two-sided 5% point; 4.604 the 1% point
    sd = 0.1
    diffs = [0.05 + sd * z for z in (-1.2649, -0.6325, 0.0, 0.6325, 1.2649)]  # sample sd 0.1
    for t, p in ((2.776, 0.05), (4.604, 0.01)):
        shift = t * sd / math.sqrt(5) - 0.05
        assert math.isclose(report.paired_p([d + shift for d in diffs]), p, abs_tol=2e-4)
    assert report.paired_p([0.1]) is None


def test_holm_adjusts_step_down():
    adjusted = report.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    # sorted a, c, b: 3 x 0.01; max(that, 2 x 0.03); max(that, 1 x 0.04)
    assert adjusted["d"] is None
    assert all(math.isclose(adjusted[n], p) for n, p in (("a", 0.03), ("c", 0.06), ("b", 0.06)))


def _run(arms: dict[str, tuple], seeds=(0, 1, 2)) -> dict:
    """Synthetic job records: arm -> (pre pass@1, post pass@1, pre chain share, pre direct acc, post chain acc)."""
    runs = {}
    for name, (pre, post, chain_share, direct_acc, chain_acc) in arms.items():
        for s in seeds:
            jitter = 0.001 * s
            styles = {"chain": {"share": chain_share, "accuracy": chain_acc + jitter},
                      "direct": {"share": 1 - chain_share, "accuracy": direct_acc}, "malformed": {"share": 0.0,
                                                                                                   "accuracy": None}}
            runs[name, s] = {"pre_rl": {"pass@1": pre + jitter, "styles": styles},
                             "post_rl": {"pass@1": post + 2 * jitter, "styles": styles}}
    return runs


def test_gates_pass_and_fail_on_their_thresholds():
    seeds = (0, 1, 2)
    runs = _run({"base": (0.2, 0.6, 1.0, 0.0, 0.7), "weak": (0.1, 0.6, 0.3, 0.1, 0.7),
                 "strong": (0.3, 0.3, 0.005, 0.3, 0.0)})
    gates = report.gates(runs, seeds, "base", "weak", "strong")
    assert gates["G1"]["pass"] and gates["G2"]["pass"] and gates["G3"]["pass"] and gates["all_pass"]
    runs = _run({"base": (0.2, 0.4, 1.0, 0.0, 0.45), "weak": (0.1, 0.6, 0.3, 0.1, 0.7),
                 "strong": (0.3, 0.3, 0.02, 0.3, 0.0)})
    gates = report.gates(runs, seeds, "base", "weak", "strong")
    assert not gates["G1"]["pass"] and not gates["G2"]["pass"] and not gates["G3"]["pass"]


@pytest.mark.slow
def test_mechanism_smoke_preset_end_to_end_is_deterministic(tmp_path):
    results = run_preset("mechanism_smoke", tmp_path / "a")
    assert results["preset"] == "mechanism_smoke" and results["experiment"] == "mechanism"
    assert set(results["gates"]) == {"G1", "G2", "G3", "all_pass"}
    assert all({"what", "value", "pass"} <= set(results["gates"][g]) for g in ("G1", "G2", "G3"))
    assert results["claim_a"]["verdict"] in ("reproduced", "refuted", "neither reproduced nor refuted")
    k = results["k"]
    for arm in results["arms"].values():
        for seed in map(str, results["seeds"]):
            for stage in ("pre_rl", "post_rl"):
                metrics = arm["seeds"][seed][stage]
                assert 0.0 <= metrics["pass@1"] <= metrics[f"pass@{k}"] <= 1.0
                assert math.isclose(sum(s["share"] for s in metrics["styles"].values()), 1.0)
                assert metrics["teacher_nll"] > 0
    assert {n for n, a in results["arms"].items() if a["stage"] == "B"} == {
        "pear_token_online", "pear_token_static", "pear_block_static", "pear_sequence_static"}
    # the gates were written before the test phase, from the validation set only
    validation = json.loads((tmp_path / "a" / "validation.json").read_text())
    assert validation["eval_set"] == "validation" and validation["gates"] == results["gates"]
    assert (tmp_path / "a" / "results.png").stat().st_size > 0
    run_preset("mechanism_smoke", tmp_path / "b")
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
