"""behavior.py: recorded behavior log-probs that are not numbers are rejects; the behavior is the target
only with the same weights, tokenizer, special tokens, chat template and template mode (docs/design.md 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .cli_harness import cli
from .outputs import (
    FIELDS,
    data,
    gsm8k,
    manifest,
    rejects,
    score,
    write_jsonl,
)


@pytest.mark.parametrize(("value", "reason"), [
    ([-0.5, 10**400], r"\[1\] .*out of range"),
    ([[-0.5], [-0.25]], "flat list of numbers"),
    (["-0.5", -0.25], r"\[0\] is a str"),
    ([True, -0.25], r"\[0\] is a bool"),
    ([-0.5, None], r"\[1\] is null"),
    ("-0.5", "flat list of numbers"),
])
def test_recorded_logprobs_that_are_not_a_flat_list_of_numbers_are_rejected(value, reason):
    from pear_data.behavior import recorded_logprobs
    from pear_data.errors import RowError

    target = _tokenized_row()
    with pytest.raises(RowError, match=reason):
        recorded_logprobs({"lp": value}, "lp", target, ["4"])


@pytest.mark.parametrize(("turn", "reason"), [
    ({"tokens": ["4"], "logprobs": [10**400]}, r"'lp'\['logprobs'\]\[0\] .*out of range"),
    ({"tokens": ["4"], "logprobs": [[-0.5]]}, r"'lp'\['logprobs'\] must be a flat list of numbers"),
    ({"text_offsets": [0, 2**70], "logprobs": [-0.5, -0.1]}, r"'lp'\['text_offsets'\]\[1\] .*out of range"),
    ({"text_offsets": [0, 1.5], "logprobs": [-0.5, -0.1]}, r"'lp'\['text_offsets'\]\[1\] is 1.5"),
    ({"text_offsets": [[0], [1]], "logprobs": [-0.5, -0.1]}, r"'lp'\['text_offsets'\] must be a flat list"),
    ({"text_offsets": ["0"], "logprobs": [-0.5]}, r"'lp'\['text_offsets'\]\[0\] is a str"),
])
def test_recorded_turn_tokens_with_bad_numbers_are_rejected(turn, reason):
    from pear_data.align import recorded_turn_tokens
    from pear_data.errors import RowError

    with pytest.raises(RowError, match=reason):
        recorded_turn_tokens(turn, "4", "lp")


def _tokenized_row():
    from pear_data.tokenize import ConversationTokenizer

    from .tiny_model import build_tokenizer

    return ConversationTokenizer(build_tokenizer("chatml"))([{"role": "user", "content": "2+2?"},
                                                             {"role": "assistant", "content": "4"}])


def test_recorded_logprobs_with_huge_integers_are_rejects_not_a_crash(capsys, tmp_path, tiny_model_dir):
    rows = gsm8k(3)
    rows[0]["lp"] = {"text_offsets": [0, 2**70], "logprobs": [-0.5, -0.5]}
    rows[1]["lp"] = [-0.5, 10**400]
    rows[2]["lp"] = {"tokens": [rows[2]["answer"]], "logprobs": [[-0.5]]}
    corpus = write_jsonl(tmp_path / "recorded.jsonl", rows)
    run = cli(capsys, "score", corpus, "--out", tmp_path / "out", "--target", tiny_model_dir,
                     "--behavior-logprobs-field", "lp", "--device", "cpu", *FIELDS)
    code, text = run.code, run.text
    assert code == 0, text
    reasons = [r["reject_reason"] for r in rejects(tmp_path / "out")]
    assert len(reasons) == 3
    assert "text_offsets" in reasons[0] and "out of range" in reasons[0]
    assert "out of range" in reasons[1]
    assert "flat list of numbers" in reasons[2]


def same_weights(model: Path, dest: Path, *, template: str | None = None, eos: str | None = None) -> Path:
    """A copy of `model` with the same weights (and config), and another chat template ("": none) or eos token."""
    import shutil

    from .tiny_model import build_tokenizer

    shutil.copytree(model, dest)
    tokenizer = build_tokenizer("chatml")
    if template is not None:
        tokenizer.chat_template = template or None
    if eos is not None:
        tokenizer.eos_token = eos
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (dest / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(dest)
    return dest


OTHER_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + ':\\n' + message['content'] "
                  "+ '<|im_end|>' + '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant:\\n' }}{% endif %}")


@pytest.mark.parametrize(("change", "differs"), [
    ({"template": OTHER_TEMPLATE}, "chat template"),
    ({"template": ""}, "chat template, template mode (raw, the target's chat)"),
    ({"eos": "<|endoftext|>"}, "special tokens"),  # the same tokens in chat mode here, not in raw mode
])
def test_a_behavior_with_the_target_weights_and_other_tokenizer_settings_is_another_model(
        capsys, tmp_path, tiny_model_dir, change, differs):
    """The same weights under another template see other contexts: other log-probs, which the target's own
    forward pass (under the target's template) would silently replace."""
    from pear_data.models import resolve_model

    behavior = same_weights(tiny_model_dir, tmp_path / "behavior", **change)
    assert resolve_model(str(behavior)).fingerprint == resolve_model(str(tiny_model_dir)).fingerprint
    corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(3))
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS, behavior=behavior)
    assert code == 0, text
    written = manifest(tmp_path / "out")
    assert written["alignment"]["mode"] == "char-offsets"  # scored on its own tokens and template
    assert written["behavior"]["mode_reason"] == f"same weights as the target; differs from the target in: {differs}"
    table = data(tmp_path / "out")
    if "template" in change:
        assert table.column("target_logprobs").to_pylist() != table.column("behavior_logprobs").to_pylist()


def test_a_copy_of_the_target_is_the_target(capsys, tmp_path, tiny_model_dir):
    behavior = same_weights(tiny_model_dir, tmp_path / "behavior")
    corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(3))
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS, behavior=behavior)
    assert code == 0, text
    written = manifest(tmp_path / "out")
    assert written["alignment"] == {"mode": "direct"}
    assert written["behavior"]["mode_reason"] == "same weights and tokenizer as the target"
    table = data(tmp_path / "out")  # one forward pass, the same distribution at temperature 1
    assert table.column("target_logprobs").to_pylist() == table.column("behavior_logprobs").to_pylist()


def test_the_target_under_another_behavior_template_is_scored_on_its_own_rendering(capsys, tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(3))
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS, "--behavior-template", "raw")
    assert code == 0, text
    written = manifest(tmp_path / "out")
    assert written["alignment"]["mode"] == "char-offsets"
    assert written["behavior"]["mode_reason"] == ("same weights as the target; differs from the target in: "
                                                  "template mode (raw, the target's chat)")
