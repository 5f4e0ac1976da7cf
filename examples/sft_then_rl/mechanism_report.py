"""Summaries of the second experiment: the gates and the clip choice (validation), results.json, the pre-registered
readings, the tables and the plot."""

from __future__ import annotations

import math
import statistics

from report import _round, finish_plot, paired_ci

STAGES = ("pre_rl", "post_rl")
STYLES = ("chain", "direct", "malformed")
# What the gates and the readings compare, fixed with the gates before any test-set run.
G1_MIN_GAIN = 0.25  # RL from the base gains at least this much pass@1
G2_MIN_GAP = 0.20  # chains after RL (from the base) beat direct answers after the strong SFT by at least this much
G3_MAX_CHAIN_SHARE = 0.01  # at the strong budget, before RL
REFUTE_MAX_ADVANTAGE = 0.03  # claim (a) refuted when the weak budget's post-RL advantage is at most this
FIX_TOLERANCE = 0.03  # PEAR lands within this of the best plain budget after RL
ALPHA = 0.05
TASK = ("cup-swap tracking: 3 cups, {lo}-{hi} swaps; the target's own style is a chain of arrangements, the teacher "
        "(an oracle) writes direct answers (cups.py)")


def fmt(evaluation: dict) -> str:
    chain = evaluation["styles"]["chain"]["share"]
    return f"pass@1 {evaluation['pass@1']:.3f} chain share {chain:.2f}"


def mean(runs: dict, arm: str, seeds, value) -> float | None:
    values = [value(runs[arm, s]) for s in seeds]
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def pass1(stage: str):
    return lambda record: record[stage]["pass@1"]


def style_value(stage: str, style: str, field: str):
    return lambda record: record[stage]["styles"][style][field]


def diff(runs: dict, a: str, b: str, seeds, value_a, value_b=None) -> dict | None:
    """Paired difference a - b over the seeds where both values exist, with its 95% t interval and two-sided p."""
    value_b = value_b or value_a
    pairs = [(value_a(runs[a, s]), value_b(runs[b, s])) for s in seeds]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    if not pairs:
        return None
    out = paired_ci([x for x, _ in pairs], [y for _, y in pairs])
    out["p"] = paired_p([x - y for x, y in pairs])
    out["seeds"] = len(pairs)
    return out


def paired_p(diffs: list[float]) -> float | None:
    """Two-sided p-value of the paired t test (mean difference 0), None for fewer than 2 seeds."""
    if len(diffs) < 2:
        return None
    sd = statistics.stdev(diffs)
    if sd == 0:
        return 0.0 if statistics.fmean(diffs) != 0 else 1.0
    t = abs(statistics.fmean(diffs)) / (sd / math.sqrt(len(diffs)))
    return 1.0 - 2.0 * _t_cdf_from_zero(t, len(diffs) - 1)


def _t_cdf_from_zero(t: float, df: int, steps: int = 4000) -> float:
    """P(0 < T < t) for Student's t with `df` degrees of freedom (Simpson's rule on the density)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    h = t / steps
    total = density(0.0) + density(t) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return total * h / 3


def holm(p_values: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-adjusted p-values (step-down, family-wise error) over the given tests."""
    order = sorted((p, name) for name, p in p_values.items() if p is not None)
    adjusted, running = {name: None for name in p_values}, 0.0
    for i, (p, name) in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * p))
        adjusted[name] = running
    return adjusted


def gates(runs: dict, seeds, base: str, weak: str, strong: str) -> dict:
    """G1-G3 on the validation set, with their values, thresholds and verdicts."""
    gain = diff(runs, base, base, seeds, pass1("post_rl"), pass1("pre_rl"))
    gap = diff(runs, base, strong, seeds, style_value("post_rl", "chain", "accuracy"),
               style_value("pre_rl", "direct", "accuracy"))
    chain_share = mean(runs, strong, seeds, style_value("pre_rl", "chain", "share"))
    strong_minus_weak = diff(runs, strong, weak, seeds, pass1("pre_rl"))
    out = {
        "G1": {"what": f"RL from the base ({base}) gains at least {G1_MIN_GAIN} pass@1", "value": gain,
               "pass": gain["mean"] >= G1_MIN_GAIN},
        "G2": {"what": f"chain accuracy after RL from the base minus direct accuracy after the strong SFT ({strong}, "
                       f"before RL) is at least {G2_MIN_GAP}, its 95% interval above zero", "value": gap,
               "pass": gap is not None and gap["mean"] >= G2_MIN_GAP
               and (gap["ci95"] is None or gap["ci95"][0] > 0)},
        "G3": {"what": f"at the strong budget ({strong}) the chain share before RL is under {G3_MAX_CHAIN_SHARE}, and "
                       f"pre-RL pass@1 is higher than at the weak budget ({weak})",
               "value": {"chain_share": chain_share, "pre_rl_pass@1_strong_minus_weak": strong_minus_weak},
               "pass": chain_share < G3_MAX_CHAIN_SHARE and strong_minus_weak["mean"] > 0},
    }
    out["all_pass"] = all(g["pass"] for g in out.values())
    return out


def choose_clip(runs: dict, seeds, scales, kinds, weak: str) -> dict:
    """The candidate clip with the highest mean post-RL pass@1 over the PEAR arms and seeds, among those whose mean
    pre-RL pass@1 is at least plain's at the weak budget (all candidates when none is); ties to the smaller scale."""
    floor = mean(runs, weak, seeds, pass1("pre_rl"))
    table = {}
    for scale in scales:
        names = [f"{kind}@clip{scale:g}x" for kind in kinds]
        table[f"{scale:g}"] = {stage: statistics.fmean(mean(runs, n, seeds, pass1(stage)) for n in names)
                               for stage in STAGES}
    eligible = [s for s in scales if table[f"{s:g}"]["pre_rl"] >= floor] or list(scales)
    chosen = max(eligible, key=lambda s: (table[f"{s:g}"]["post_rl"], -s))
    return {"candidates": table, "weak_pre_rl_pass@1": floor, "eligible": [f"{s:g}" for s in eligible],
            "chosen_scale": chosen,
            "selection": "highest mean post-RL pass@1 over the PEAR arms and the clip seeds (validation), among "
                         "the clips whose mean pre-RL pass@1 is at least plain's at the weak budget"}


def arm_entry(runs: dict, name: str, seeds, baseline: str, k: int) -> dict:
    """Per seed: pass@1, pass@k, styles, teacher NLL before and after RL; means; paired differences to baseline."""
    metrics = ("pass@1", f"pass@{k}")
    entry = {"seeds": {str(s): {stage: runs[name, s][stage] for stage in STAGES} for s in seeds}, "mean": {},
             "vs_" + baseline: {}}
    for stage in STAGES:
        entry["mean"][stage] = {m: mean(runs, name, seeds, lambda r, m=m, st=stage: r[st][m]) for m in metrics}
        entry["mean"][stage]["teacher_nll"] = mean(runs, name, seeds, lambda r, st=stage: r[st]["teacher_nll"])
        entry["mean"][stage]["styles"] = {
            style: {f: mean(runs, name, seeds, style_value(stage, style, f)) for f in ("share", "accuracy")}
            for style in STYLES}
        entry["vs_" + baseline][stage] = {
            m: diff(runs, name, baseline, seeds, lambda r, m=m, st=stage: r[st][m]) for m in metrics}
    entry["rl_reward_mean"] = [statistics.fmean(v) for v in zip(*(runs[name, s]["rl"]["reward"] for s in seeds))]
    entry["rl_frac_reward_zero_std"] = statistics.fmean(
        statistics.fmean(runs[name, s]["rl"]["frac_reward_zero_std"]) for s in seeds)
    return entry


def claim_a(runs: dict, seeds, weak: str, strong: str, gates_pass: bool) -> dict:
    """The pre-registered reading of "a stronger SFT ends worse after RL" (test set)."""
    pre = diff(runs, strong, weak, seeds, pass1("pre_rl"))
    post = diff(runs, weak, strong, seeds, pass1("post_rl"))
    reproduced = pre["ci95"] is not None and pre["ci95"][0] > 0 and post["ci95"] is not None and post["ci95"][0] > 0
    refuted = gates_pass and post["mean"] <= REFUTE_MAX_ADVANTAGE
    verdict = "reproduced" if reproduced else "refuted" if refuted else "neither reproduced nor refuted"
    return {"pre_rl_pass@1_strong_minus_weak": pre, "post_rl_pass@1_weak_minus_strong": post, "verdict": verdict}


def pear_fix(runs: dict, seeds, pear: list[str], plains: list[str], weak: str, strong: str) -> dict:
    """The pre-registered reading of "PEAR fixes it", per PEAR arm, Holm-corrected over the PEAR arms."""
    best = max(plains, key=lambda n: mean(runs, n, seeds, pass1("post_rl")))
    best_post = mean(runs, best, seeds, pass1("post_rl"))
    weak_pre = mean(runs, weak, seeds, pass1("pre_rl"))
    beats = {name: diff(runs, name, strong, seeds, pass1("post_rl")) for name in pear}
    adjusted = holm({name: d["p"] for name, d in beats.items()})
    out = {"best_plain": best, "best_plain_post_rl_pass@1": best_post, "weak_pre_rl_pass@1": weak_pre, "arms": {}}
    for name in pear:
        post, pre = mean(runs, name, seeds, pass1("post_rl")), mean(runs, name, seeds, pass1("pre_rl"))
        beat = {**beats[name], "p_holm": adjusted[name]}
        beat["pass"] = beat["mean"] > 0 and adjusted[name] is not None and adjusted[name] < ALPHA
        near = post >= best_post - FIX_TOLERANCE
        keeps = pre >= weak_pre
        out["arms"][name] = {"beats_plain_at_strong_budget": beat, "within_tolerance_of_best_plain": near,
                             "pre_rl_at_least_weak_plain": keeps, "fixes": beat["pass"] and near and keeps}
    return out


def results(preset: dict, validation: dict, runs: dict, epochs: dict[str, float], plains: list[str],
            pear: dict[str, dict], weights_config: dict) -> dict:
    """results.json: every arm on the test set, the validation gates and clip choice, the pre-registered readings.
    `pear` maps each PEAR arm to its weight diagnostics."""
    seeds, k, weak, strong = preset["seeds"], preset["k"], validation["weak"], validation["strong"]
    arms = {}
    for name in plains + list(pear):
        arms[name] = {"stage": "A" if name in plains else "B", "epochs": epochs[name], "weights": pear.get(name),
                      **arm_entry(runs, name, seeds, strong, k)}
    online_vs_static = {stage: diff(runs, "pear_token_online", "pear_token_static", seeds, pass1(stage))
                        for stage in STAGES} if {"pear_token_online", "pear_token_static"} <= set(pear) else None
    return _round({
        "experiment": "mechanism", "task": TASK.format(lo=preset["swaps"][0], hi=preset["swaps"][1]),
        "eval_set": "test", "sampling_temperature": 1.0, **preset, "weak": weak, "strong": strong,
        "gates": validation["gates"], "clip": validation["clip"], "weights_config": weights_config,
        "claim_a": claim_a(runs, seeds, weak, strong, validation["gates"]["all_pass"]),
        "pear_fix": pear_fix(runs, seeds, list(pear), plains, weak, strong),
        "online_minus_static_token": online_vs_static, "arms": arms,
    })


def print_gates(validation: dict) -> None:
    print(f"\ngates (validation, seeds {validation['seeds']}):")
    for name in ("G1", "G2", "G3"):
        gate = validation["gates"][name]
        print(f"  {name} {'pass' if gate['pass'] else 'FAIL'}: {gate['what']}: {_value(gate['value'])}")
    clip = validation["clip"]
    print(f"clip: x{clip['chosen_scale']:g} {clip['log_ratio_clip']} (candidates, mean pass@1 pre / post RL: " +
          ", ".join(f"x{s} {c['pre_rl']:.3f} / {c['post_rl']:.3f}" for s, c in clip["candidates"].items()) + ")")


def _value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict) and "mean" in value:
        return _ci(value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_value(v)}" for k, v in value.items())
    return f"{value:.3f}"


def _ci(d: dict | None) -> str:
    if d is None:
        return "n/a"
    if d.get("ci95") is None:
        return f"{d['mean']:+.3f}"
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def _share(styles: dict, style: str) -> str:
    return f"{styles[style]['share']:.2f}"


def _acc(styles: dict, style: str) -> str:
    accuracy = styles[style]["accuracy"]
    return "-" if accuracy is None else f"{accuracy:.2f}"


def markdown(summary: dict) -> str:
    """The main table and the style table as Markdown (what docs/results.md shows)."""
    k, strong = summary["k"], summary["strong"]
    lines = [f"| arm | SFT epochs | pre-RL pass@1 | pre-RL pass@{k} | post-RL pass@1 | post-RL pass@{k} "
             f"| post pass@1 - {strong} (95% CI) | teacher NLL pre-RL | zero-std groups in RL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in summary["arms"].items():
        pre, post = entry["mean"]["pre_rl"], entry["mean"]["post_rl"]
        d = "" if name == strong else _ci(entry[f"vs_{strong}"]["post_rl"]["pass@1"])
        lines.append(f"| {name} | {entry['epochs']:g} | {pre['pass@1']:.3f} | {pre[f'pass@{k}']:.3f} | "
                     f"{post['pass@1']:.3f} | {post[f'pass@{k}']:.3f} | {d} | {pre['teacher_nll']:.2f} | "
                     f"{entry['rl_frac_reward_zero_std']:.2f} |")
    lines += ["", "| arm | chain share pre -> post | chain accuracy pre -> post | direct share pre -> post "
              "| direct accuracy pre -> post | malformed share pre -> post |", "|---|---|---|---|---|---|"]
    for name, entry in summary["arms"].items():
        pre, post = entry["mean"]["pre_rl"]["styles"], entry["mean"]["post_rl"]["styles"]
        lines.append(f"| {name} | {_share(pre, 'chain')} -> {_share(post, 'chain')} | {_acc(pre, 'chain')} -> "
                     f"{_acc(post, 'chain')} | {_share(pre, 'direct')} -> {_share(post, 'direct')} | "
                     f"{_acc(pre, 'direct')} -> {_acc(post, 'direct')} | {_share(pre, 'malformed')} -> "
                     f"{_share(post, 'malformed')} |")
    return "\n".join(lines) + "\n"


def print_table(summary: dict) -> None:
    print("\n" + markdown(summary))
    a = summary["claim_a"]
    print(f"claim (a): {a['verdict']}: pre-RL pass@1 strong - weak {_ci(a['pre_rl_pass@1_strong_minus_weak'])}, "
          f"post-RL pass@1 weak - strong {_ci(a['post_rl_pass@1_weak_minus_strong'])}")
    for name, fix in summary["pear_fix"]["arms"].items():
        beat = fix["beats_plain_at_strong_budget"]
        print(f"{name}: fixes {fix['fixes']} (post-RL vs {summary['strong']} {_ci(beat)}, Holm p "
              f"{beat['p_holm']:.3f}; within {FIX_TOLERANCE} of the best plain "
              f"{fix['within_tolerance_of_best_plain']}; pre-RL at least weak plain's "
              f"{fix['pre_rl_at_least_weak_plain']})")


def plot(summary: dict, path) -> None:
    """Left: pass@1 before and after RL against the SFT budget (PEAR arms at the strong budget); middle: the style
    shares before and after RL; right: the GRPO reward curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    plains = [n for n, e in arms.items() if e["stage"] == "A"]
    xs = list(range(len(plains)))
    for stage, style in (("pre_rl", "o--"), ("post_rl", "o-")):
        axes[0].plot(xs, [arms[n]["mean"][stage]["pass@1"] for n in plains], style, color="grey",
                     label=f"plain, {stage.replace('_', '-')}")
    for i, name in enumerate(n for n in arms if arms[n]["stage"] == "B"):
        for stage, marker in (("pre_rl", "v"), ("post_rl", "^")):
            axes[0].plot(xs[-1] + 0.12 * (i + 1), arms[name]["mean"][stage]["pass@1"], marker, color=f"C{i}",
                         label=f"{name} {stage.replace('_', '-')}")
    axes[0].set_xticks(xs, [f"{arms[n]['epochs']:g}" for n in plains])
    axes[0].set_xlabel("SFT epochs on the teacher's direct answers")
    axes[0].set_title("pass@1 before (dashed, v) and after (solid, ^) RL", fontsize=9)
    axes[0].legend(fontsize=6)
    names = list(arms)
    for j, (stage, hatch) in enumerate((("pre_rl", "//"), ("post_rl", ""))):
        bottom = [0.0] * len(names)
        for style, color in zip(STYLES, ("tab:blue", "tab:orange", "tab:grey")):
            shares = [arms[n]["mean"][stage]["styles"][style]["share"] for n in names]
            axes[1].bar([i + 0.4 * j for i in range(len(names))], shares, 0.38, bottom=bottom, color=color,
                        hatch=hatch, label=style if j else None)
            bottom = [b + s for b, s in zip(bottom, shares)]
    axes[1].set_xticks([i + 0.2 for i in range(len(names))], [n.replace("_", "\n") for n in names], fontsize=6)
    axes[1].set_title("style shares, before (hatched) and after RL", fontsize=9)
    axes[1].legend(fontsize=7)
    finish_plot(fig, axes[2], {name: arms[name]["rl_reward_mean"] for name in names}, path)
