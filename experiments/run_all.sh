#!/usr/bin/env bash
# Every experiment, one after the other (about 32 minutes on 2 CPU cores), then the README's sections.
#   bash experiments/run_all.sh            # add --retrain to train every model again
set -euo pipefail
cd "$(dirname "$0")"
for script in q1_kl_term q5_bayes_2d q2_sample_vs_mean q3_beta_sweep q4_collapse; do
  echo "== $script"
  python "$script.py" "$@"
done
