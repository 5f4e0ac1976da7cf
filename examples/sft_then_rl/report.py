"""Summaries of the experiment: results.json (the schema other tools read), the grid, the plot, the tables."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

METRICS = ("pass@1", "pass@8")
# Two-sided 95% Student t quantiles by degrees of freedom (the paired difference over n seeds has n - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def fmt(metrics: dict) -> str:
    return " ".join(f"{name} {metrics[name]:.3f}" for name in METRICS)


def paired_ci(values: list[float], baseline: list[float]) -> dict | None:
    """Mean of the per-seed differences values - baseline, with a 95% t interval (None for fewer than 2 seeds)."""
    diffs = [a - b for a, b in zip(values, baseline)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci95": None}
    half = _T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "ci95": [mean - half, mean + half]}


def _weights(diagnostics: dict, granularity: str) -> dict:
    d = diagnostics.get(granularity, {})
    return {"ess_fraction": d.get("ess_fraction"), "share_at_upper_bound": d.get("share_at_upper_bound"),
            "share_at_lower_bound": d.get("share_at_lower_bound"), "mean_log_ratio": diagnostics.get("mean_log_ratio"),
            "mean": d.get("mean")}


def _online(logged: dict | None) -> dict | None:
    if not logged:
        return None
    return {"ess_fraction": logged.get("weight_ess"), "mean": logged.get("weight_mean"),
            "share_at_upper_bound": logged.get("at_upper_bound"), "share_at_lower_bound": logged.get("at_lower_bound"),
            "mean_log_ratio": logged.get("log_ratio_mean"), "logged_over": "SFT steps (mean of the logged batches)"}


def _round(value):
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def _arm_table(names: list[str], seeds: tuple[int, ...], results: dict, baseline: str) -> dict:
    """Per arm: per-seed metrics, means over seeds, and paired differences to the baseline arm."""
    arms = {}
    for name in names:
        per_seed = {str(s): {"pre_rl": results[name, s]["pre_rl"], "post_rl": results[name, s]["post_rl"]}
                    for s in seeds}
        entry = {"seeds": per_seed, "mean": {}, "vs_" + baseline: {}}
        for stage in ("pre_rl", "post_rl"):
            entry["mean"][stage] = {m: statistics.fmean(results[name, s][stage][m] for s in seeds) for m in METRICS}
            entry["vs_" + baseline][stage] = {
                m: paired_ci([results[name, s][stage][m] for s in seeds],
                             [results[baseline, s][stage][m] for s in seeds]) for m in METRICS}
        entry["rl_reward_mean"] = [statistics.fmean(v) for v in zip(*(results[name, s]["rl_reward"] for s in seeds))]
        arms[name] = entry
    return arms


def results(preset_name: str, task: str, preset, results_: dict, out: Path, reference: dict) -> dict:
    from train import ARMS

    manifest = json.loads((out / "scored" / "manifest.json").read_text())
    arms = _arm_table(list(preset.arms), preset.seeds, results_, "plain")
    for name, entry in arms.items():
        spec = ARMS[name]
        if spec.get("reweight"):
            other = json.loads((out / "reweighted" / name / "manifest.json").read_text())
            entry["weights"] = _weights(other["diagnostics"], spec["granularity"])
            entry["weights_config"] = other["weights"]
        elif spec["mode"] == "static":
            entry["weights"] = _weights(manifest["diagnostics"], spec["granularity"])
        elif spec["mode"] == "online":
            entry["weights"] = _online(results_[name, preset.seeds[0]]["online_weights"])
        else:
            entry["weights"] = None
    online_vs_static = {
        stage: {m: paired_ci([results_["pear_token_online", s][stage][m] for s in preset.seeds],
                             [results_["pear_token_static", s][stage][m] for s in preset.seeds]) for m in METRICS}
        for stage in ("pre_rl", "post_rl")} if {"pear_token_online", "pear_token_static"} <= set(arms) else None
    return _round({
        "preset": preset_name, "task": task, "online_minus_static_token": online_vs_static,
        "seeds": list(preset.seeds), "eval_set": "test",
        "test_problems": preset.test_problems, "k": preset.k, "sampling_temperature": 1.0,
        "weights_config": manifest["weights"], "before_sft": reference, "arms": arms,
    })


def grid_results(preset_name: str, preset, results_: dict, out: Path, reference: dict) -> dict:
    names = sorted({name for name, _ in results_})
    table = _arm_table(names, preset.grid_seeds, results_, "plain")
    for name, entry in table.items():
        if "/" in name:
            config, granularity = name.split("/")
            manifest = json.loads((out / "grid" / config / "manifest.json").read_text())
            entry["weights"] = _weights(manifest["diagnostics"], granularity)
            entry["flags"] = manifest["weights"]
    best = max((n for n in names if "/" in n),
               key=lambda n: (table[n]["mean"]["post_rl"]["pass@8"], table[n]["mean"]["post_rl"]["pass@1"], n))
    return _round({"preset": preset_name, "seeds": list(preset.grid_seeds), "eval_set": "validation",
                   "val_problems": preset.val_problems, "before_sft": reference,
                   "selection": "highest mean post-RL pass@8, then pass@1",
                   "best": best, "configs": table})


def print_table(summary: dict) -> None:
    print(f"\n{'arm':<34} {'pre pass@1':>10} {'pre pass@8':>10} {'post pass@1':>11} {'post pass@8':>11}   "
          f"post pass@8 vs plain (95% CI)   ESS")
    for name, entry in summary["arms"].items():
        pre, post = entry["mean"]["pre_rl"], entry["mean"]["post_rl"]
        diff = entry["vs_plain"]["post_rl"]["pass@8"]
        ci = "" if diff["ci95"] is None else f"[{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]"
        ess = (entry.get("weights") or {}).get("ess_fraction")
        print(f"{name:<34} {pre['pass@1']:>10.3f} {pre['pass@8']:>10.3f} {post['pass@1']:>11.3f} "
              f"{post['pass@8']:>11.3f}   {diff['mean']:+.3f} {ci:<20}  {'' if ess is None else f'{ess:.3f}'}")


def print_grid(summary: dict) -> None:
    print(f"\n{'config':<36} {'post pass@1':>11} {'post pass@8':>11}   ESS    upper  lower")
    for name, entry in summary["configs"].items():
        post, w = entry["mean"]["post_rl"], entry.get("weights") or {}
        extra = "" if not w else (f"{w['ess_fraction']:.3f}  {w.get('share_at_upper_bound') or 0:.3f}  "
                                  f"{w.get('share_at_lower_bound') or 0:.3f}")
        print(f"{name:<36} {post['pass@1']:>11.3f} {post['pass@8']:>11.3f}   {extra}")
    print(f"best on validation: {summary['best']}")


def plot(summary: dict, results_: dict, path: Path) -> None:
    """Post-RL pass@1 / pass@8 per arm (mean over seeds, 95% paired interval vs plain around plain's mean + diff),
    and the RL reward curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary["arms"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric in zip(axes[:2], METRICS):
        means = [summary["arms"][a]["mean"]["post_rl"][metric] for a in arms]
        plain = summary["arms"]["plain"]["mean"]["post_rl"][metric]
        errors = [[0.0, 0.0]]
        for a in arms[1:]:
            ci = summary["arms"][a]["vs_plain"]["post_rl"][metric]["ci95"]
            d = summary["arms"][a]["vs_plain"]["post_rl"][metric]["mean"]
            errors.append([0.0, 0.0] if ci is None else [d - ci[0], ci[1] - d])
        ax.bar(range(len(arms)), means, yerr=list(zip(*errors)), capsize=3,
               color=["grey" if a.startswith("plain") else "tab:green" for a in arms])
        ax.axhline(plain, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(arms)), [a.replace("pear_", "").replace("_", "\n") for a in arms], fontsize=7)
        ax.set_title(f"post-RL {metric} (bars: 95% CI of the paired diff. to plain)", fontsize=9)
        ax.set_ylim(0, 1)
    finish_plot(fig, axes[2], {a: summary["arms"][a]["rl_reward_mean"] for a in arms}, path)


def finish_plot(fig, ax, rewards: dict[str, list[float]], path: Path) -> None:
    """Both experiments' last panel, each arm's GRPO reward curve, then the figure saved to `path` and closed."""
    import matplotlib.pyplot as plt

    for name, curve in rewards.items():
        ax.plot(curve, label=name, lw=1)
    ax.set_title("GRPO mean reward per step (mean over seeds)", fontsize=9)
    ax.set_xlabel("RL step")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ci(diff: dict) -> str:
    if diff["ci95"] is None:
        return f"{diff['mean']:+.3f}"
    return f"{diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]"


def markdown(summary: dict) -> str:
    """The results table as Markdown (what docs/results.md shows)."""
    lines = ["| arm | pre-RL pass@1 | pre-RL pass@8 | post-RL pass@1 | post-RL pass@8 | post pass@1 - plain (95% CI) "
             "| post pass@8 - plain (95% CI) | ESS | at upper / lower bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in summary["arms"].items():
        pre, post, vs = entry["mean"]["pre_rl"], entry["mean"]["post_rl"], entry["vs_plain"]["post_rl"]
        w = entry.get("weights") or {}
        ess = "" if w.get("ess_fraction") is None else f"{w['ess_fraction']:.3f}"
        bounds = "" if w.get("share_at_upper_bound") is None else (
            f"{w['share_at_upper_bound']:.3f} / {w['share_at_lower_bound']:.3f}")
        d1, d8 = ("", "") if name == "plain" else (_ci(vs["pass@1"]), _ci(vs["pass@8"]))
        lines.append(f"| {name} | {pre['pass@1']:.3f} | {pre['pass@8']:.3f} | {post['pass@1']:.3f} | "
                     f"{post['pass@8']:.3f} | {d1} | {d8} | {ess} | {bounds} |")
    return "\n".join(lines) + "\n"


def grid_markdown(summary: dict) -> str:
    lines = ["| configuration | post-RL pass@1 | post-RL pass@8 | pre-RL pass@1 | pre-RL pass@8 | ESS "
             "| at upper / lower bound |", "|---|---|---|---|---|---|---|"]
    for name, entry in summary["configs"].items():
        pre, post, w = entry["mean"]["pre_rl"], entry["mean"]["post_rl"], entry.get("weights") or {}
        ess = "" if not w else f"{w['ess_fraction']:.3f}"
        bounds = "" if not w else f"{w['share_at_upper_bound']:.3f} / {w['share_at_lower_bound']:.3f}"
        lines.append(f"| {name} | {post['pass@1']:.3f} | {post['pass@8']:.3f} | {pre['pass@1']:.3f} | "
                     f"{pre['pass@8']:.3f} | {ess} | {bounds} |")
    return "\n".join(lines) + "\n"
