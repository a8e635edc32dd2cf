"""Text tables of evaluation results (the output of ``ppl-vae evaluate`` and ``train``)."""

from __future__ import annotations

from typing import Any

from .diagnostics import site_diagnostics


def _row(label: str, stat: dict[str, float], width: int) -> str:
    return f"{label:<{width}} {stat['mean']:>11.3f} {stat['stderr']:>9.3f}"


def estimate_label(quantity: str) -> str:
    """``log p(x | y)`` as an estimate: ``log p̂(x | y)``."""
    return quantity.replace("log p(", "log p̂(", 1)


def reconstruction_label(quantity: str) -> str:
    """The reconstruction term of the evidence ``quantity``: ``E_q[log p(x|z)]``, ``E_q[log p(x, y|z)]``, ``E_q[log p(x|z, y)]``."""
    variables, _, inputs = quantity[len("log p("):-1].partition(" | ")
    return f"E_q[log p({variables}|{', '.join(['z', *filter(None, [inputs])])})]"


def format_evaluation(result: dict[str, Any], title: str = "") -> str:
    """A fixed-width table of an :func:`ppl_vae.summary.evaluation_summary` result, in nats per datapoint."""
    k = result["log_evidence"]["num_samples"]
    method, draws = estimator_label(result), estimator_draws(result)
    quantity = result.get("quantity", "log p(x)")
    estimate = estimate_label(quantity)
    rows: list[tuple[str, dict]] = [
        (f"ELBO ({result['elbo_samples']} draws/datapoint)", result["elbo"]),
        (f"  reconstruction {reconstruction_label(quantity)}", result["reconstruction"]),
    ]
    by_site = result.get("reconstruction_by_site", {})
    if len(by_site) > 1:  # one line per observed site: which part of the evidence each holds
        observes = result.get("observed_sites", {})
        rows += [(f"    at site '{name}' (observes {observes.get(name, '?')})", stat) for name, stat in by_site.items()]
    rows.append(("  KL(q || p), total", result["kl"]["total"]))
    for name, stat in result["kl"]["sites"].items():
        rows.append((f"    KL at site '{name}' ({stat['method']})", stat))
    rows += [(f"{estimate}, {method}", result["log_evidence"]), (f"gap {estimate} - ELBO", result["gap"])]
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
        short = "AIS" if (result.get("estimator") or {}).get("name") == "ais" else f"K={k}"
        lines.append(_row(f"{estimate} in bits/dim ({short})", bpd["log_evidence"], width))
    lines.append("-" * (width + 22))
    if "bits_per_dim" in result:
        lines.append(f"bits/dim: {result['bits_per_dim']['method']} (lower is better).")
    mc_stderr = result["log_evidence"]["mean_mc_stderr"]
    mc_text = (f"{mc_stderr:.3f} on average" if mc_stderr is not None
               else "undefined with K=1 (one weight per datapoint has no spread)")
    lines.append(
        f"N = {result['num_datapoints']} datapoints; s.e. = standard error of the mean over datapoints. "
        f"Per-datapoint Monte Carlo s.e. of {estimate}: {mc_text}; "
        f"mean effective {draws} {result['log_evidence']['mean_ess']:.0f} of {k}{_acceptance(result)}."
    )
    lines.append(quantity_note(quantity, result.get("observed_sites", {})))
    if "classification_error" in result:  # a program with a discrete label site: its classifier q(y | x)
        lines.append(f"Classifier error from q({result['label_site']} | x): {100 * result['classification_error']:.2f}% "
                     f"± {100 * result['classification_error_stderr']:.2f}% (most probable class, "
                     f"{result['num_datapoints']} labelled images).")
    reasons = [(name, stat["reason"]) for name, stat in result["kl"]["sites"].items() if stat.get("reason")]
    for name, reason in reasons:
        lines.append(f"KL at site '{name}' is Monte Carlo: {reason}.")
    return "\n".join(lines)


def estimator_label(result: dict[str, Any]) -> str:
    """How a summary's log p̂ was estimated: ``importance sampled (K=5000)`` or ``AIS (T=200, L=5, C=8, sigmoid)``.

    A summary without an ``estimator`` record (every file before AIS) is importance sampled."""
    estimator = result.get("estimator") or {"name": "is"}
    if estimator.get("name") == "ais":
        return (f"AIS (T={estimator.get('steps')}, L={estimator.get('leapfrog_steps')}, C={estimator.get('chains')}, "
                f"{estimator.get('schedule')})")
    return f"importance sampled (K={result['log_evidence']['num_samples']})"


def estimator_draws(result: dict[str, Any]) -> str:
    """What the effective sample size of a summary's log p̂ counts: importance samples, or AIS chains."""
    return "number of chains" if (result.get("estimator") or {}).get("name") == "ais" else "sample size"


def _acceptance(result: dict[str, Any]) -> str:
    accept = result["log_evidence"].get("mean_acceptance")
    return f"; mean HMC acceptance {accept:.2f}" if isinstance(accept, (int, float)) else ""


def quantity_note(quantity: str, observed_sites: dict[str, str]) -> str:
    """One line saying what the evidence is of and why: which site observes which data argument."""
    sites = ", ".join(f"site '{name}' observes {argument}" for name, argument in observed_sites.items())
    inputs = quantity.partition(" | ")[2].rstrip(")")
    given = f"; {inputs} {'are only inputs' if ',' in inputs else 'is only an input'}" if inputs else ""
    return f"The evidence is {quantity}: {sites or 'the observed sites are not recorded'}{given}."


def _stat(value: Any) -> str:
    return f"{value['mean']:.3f} ± {value['stderr']:.3f}"


def format_diagnostics(diagnostics: dict[str, Any]) -> str:
    """The second table of ``ppl-vae evaluate``: where the bound is lost and whether log p̂(x) can be trusted."""
    psis = diagnostics["psis"]
    lines = ["diagnostics (nats per datapoint)", "-" * 72]
    if "unavailable" in psis:
        lines.append(f"PSIS: not available ({psis['unavailable']})")
    else:
        def rounded(value):
            return "–" if value is None else f"{value:.3f}"

        lines.append(
            f"PSIS k-hat (K={psis['num_samples']}): median {rounded(psis['khat_median'])}, max "
            f"{rounded(psis['khat_max'])}; {100 * psis['unreliable_share']:.1f}% of datapoints have k-hat > "
            f"{psis['khat_threshold']} (unreliable)"
        )
        lines.append(f"log p̂(x), plain / PSIS-smoothed: {_stat(psis['log_evidence'])} / {_stat(psis['psis_log_evidence'])}")
    sites = site_diagnostics(diagnostics)
    for name, site in sites.items():
        lines += _site_lines(site, f"site '{name}': " if len(sites) > 1 else "")
    lines.append("-" * 72)
    return "\n".join(lines)


def _site_lines(site: dict[str, Any], prefix: str) -> list[str]:
    """The diagnostics of one latent site: collapse and active units, ELBO surgery, total correlation."""
    lines = []
    collapse, active = site.get("collapse", {}), site.get("active_units")
    if site.get("kind") == "discrete":
        lines += _discrete_kl_lines(site, prefix)
    elif "unavailable" in collapse:
        if isinstance(active, int):
            lines.append(f"{prefix}active units (Var_x E_q[z_d|x] > 0.01): {active}")
        elif isinstance(active, dict):
            lines.append(f"{prefix}active units: not available ({active['unavailable']})")
        lines.append(f"{prefix}KL per dimension: not available ({collapse['unavailable']})")
    else:
        top = ", ".join(f"{kl:.2f}" for kl in collapse["kl_sorted"][:5])
        num_active = collapse["num_active"]
        units = (f"{num_active} of {collapse['latent_dim']}" if isinstance(num_active, int)
                 else f"not available ({num_active['unavailable']})")
        lines.append(
            f"{prefix}active units (Var_x E_q[z_d|x] > {collapse['activity_threshold']}): {units}; collapsed "
            f"(KL_d < {collapse['kl_threshold']}): {100 * collapse['collapsed_share']:.0f}% of {collapse['latent_dim']}; "
            f"largest KL_d: {top}"
        )
        if collapse["warning"]:
            lines.append(f"WARNING: {collapse['warning']}")
    surgery = site.get("elbo_surgery", {})
    name = surgery.get("site", "z")
    if "unavailable" in surgery:
        lines.append(f"{prefix}ELBO surgery: not available ({surgery['unavailable']})")
    elif surgery:
        lines.append(
            f"{prefix}ELBO surgery: average KL {_stat(surgery['average_kl'])} = mutual information "
            f"{_stat(surgery['mutual_information'])} (<= log N = {surgery['mutual_information_bound']:.2f}) "
            f"+ marginal KL(q({name})||p({name})) {_stat(surgery['marginal_kl'])}"
        )
    if "class_probabilities" in surgery:
        probabilities = surgery["class_probabilities"]
        lines.append(f"{prefix}class probabilities, aggregate posterior q({name}) = mean_n q({name}|x_n): "
                     f"{_probabilities(probabilities['aggregate_posterior'])}; prior p({name}): "
                     f"{_probabilities(probabilities['prior'])}")
    tc = site.get("total_correlation", {})
    if tc and "unavailable" not in tc:
        lines.append(
            f"{prefix}marginal KL = total correlation {_stat(tc['total_correlation'])} + dimension-wise KL "
            f"{_stat(tc['dimensionwise_kl'])}"
        )
    return lines


def _discrete_kl_lines(site: dict[str, Any], prefix: str) -> list[str]:
    """A discrete site's KL (the whole site's: it has no continuous dimensions to split it into) and its warning."""
    kl = site.get("kl", {})
    if "unavailable" in kl:
        return [f"{prefix}KL: not available ({kl['unavailable']})"]
    lines = [f"{prefix}KL(q || p) of the discrete site ({kl['distribution']}): {_stat(kl)} ({kl['method']})"]
    if kl.get("warning"):
        lines.append(f"WARNING: {kl['warning']}")
    return lines


def _probabilities(values: list[float], shown: int = 10) -> str:
    text = ", ".join(f"{value:.3f}" for value in values[:shown])
    return f"[{text}{', ...' if len(values) > shown else ''}]"
