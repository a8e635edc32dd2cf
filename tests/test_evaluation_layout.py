"""The evaluation's modules: every public name still importable from ppl_vae.evaluate, imports flowing one way.

inspection <- chunking <- estimators <- ais <- summary, and ppl_vae.evaluate re-exports them all: a module that
imported one above it (or ppl_vae.evaluate) would make a circle, and a private name imported across
modules would tie them together where no reader looks.
"""

import ast
import importlib
from pathlib import Path

import pytest

import ppl_vae
import ppl_vae.evaluate as evaluate

PACKAGE = Path(ppl_vae.__file__).parent
LAYERS = ["inspection", "chunking", "estimators", "ais", "summary"]  # each may import only those before it
# Names the README, the tests and the other modules import from ppl_vae.evaluate.
DOCUMENTED = [
    "elbo_decomposition", "log_evidence", "evidence_estimate", "evaluation_summary", "mean_and_stderr",
    "bits_per_dim", "iter_chunk_terms", "plan_evaluation", "inspect_program", "trace_pair", "check_data",
    "check_count", "EvidenceEstimate", "ProgramStructure", "chunk_element_budget", "DEVICE_ERRORS",
    "OUT_OF_MEMORY_ERRORS", "KL_ANALYTIC", "KL_MONTE_CARLO", "DEFAULT_CHUNK_ELEMENTS", "CPU_CHUNK_ELEMENTS",
    "MAX_GPU_CHUNK_ELEMENTS", "evidence_from_weight_sums", "evidence_quantity", "ais_log_evidence", "bdmc",
    "AisEstimate", "BdmcResult",
]


def package_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import of a ppl_vae module in ``path``, at any depth (function bodies too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level == 1 and node.module is None:  # from . import fused
                found += [(name, []) for name in names]
            elif node.level == 1:
                found.append((node.module.split(".")[0], names))
            elif node.module and node.module.startswith("ppl_vae."):
                found.append((node.module.split(".")[1], names))
        elif isinstance(node, ast.Import):
            found += [(alias.name.split(".")[1], []) for alias in node.names if alias.name.startswith("ppl_vae.")]
    return found


def test_every_public_name_is_importable_from_evaluate_and_is_the_one_in_its_home():
    assert set(DOCUMENTED) <= set(evaluate.__all__)
    assert len(evaluate.__all__) == len(set(evaluate.__all__))
    homes = [importlib.import_module(f"ppl_vae.{layer}") for layer in LAYERS]
    for name in evaluate.__all__:
        holders = [home for home in homes if name in vars(home)]
        assert holders, f"{name} is in ppl_vae.evaluate.__all__ but in none of {LAYERS}"
        assert all(getattr(home, name) is getattr(evaluate, name) for home in holders), name


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_flow_one_way(layer):
    allowed = set(LAYERS[: LAYERS.index(layer)])
    forbidden = (set(LAYERS) - allowed - {layer}) | {"evaluate"}
    imported = {module for module, _ in package_imports(PACKAGE / f"{layer}.py")}
    assert not imported & forbidden, f"ppl_vae.{layer} imports {sorted(imported & forbidden)}"


def test_no_private_name_of_the_evaluation_is_imported_across_modules():
    owners = set(LAYERS) | {"evaluate"}
    private = [
        (path.name, module, name)
        for path in sorted(PACKAGE.glob("*.py"))
        for module, names in package_imports(path)
        if module in owners
        for name in names
        if name.startswith("_")
    ]
    assert private == []
