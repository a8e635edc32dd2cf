"""Text tables of evaluation results (the output of ``ppl-vae evaluate`` and ``train``)."""

from __future__ import annotations

from typing import Any


def _row(label: str, stat: dict[str, float], width: int) -> str:
    return f"{label:<{width}} {stat['mean']:>11.3f} {stat['stderr']:>9.3f}"


def format_evaluation(result: dict[str, Any], title: str = "") -> str:
    """A fixed-width table of an :func:`ppl_vae.evaluate.evaluation_summary` result, in nats per datapoint."""
    k = result["log_evidence"]["num_samples"]
    rows: list[tuple[str, dict]] = [
        (f"ELBO ({result['elbo_samples']} draws/datapoint)", result["elbo"]),
        ("  reconstruction E_q[log p(x|z)]", result["reconstruction"]),
        ("  KL(q || p), total", result["kl"]["total"]),
    ]
    for name, stat in result["kl"]["sites"].items():
        rows.append((f"    KL at site '{name}' ({stat['method']})", stat))
    rows += [(f"log p̂(x), importance sampled (K={k})", result["log_evidence"]), ("gap log p̂(x) - ELBO", result["gap"])]
    width = max(len(label) for label, _ in rows)
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'quantity (nats per datapoint)':<{width}} {'mean':>11} {'± s.e.':>9}")
    lines.append("-" * (width + 22))
    lines += [_row(label, stat, width) for label, stat in rows]
    if "bits_per_dim" in result:
        bpd = result["bits_per_dim"]
        lines.append(_row("ELBO in bits/dim", bpd["elbo"], width))
        lines.append(_row(f"log p̂(x) in bits/dim (K={k})", bpd["log_evidence"], width))
    lines.append("-" * (width + 22))
    if "bits_per_dim" in result:
        lines.append(f"bits/dim: {result['bits_per_dim']['method']} (lower is better).")
    lines.append(
        f"N = {result['num_datapoints']} datapoints; s.e. = standard error of the mean over datapoints. "
        f"Per-datapoint Monte Carlo s.e. of log p̂(x): {result['log_evidence']['mean_mc_stderr']:.3f} on average; "
        f"mean effective sample size {result['log_evidence']['mean_ess']:.0f} of {k}."
    )
    return "\n".join(lines)
