"""A `dpo_jax.experiments.frontier` result as tables (text) and the reward-vs-KL plot."""

from dpo_jax.experiments import temperature_sweep


def format_table(result) -> str:
    """The policies and the matched-KL comparisons as fixed-width tables."""
    lines = [f"{'method':<15}{'setting':<10}{'reward':>9}{'± se':>8}{'KL nats':>10}{'± se':>8}"]
    lines.append("-" * len(lines[0]))
    for row in result.rows:
        bound = f"   (bound {row['kl_bound']:.3f})" if "kl_bound" in row else ""
        lines.append(
            f"{row['method']:<15}{row['setting']:<10}{row['reward']:>9.3f}"
            f"{row['reward_stderr']:>8.3f}{row['kl']:>10.3f}{row['kl_stderr']:>8.3f}{bound}"
        )
    lines += ["", f"{'DPO minus':<38}{'at KL':>8}{'difference':>12}{'± se':>8}"]
    for item in result.comparisons:
        lines.append(
            f"{item['policy'] + ' − ' + item['against']:<38}{item['kl']:>8.3f}"
            f"{item['difference']:>12.3f}{item['stderr']:>8.3f}"
        )
    if result.reward_model:
        model, ceiling = result.reward_model, result.reward_model["ceiling"]
        lines += [
            "",
            f"reward model: held-out pair accuracy {model['accuracy']:.3f} on "
            f"{model['num_pairs']} pairs; the true reward on the same pairs "
            f"{ceiling['accuracy']:.3f} (Bradley-Terry expectation {ceiling['expected']:.3f})",
        ]
    if result.sweep:
        lines += ["", temperature_sweep.format_sweep(result.sweep)]
    return "\n".join(lines)


def plot(result, png_path: str) -> None:
    """Reward vs KL, all of it and up to best-of-N's largest KL: 1-s.e. bars, the optimal curve."""
    import matplotlib

    matplotlib.use("Agg")  # no display: scripts and CI
    import matplotlib.pyplot as plt

    figure, (whole, close) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100)
    for axes in (whole, close):
        _draw(axes, result)
        axes.set(xlabel="KL(π ‖ π_ref)  [nats per sequence]", ylabel="mean true reward")
    best = [row for row in result.rows if row["method"] == "best-of-N"]
    kl_max = 1.1 * max(row["kl_bound"] for row in best) + 0.05
    shown = [row["reward"] for row in result.rows + result.optimal if row["kl"] <= kl_max]
    close.set(xlim=(-0.05, kl_max), ylim=(min(shown) - 0.02, max(shown) + 0.02))
    whole.set_title("Reward vs KL on the synthetic task")
    close.set_title("Up to best-of-N's largest KL")
    whole.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)


def _draw(axes, result) -> None:
    """Each method's points and the KL-optimal curve on one matplotlib Axes."""
    axes.plot(
        [row["kl"] for row in result.optimal],
        [row["reward"] for row in result.optimal],
        ":",
        color="grey",
        label="KL-optimal π_ref·exp(r/τ)/Z (estimate)",
    )
    best = [row for row in result.rows if row["method"] == "best-of-N"]
    axes.plot(
        [row["kl_bound"] for row in best],
        [row["reward"] for row in best],
        "^:",
        color="tab:green",
        alpha=0.35,
        label="best-of-N at its KL bound",
    )
    styles = {
        "DPO": "o-",
        "Preferred-FT": "s",
        "Unlikelihood": "D",
        "PPO": "v-",
        "PPO-GT": "P",
        "best-of-N": "^--",
        "SFT reference": "k*",
    }
    for method, style in styles.items():
        points = [row for row in result.rows if row["method"] == method]
        axes.errorbar(
            [row["kl"] for row in points],
            [row["reward"] for row in points],
            xerr=[row["kl_stderr"] for row in points],
            yerr=[row["reward_stderr"] for row in points],
            fmt=style,
            color={"best-of-N": "tab:green"}.get(method),
            label=method,
            markersize=5,
            capsize=2,
        )
        for row in points:
            axes.annotate(
                row["setting"].replace("beta=", "β=").replace("alpha=", "α="),
                (row["kl"], row["reward"]),
                fontsize=7,
                xytext=(4, -9),
                textcoords="offset points",
                annotation_clip=True,
            )
