"""Per-datapoint evidence bounds and estimates for any Pyro model/guide pair: the evaluation's public names.

Every public name of the evaluation is importable from here (``from ppl_vae.evaluate import
elbo_decomposition, evidence_estimate, log_evidence, evaluation_summary``); the code lives in
modules named for their job, each importing only the ones before it:

* :mod:`ppl_vae.inspection` -- checks of the data, and one trace of the pair read for its data
  plate, sites, dependencies and what the evidence is of (:class:`ProgramStructure`);
* :mod:`ppl_vae.chunking` -- the evaluation cut into chunks of particles and datapoints sized to
  memory, the terms of one chunk, the retry with smaller chunks when memory runs out;
* :mod:`ppl_vae.estimators` -- the estimators, each with its math: the ELBO and its decomposition,
  the importance-sampled log p(x) with its standard error and effective sample size;
* :mod:`ppl_vae.ais` -- annealed importance sampling of log p(x) from the guide to the posterior
  (HMC on every continuous latent site) and the BDMC sandwich on simulated data;
* :mod:`ppl_vae.summary` -- dataset means with standard errors, bits per dimension, and
  :func:`evaluation_summary`, the table of ``ppl-vae evaluate``.

All values are in nats, per datapoint.
"""

from __future__ import annotations

from .ais import (
    AisEstimate,
    AisSettings,
    BdmcResult,
    ais_log_evidence,
    ais_settings,
    bdmc,
    beta_schedule,
)
from .chunking import (
    CPU_CHUNK_ELEMENTS,
    DEFAULT_CHUNK_ELEMENTS,
    GPU_BYTES_PER_CHUNK_ELEMENT,
    MAX_GPU_CHUNK_ELEMENTS,
    ChunkTerms,
    EvaluationPlan,
    chunk_element_budget,
    chunk_terms,
    iter_chunk_terms,
    plan_evaluation,
)
from .estimators import (
    EvidenceEstimate,
    elbo_decomposition,
    evidence_estimate,
    evidence_from_weight_sums,
    log_evidence,
)
from .inspection import (
    DEVICE_ERRORS,
    KL_ANALYTIC,
    KL_MONTE_CARLO,
    OUT_OF_MEMORY_ERRORS,
    PARTICLE_PLATE,
    Data,
    ProgramStructure,
    check_count,
    check_data,
    data_argument_names,
    evidence_quantity,
    guide_descendants,
    inspect_program,
    latent_parents,
    observed_argument,
    trace_pair,
)
from .summary import (
    DEQUANTIZED_LEVELS,
    bits_per_dim,
    evaluation_summary,
    mean_and_stderr,
)

__all__ = [
    # annealed importance sampling and BDMC
    "AisEstimate", "AisSettings", "BdmcResult", "ais_log_evidence", "ais_settings", "bdmc", "beta_schedule",
    # inspection
    "DEVICE_ERRORS", "KL_ANALYTIC", "KL_MONTE_CARLO", "OUT_OF_MEMORY_ERRORS", "PARTICLE_PLATE", "Data",
    "ProgramStructure", "check_count", "check_data", "data_argument_names", "evidence_quantity",
    "guide_descendants", "inspect_program", "latent_parents", "observed_argument", "trace_pair",
    # chunking
    "CPU_CHUNK_ELEMENTS", "DEFAULT_CHUNK_ELEMENTS", "GPU_BYTES_PER_CHUNK_ELEMENT", "MAX_GPU_CHUNK_ELEMENTS",
    "ChunkTerms", "EvaluationPlan", "chunk_element_budget", "chunk_terms", "iter_chunk_terms", "plan_evaluation",
    # estimators
    "EvidenceEstimate", "elbo_decomposition", "evidence_estimate", "evidence_from_weight_sums", "log_evidence",
    # summary
    "DEQUANTIZED_LEVELS", "bits_per_dim", "evaluation_summary", "mean_and_stderr",
]
