"""Put every results/<name>.md into experiments/README.md between its markers (the scripts do this themselves),
and the table of Burda et al.'s rows (results/reproduce/*.json, written by reproduce.py) into the main README.

    python experiments/update_readme.py [--results DIR] [--readme FILE] [--main-readme FILE]
"""

import argparse
import json
from pathlib import Path

import common

REPRODUCTION_SECTION = "burda2015-table"


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def reproduction_table(summaries: list[dict]) -> str:
    """One row per reproduced configuration: the measured test log p̂(x) beside the published one, and where the bound is lost."""
    header = ["row", "published log p(x)", "measured log p̂(x)", "test images", "measured − published", "ELBO", "gap log p̂ − ELBO",
              "KL = MI + marginal KL", "active units", "k-hat > 0.7", "trained"]
    rows = []
    for s in summaries:
        t = s["test"]
        particles = f"k={s['particles']}"
        layers = ", 2 stochastic layers" if s.get("program") == "two-layer" else ""
        name = f"{'IWAE' if s['objective'] == 'iwae' else 'VAE'}, {particles}{layers} ([{s['name']}](experiments/results/reproduce/{s['name']}.md))"
        kl = f"{t['kl']:.2f}"
        if t.get("mutual_information") is not None:
            kl += f" = {t['mutual_information']:.2f} + {t['marginal_kl']:.2f}"
        elif t.get("kl_sites"):  # two stochastic layers: the KL of each site instead
            kl += " = " + " + ".join(f"{value:.2f} ({name})" for name, value in t["kl_sites"].items())
        rows.append([
            name, f"{s['published_test_log_px']:.2f}", f"{t['log_px']:.2f} ± {t['log_px_stderr']:.2f}", f"{t['images']:,}",
            f"{t['log_px'] - s['published_test_log_px']:+.2f}", f"{t['elbo']:.2f} ± {t['elbo_stderr']:.2f}", f"{t['gap']:.2f}",
            kl, str(t["active_units"]),
            "n/a" if t["khat_above_0.7_share"] is None else f"{t['khat_above_0.7_share']:.0%}",  # PSIS needs enough draws
            f"{s['epochs']:,} of {s['published_epochs']:,} epochs, batch {s['batch_size']}, {duration(s['train_seconds'])}, engine {s['engine']}",
        ])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    samples = sorted({s["test"]["num_samples"] for s in summaries})
    hardware = sorted({s["hardware"] for s in summaries})
    lines += [
        "",
        "Test log p̂(x) with K=" + " or ".join(map(str, samples)) + " importance samples per image on the first "
        "N test images (the column), nats, ± standard error over the images. Hardware: " + "; ".join(hardware) + ".",
        "The paper's full budget, from scratch (on a GPU when there is one): `python experiments/reproduce.py NAME`"
        " (the VAE rows with `--engine jit`); a run above continues with `--resume --epochs 3280 --runs-dir RUNS_DIR`.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(common.RESULTS), help="folder of the q*.md sections and of reproduce/*.json")
    parser.add_argument("--readme", default=str(common.README), help="the file with the <!-- begin NAME --> markers")
    parser.add_argument("--main-readme", default=str(common.REPO / "README.md"),
                        help=f"the file with the <!-- begin {REPRODUCTION_SECTION} --> markers")
    args = parser.parse_args()
    readme = Path(args.readme)

    for path in sorted([*Path(args.results).glob("q*.md"), *Path(args.results).glob("conditional.md")]):
        if common.replace_section(readme, path.stem, path.read_text()):
            print(f"updated the section {path.stem}")
    order = {"elbo": 0, "iwae": 1}
    summaries = sorted((json.loads(p.read_text()) for p in sorted(Path(args.results, "reproduce").glob("*.json"))),
                       key=lambda s: (s.get("program") == "two-layer", order.get(s["objective"], 2), s["particles"]))
    if summaries and common.replace_section(Path(args.main_readme), REPRODUCTION_SECTION, reproduction_table(summaries)):
        print(f"updated the section {REPRODUCTION_SECTION} ({len(summaries)} rows)")
