"""Benchmarks: the cost of Pyro's tracing against the same computation in plain PyTorch.

``ppl-vae bench`` measures, in one process with interleaved runs and medians:

* one SVI step of the default VAE (784-200-200-50 tanh, Bernoulli) at several batch
  sizes, as steps/s, for the plain-PyTorch reference and for each Pyro path:
  ``svi`` (``SVI`` + ``Trace_ELBO``, Pyro's validation on, its default), ``svi-novalid``
  (validation off, as ``ppl-vae train`` runs), ``svi-meanfield`` (``TraceMeanField_ELBO``)
  ``svi-jit`` (``SVI`` + Pyro's ``JitTrace_ELBO``), ``elbo-module`` (``Trace_ELBO()(model, guide)``
  as a torch module with one ``torch.optim.Adam`` over all parameters), ``elbo-module-noreg``
  (the same, with the programs' ``pyro.module`` registration turned off, since the torch
  optimizer does not need it) and ``module-jit`` (the compiled loss
  :class:`~ppl_vae.objectives.CompiledProgramLoss` with one torch Adam: ``ppl-vae train --engine jit``);
* an epoch over the 50,000 MNIST training images (when the data are available) of bare steps,
  and two epochs of ``ppl-vae train`` with its defaults through the real training loop
  (:func:`time_default_training`: the engine ``--engine auto`` chose, why, and its time per
  epoch over plain PyTorch's); the step variant ``train-default`` is that engine's step;
* evidence estimation (log-weights per second and peak memory) against a plain-PyTorch
  reference doing the same computation, against the same estimate with the fused log-densities
  off (:mod:`ppl_vae.fused`), and against the decoder's matrix-product floor (bare matrix
  products with the decoder's shapes and FLOPs over the same chunks, timed in the same run);
* achieved FLOP/s from an analytic count of the MLPs' multiply-adds, against the
  device's peak where it is known.

The plain-PyTorch reference lives here, not in the package's training path: it is the
yardstick, written by hand on purpose, with the same networks and the same loss
(single-sample ELBO with Monte Carlo KL, as ``Trace_ELBO`` computes it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pyro
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import nn
from torch.nn import functional as F

from .evaluate import AisSettings, ais_log_evidence, chunk_element_budget, evidence_estimate
from .model import VAE, VAEConfig
from .objectives import CompiledProgramLoss

# Dense fp32 peaks (no sparsity, no tensor cores; NVIDIA's data sheets) for the GPUs this project meets,
# matched against torch.cuda.get_device_name in this order (the PCIe H100 before the SXM one); None elsewhere.
FP32_PEAK_FLOPS = {"H100 PCIe": 51e12, "H100": 67e12, "H200": 67e12, "A100": 19.5e12}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, where ``platform.processor()`` is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} CPU, {torch.get_num_threads()} threads"


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> float | None:
    """The dense fp32 peak of a GPU named ``device_name``, in FLOP/s, where :data:`FP32_PEAK_FLOPS` knows it."""
    return next((peak for key, peak in FP32_PEAK_FLOPS.items() if key in device_name), None)


def mlp_multiply_adds(vae: VAE) -> tuple[int, int]:
    """Multiply-adds per datapoint of one encoder pass and one decoder pass (Linear layers only)."""

    def count(module: nn.Module) -> int:
        return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

    return count(vae.guide_net), count(vae.decoder)


class ReferenceStep:
    """One SGD step of the same VAE and the same loss, in plain PyTorch (the yardstick)."""

    def __init__(self, vae: VAE, lr: float = 1e-3):
        self.encoder = vae.guide_net.encoder
        self.decoder = vae.decoder
        self.optimizer = torch.optim.Adam([*self.encoder.parameters(), *self.decoder.parameters()], lr=lr)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)  # the data pipeline's images [N, 1, 28, 28], flat as the MLPs take them
        loc, scale = self.encoder(x)
        z = loc + scale * torch.randn_like(loc)
        log_px = -F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum(-1)
        log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_qz = (-0.5 * ((z - loc) / scale).pow(2) - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        return -(log_px + log_pz - log_qz).sum()

    def __call__(self, x: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x)
        loss.backward()
        self.optimizer.step()
        return loss.item()


class _Program(nn.Module):
    """A bound ``model``/``guide`` method as an ``nn.Module``, so ``Trace_ELBO()(model, guide)`` sees the parameters."""

    def __init__(self, vae: VAE, method: str):
        super().__init__()
        self.vae, self.method = vae, method

    def forward(self, x):
        return getattr(self.vae, self.method)(x)


@contextlib.contextmanager
def _own_param_store(step) -> Iterator[None]:
    """Run ``step`` with its own Pyro param store: the copies of one VAE share its parameter names,
    and the JIT paths need the store's tensors to be their module's."""
    with pyro.get_param_store().scope(step.param_state) as state:
        step.param_state = state
        yield


class ElboModuleStep:
    """``Trace_ELBO()(model, guide)`` as a torch module, one ``torch.optim.Adam`` over all its parameters."""

    def __init__(self, vae: VAE, lr: float = 1e-3, register_params: bool = True):
        vae.register_params = register_params
        self.loss_module = Trace_ELBO()(_Program(vae, "model"), _Program(vae, "guide"))
        self.optimizer = torch.optim.Adam(self.loss_module.parameters(), lr=lr)
        self.param_state: dict | None = None

    own_params = _own_param_store

    def __call__(self, x: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_module(x)
        loss.backward()
        self.optimizer.step()
        return loss.item()


class CompiledModuleStep(ElboModuleStep):
    """The compiled loss of ``ppl-vae train --engine jit`` (:class:`~ppl_vae.objectives.CompiledProgramLoss`), one torch Adam."""

    def __init__(self, vae: VAE, lr: float = 1e-3):
        self.param_state = None
        self.loss_module = CompiledProgramLoss(vae)  # its graph reads the parameters from this variant's param store
        self.optimizer = torch.optim.Adam(vae.parameters(), lr=lr)


class DefaultEngineStep:
    """A step of the engine ``ppl-vae train`` uses by default (``--engine auto``), as the trainer runs it.

    The engine is chosen on the first batch by :func:`ppl_vae.train.choose_engine` (the compiled
    loss where it is checked equal to ``Trace_ELBO``'s, SVI otherwise) for the VAE with the
    trainer's KL-weight wrapper, and steps with the trainer's checks (finite loss and gradient norm).
    ``choice`` says which engine and why.
    """

    def __init__(self, vae: VAE, lr: float = 1e-3):
        from .programs import Weighted

        self.program, self.lr = Weighted(vae), lr
        self.engine = self.choice = self.param_state = None

    own_params = _own_param_store

    def __call__(self, x: torch.Tensor) -> float:
        if self.engine is None:
            from .training.config import TrainConfig
            from .training.engines import choose_engine, make_engine

            config = TrainConfig(learning_rate=self.lr, device=x.device.type)
            self.choice = choose_engine(config, self.program, (x,), 1, x.device)
            self.engine = make_engine(self.choice.engine, self.program, replace(config, engine=self.choice.engine))
        return self.engine.step(x)


class SviStep:
    def __init__(self, vae: VAE, elbo, validation: bool, lr: float = 1e-3):
        self.svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), loss=elbo)
        self.validation = validation
        self.param_state: dict | None = None

    own_params = _own_param_store

    def __call__(self, x: torch.Tensor) -> float:
        with pyro.validation_enabled(self.validation):
            return self.svi.step(x)


STEP_VARIANTS: dict[str, Callable[[VAE], Callable[[torch.Tensor], float]]] = {
    "pytorch": ReferenceStep,
    "svi": lambda vae: SviStep(vae, Trace_ELBO(), validation=True),
    "svi-novalid": lambda vae: SviStep(vae, Trace_ELBO(), validation=False),
    "svi-meanfield": lambda vae: SviStep(vae, TraceMeanField_ELBO(), validation=False),
    # Pyro's own compiled loss: the model and guide are traced once with torch.jit.trace and replayed,
    # skipping Pyro's Python bookkeeping. Same estimator, other random draws (the traced sampler calls
    # torch.normal, not Tensor.normal_), so the test checks it with the draws held fixed.
    "svi-jit": lambda vae: SviStep(vae, JitTrace_ELBO(ignore_jit_warnings=True), validation=False),
    "elbo-module": ElboModuleStep,
    "elbo-module-noreg": lambda vae: ElboModuleStep(vae, register_params=False),
    "module-jit": CompiledModuleStep,
    # What `ppl-vae train` runs by default: the engine --engine auto chooses, with the trainer's checked step.
    "train-default": DefaultEngineStep,
}


@dataclass
class StepTiming:
    variant: str
    batch_size: int
    seconds_per_step: float  # median over repeats
    spread: float  # (max - min) / median over repeats

    @property
    def steps_per_second(self) -> float:
        return 1.0 / self.seconds_per_step


def _fresh_vae(device: torch.device, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig()).to(device)


def _own_params(step: Callable):
    return step.own_params() if hasattr(step, "own_params") else contextlib.nullcontext()


def time_steps(
    batch_sizes: list[int], device: torch.device, repeats: int = 5, steps: int = 20, variants: list[str] | None = None
) -> list[StepTiming]:
    """Median seconds per step of each variant at each batch size; variants interleaved within each repeat."""
    variants = variants or list(STEP_VARIANTS)
    results = []
    for batch_size in batch_sizes:
        x = torch.bernoulli(torch.full((batch_size, 784), 0.3, device=device))
        pyro.clear_param_store()
        # One VAE copy per variant, each run in its own Pyro param store (the copies share parameter names).
        base = _fresh_vae(device)
        steppers = {name: STEP_VARIANTS[name](copy.deepcopy(base)) for name in variants}
        for step in steppers.values():  # warm-up: lazy optimizer creation, allocator, first traces, JIT
            with _own_params(step):
                for _ in range(3):
                    step(x)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, step in steppers.items():
                with _own_params(step):
                    _sync(device)
                    started = time.perf_counter()
                    for _ in range(steps):
                        step(x)
                    _sync(device)
                samples[name].append((time.perf_counter() - started) / steps)
        for name, values in samples.items():
            median = statistics.median(values)
            results.append(StepTiming(name, batch_size, median, (max(values) - min(values)) / median))
    return results


def time_reference_evidence(vae: VAE, x: torch.Tensor, num_samples: int, particles_per_chunk: int) -> torch.Tensor:
    """The same per-datapoint log-mean-exp of importance weights, in plain PyTorch (the yardstick)."""
    encoder, decoder = vae.guide_net.encoder, vae.decoder
    total = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        loc, scale = encoder(x)
        for start in range(0, num_samples, particles_per_chunk):
            k = min(particles_per_chunk, num_samples - start)
            z = loc + scale * torch.randn((k, *loc.shape), device=x.device)
            log_px = -F.binary_cross_entropy_with_logits(decoder(z), x.expand(k, *x.shape), reduction="none").sum(-1)
            log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_qz = (-0.5 * ((z - loc) / scale).pow(2) - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
            total = torch.logaddexp(total, torch.logsumexp((log_px + log_pz - log_qz).double(), 0))
    return total - math.log(num_samples)


def decoder_matmul_floor(vae: VAE, x: torch.Tensor, num_samples: int, chunk: int, particles: int) -> Callable[[], None]:
    """Bare matrix products with the decoder's shapes and FLOPs over the same chunks as the evaluation (the floor).

    For every (data chunk, particle chunk) of an evidence estimate, one ``torch.mm`` per Linear layer of
    the decoder, [k n, in] x [in, out], into preallocated outputs: no bias, activation, allocation or
    density, so no evaluation of these networks at these shapes can take less time on this device.
    """
    layers = [m for m in vae.decoder.modules() if isinstance(m, nn.Linear)]
    num_examples = x.shape[0]
    plan = [(min(chunk, num_examples - s), min(particles, num_samples - d))
            for s in range(0, num_examples, chunk) for d in range(0, num_samples, particles)]
    shapes = sorted({n * k for n, k in plan})
    weights = [layer.weight.detach().t() for layer in layers]
    g = torch.Generator(device=x.device).manual_seed(0)
    buffers = {rows: [(torch.randn(rows, layer.in_features, generator=g, device=x.device),
                       torch.empty(rows, layer.out_features, device=x.device)) for layer in layers] for rows in shapes}

    def run() -> None:
        for n, k in plan:
            for w, (a, out) in zip(weights, buffers[n * k]):
                torch.mm(a, w, out=out)

    return run


EVIDENCE_VARIANTS = ("pytorch", "pytorch-best-chunk", "ppl_vae", "ppl_vae-unfused", "matmul-floor")


def time_evidence(device: torch.device, num_examples: int, num_samples: int, repeats: int = 3) -> dict[str, Any]:
    """Log-weights per second (and peak CUDA memory) of evidence_estimate against the plain reference.

    Variants, interleaved within each repeat, medians reported: ``pytorch`` (the plain reference),
    ``ppl_vae`` (:func:`~ppl_vae.evaluate.evidence_estimate` on the VAE's Pyro programs, as every
    evaluation runs), ``ppl_vae-unfused`` (the same with :func:`ppl_vae.fused.fusion` off: each site's
    own ``log_prob``) and ``matmul-floor`` (:func:`decoder_matmul_floor`), all with the same chunks;
    and ``pytorch-best-chunk``, the reference with the particles per chunk (of 1, 1/2, ... 1/16 of the
    package's) that a sweep before the repeats found fastest: it prefers smaller chunks, so the
    package is compared with the reference at its best too. Nothing is compiled, so no compile
    time is excluded.
    """
    from . import fused
    from .evaluate import plan_evaluation

    vae = _fresh_vae(device)
    x = torch.bernoulli(torch.full((num_examples, 784), 0.3, device=device))
    chunk = min(num_examples, 500)
    # The package's chunk budget for all (on a GPU it grows with the free memory).
    particles = max(1, min(num_samples, chunk_element_budget(device) // (chunk * 784)))
    floor = decoder_matmul_floor(vae, x, num_samples, chunk, particles)

    def estimate(fusion: bool) -> Callable[[], None]:
        def run() -> None:
            with fused.fusion(fusion):
                evidence_estimate(vae.model, vae.guide, x, num_samples=num_samples, chunk_size=chunk,
                                  particles_per_chunk=particles)
        return run

    def reference_with(particles_per_chunk: int) -> Callable[[], None]:
        def run() -> None:
            for s in range(0, num_examples, chunk):
                time_reference_evidence(vae, x[s : s + chunk], num_samples, particles_per_chunk)
        return run

    time_reference_evidence(vae, x[:2], 2, 2)  # its one-time set-up, outside the sweep
    sweep = _reference_chunk_sweep(device, reference_with, particles)
    best_particles = min(sweep, key=sweep.get)
    variants = {"pytorch": reference_with(particles), "pytorch-best-chunk": reference_with(best_particles),
                "ppl_vae": estimate(True), "ppl_vae-unfused": estimate(False), "matmul-floor": floor}
    with pyro.validation_enabled(False):
        log_density = plan_evaluation(vae.model, vae.guide, x, num_samples=num_samples, chunk_size=chunk,
                                      particles_per_chunk=particles).structure.log_density
        # Warm-up on two images (the first estimate in a process pays about a second of one-time set-up).
        for fusion in (True, False):
            with fused.fusion(fusion):
                evidence_estimate(vae.model, vae.guide, x[:2], num_samples=2)
        time_reference_evidence(vae, x[:2], 2, 2)
        runs, peaks = _interleaved_seconds(device, variants, repeats)
    settings = {"num_examples": num_examples, "num_samples": num_samples, "chunk_size": chunk,
                "particles_per_chunk": particles, "reference_best_particles_per_chunk": best_particles,
                "reference_chunk_sweep_seconds": sweep, "repeats": repeats, "log_density": log_density}
    return _evidence_record(settings, runs, peaks, num_examples * num_samples, mlp_multiply_adds(vae)[1])


def _reference_chunk_sweep(device: torch.device, reference_with: Callable[[int], Callable[[], None]],
                           particles: int) -> dict[int, float]:
    """Seconds of the plain reference with 1, 1/2, ... 1/16 of the package's particles per chunk, once each."""
    sweep: dict[int, float] = {}
    with torch.no_grad():
        for k in sorted({max(1, particles // d) for d in (1, 2, 4, 8, 16)}):
            _sync(device)
            started = time.perf_counter()
            reference_with(k)()
            _sync(device)
            sweep[k] = time.perf_counter() - started
    return sweep


def _interleaved_seconds(device: torch.device, variants: dict[str, Callable[[], None]],
                         repeats: int) -> tuple[dict[str, list[float]], dict[str, int | None]]:
    """Each variant once per repeat, interleaved (so the machine's drift hits them alike); seconds and peak CUDA memory."""
    runs: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, int | None] = {}
    for _ in range(repeats):
        for name, run in variants.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            started = time.perf_counter()
            run()
            _sync(device)
            runs[name].append(time.perf_counter() - started)
            peaks[name] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return runs, peaks


def _evidence_record(settings: dict[str, Any], runs: dict[str, list[float]], peaks: dict[str, int | None],
                     weights: int, decoder_macs: int) -> dict[str, Any]:
    """The evidence benchmark's JSON record: medians, spreads, throughputs and ratios of the timed variants."""
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {
        **settings,
        "seconds": medians,
        "all_seconds": runs,
        "spread": {name: (max(v) - min(v)) / statistics.median(v) for name, v in runs.items()},
        "log_weights_per_second": {name: weights / seconds for name, seconds in medians.items()},
        # Throughput of ppl_vae over the reference's (>1: faster than plain PyTorch), per repeat's median.
        "throughput_ratio": medians["pytorch"] / medians["ppl_vae"],
        "throughput_ratio_unfused": medians["pytorch"] / medians["ppl_vae-unfused"],
        # ppl_vae at its default chunks over the reference at its best chunks.
        "throughput_ratio_to_best_reference": medians["pytorch-best-chunk"] / medians["ppl_vae"],
        # Time over the decoder's bare matrix products (>=1; 1 would be nothing but the decoder's matmuls).
        "ratio_to_matmul_floor": medians["ppl_vae"] / medians["matmul-floor"],
        "pytorch_ratio_to_matmul_floor": medians["pytorch"] / medians["matmul-floor"],
        "matmul_floor_flops": 2 * decoder_macs * weights / medians["matmul-floor"],
        "compile_seconds": 0.0,
        "peak_cuda_memory_bytes": peaks,
    }


def time_epoch(
    device: torch.device, data_dir: str | None, batch_size: int = 100, train_examples: int | None = None
) -> dict[str, Any] | None:
    """One epoch over the 50,000 training images: Pyro SVI (validation off) and the compiled loss (``--engine jit``)
    against the reference; None without data. ``ratio`` is SVI's time over the reference's, ``ratio_jit`` the
    compiled loss's (its first steps include compiling)."""
    from .data import load_mnist
    from .errors import DataNotFoundError

    try:
        data = load_mnist(data_dir, "dynamic", device, train_examples=train_examples, download=False)
    except DataNotFoundError:
        return None
    seconds = {}
    for name in ("pytorch", "svi-novalid", "module-jit"):
        pyro.clear_param_store()
        step = STEP_VARIANTS[name](_fresh_vae(device))
        _sync(device)
        started = time.perf_counter()
        for batch in data.train_batches(batch_size):
            step(batch)
        _sync(device)
        seconds[name] = time.perf_counter() - started
    return {"batch_size": batch_size, "images": data.train.shape[0], "seconds": seconds,
            "ratio": seconds["svi-novalid"] / seconds["pytorch"], "ratio_jit": seconds["module-jit"] / seconds["pytorch"]}


def time_default_training(
    device: torch.device, data_dir: str | None, batch_size: int = 100, train_examples: int | None = None,
    repeats: int = 3,
) -> dict[str, Any] | None:
    """``ppl-vae train`` with its defaults (``--engine auto``) against plain PyTorch, per epoch.

    First a real run: :func:`ppl_vae.train.train` with the default configuration for two epochs on
    the first ``train_examples`` MNIST training images (all 50,000 when None; 100 validation and
    test images) in a temporary run directory; it records which engine ran and why (``engine``)
    and its ``epoch_seconds`` (training steps only, as ``metrics.jsonl`` has them; the first epoch
    also compiles the loss). Then ``repeats`` interleaved pairs of epochs over the same images and
    batch size: one of :class:`ReferenceStep`, and one of the training loop's epoch
    (:func:`ppl_vae.training.steps.run_epoch`) with the engine that run chose and its checked steps, on a
    fresh default VAE, compiled beforehand. ``ratio`` is the median epoch's time over the reference's.
    None without data.
    """
    from . import runs
    from .data import load_mnist
    from .errors import DataNotFoundError
    from .programs import Weighted
    from .training.config import TrainConfig
    from .training.engines import make_engine
    from .training.interrupts import StopRequest
    from .training.loop import train
    from .training.steps import run_epoch

    try:
        data = load_mnist(data_dir, "dynamic", device, train_examples=train_examples, eval_examples=100, download=False)
    except DataNotFoundError:
        return None
    config = TrainConfig(epochs=2, batch_size=batch_size, device=str(device), data_dir=data_dir,
                         train_examples=train_examples, eval_examples=100, test_samples=1)
    with tempfile.TemporaryDirectory() as folder:
        train(Path(folder) / "run", config, progress=False)
        metrics = [json.loads(line) for line in (Path(folder) / "run" / "metrics.jsonl").read_text().splitlines()]
        engine_record = runs.read_json(Path(folder) / "run" / runs.CONFIG_FILE)["engine"]

    pyro.clear_param_store()
    program = Weighted(_fresh_vae(device))
    engine = make_engine(engine_record["engine"], program, replace(config, engine=engine_record["engine"]))
    reference = ReferenceStep(_fresh_vae(device))
    first = next(data.train_batches(batch_size))
    engine.step(first)  # compiles (jit) or creates Pyro's optimizer (svi)
    reference(first)
    steps = math.ceil(data.train.shape[0] / batch_size)

    def reference_epoch() -> None:
        for batch in data.train_batches(batch_size):
            reference(batch)

    def training_epoch() -> None:
        with StopRequest() as stop:
            engine.begin_epoch(stop)
            run_epoch(data.train_batches(batch_size), engine.step, engine.stop_requested, steps, 1, 1, False, "")

    seconds: dict[str, list[float]] = {"pytorch": [], "default": []}
    for _ in range(repeats):
        for name, epoch in (("pytorch", reference_epoch), ("default", training_epoch)):
            _sync(device)
            started = time.perf_counter()
            epoch()
            _sync(device)
            seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "batch_size": batch_size, "images": data.train.shape[0], "repeats": repeats, "engine": engine_record,
        "run_epoch_seconds": [m["epoch_seconds"] for m in metrics],
        "epoch_seconds": seconds, "median_epoch_seconds": medians,
        "ratio": medians["default"] / medians["pytorch"],
        "spread": {name: (max(v) - min(v)) / statistics.median(v) for name, v in seconds.items()},
    }


def run_benchmark(
    device: torch.device,
    batch_sizes: list[int],
    repeats: int = 5,
    steps: int = 20,
    evidence_examples: int = 500,
    evidence_samples: int = 1000,
    epoch: bool = True,
    data_dir: str | None = None,
    evidence_only: bool = False,
    epoch_examples: int | None = None,
    ais: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All measurements as one JSON-ready dict (seconds, steps/s, ratios to the plain-PyTorch reference).

    ``ais``: keyword arguments of :func:`time_ais` (num_examples, settings or steps, chains, leapfrog_steps); given, AIS is
    timed against its decoder forward+backward floor under ``"ais"`` (None there otherwise).

    ``evidence_only`` skips the SVI steps and the epochs: only evidence estimation is timed.
    ``epoch_examples`` limits the epochs (of bare steps, and of default training) to the first
    training images (all 50,000 when None)."""
    with warnings.catch_warnings():
        # torch 2.15 marks torch.jit.trace deprecated; Pyro 1.9's JIT ELBOs (svi-jit) are built on it.
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated", category=FutureWarning)
        result = _run_benchmark(device, batch_sizes, repeats, steps, evidence_examples, evidence_samples, epoch,
                                data_dir, evidence_only, epoch_examples)
    # Whole AIS runs (seconds each) as the evidence repeats are: at most 3 unless only evidence is measured.
    result["ais"] = (time_ais(device, repeats=repeats if evidence_only else max(1, min(3, repeats)), **ais)
                     if ais is not None else None)
    return result


def _run_benchmark(device, batch_sizes, repeats, steps, evidence_examples, evidence_samples, epoch, data_dir,
                   evidence_only, epoch_examples) -> dict[str, Any]:
    timings = [] if evidence_only else time_steps(batch_sizes, device, repeats, steps)
    encoder_macs, decoder_macs = mlp_multiply_adds(_fresh_vae(device))
    # Forward + backward of encoder and decoder: about 3 passes of 2 FLOPs per multiply-add.
    flops_per_example = 3 * 2 * (encoder_macs + decoder_macs)
    peak = peak_flops(device)
    steps_table = []
    for t in timings:
        reference = next(r for r in timings if r.batch_size == t.batch_size and r.variant == "pytorch")
        achieved = flops_per_example * t.batch_size / t.seconds_per_step
        steps_table.append({
            "variant": t.variant, "batch_size": t.batch_size, "steps_per_second": t.steps_per_second,
            "ms_per_step": 1e3 * t.seconds_per_step, "spread": t.spread,
            "time_ratio_to_pytorch": t.seconds_per_step / reference.seconds_per_step,
            "achieved_flops": achieved, "fraction_of_peak": achieved / peak if peak else None,
        })
    result = {
        "device": device_description(device),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "repeats": repeats,
        "steps_per_repeat": steps,
        "svi_step": steps_table,
        # Evidence repeats are whole estimates (seconds each): at most 3 unless only they are measured.
        "evidence": time_evidence(device, evidence_examples, evidence_samples,
                                  repeats=repeats if evidence_only else max(1, min(3, repeats))),
        "epoch": time_epoch(device, data_dir, train_examples=epoch_examples) if epoch and not evidence_only else None,
        "default_training": (time_default_training(device, data_dir, train_examples=epoch_examples,
                                                   repeats=max(1, min(3, repeats)))
                             if epoch and not evidence_only else None),
        "peak_fp32_flops": peak,
    }
    return result


def format_benchmark(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device']}; torch {result['torch']}, pyro {result['pyro']}; "
             f"medians of {result['repeats']} interleaved repeats of {result['steps_per_repeat']} steps"]
    if result["svi_step"]:
        lines.append(f"{'variant':<19}{'batch':>7}{'steps/s':>10}{'ms/step':>10}{'x pytorch':>11}{'spread':>8}{'GFLOP/s':>9}")
    for row in result["svi_step"]:
        lines.append(
            f"{row['variant']:<19}{row['batch_size']:>7}{row['steps_per_second']:>10.1f}{row['ms_per_step']:>10.2f}"
            f"{row['time_ratio_to_pytorch']:>11.2f}{100 * row['spread']:>7.0f}%{row['achieved_flops'] / 1e9:>9.1f}"
        )
    ev = result["evidence"]
    lines.append(
        f"evidence, K={ev['num_samples']} over {ev['num_examples']} images: ppl_vae "
        f"{ev['log_weights_per_second']['ppl_vae']:.3g} log-weights/s, plain PyTorch "
        f"{ev['log_weights_per_second']['pytorch']:.3g} (ppl_vae at {ev['throughput_ratio']:.2f}x the reference's "
        f"throughput, {ev['throughput_ratio_unfused']:.2f}x unfused; {ev['throughput_ratio_to_best_reference']:.2f}x the "
        f"reference at its best chunks, {ev['reference_best_particles_per_chunk']} particles against "
        f"{ev['particles_per_chunk']}); time over the decoder's matmul floor: "
        f"ppl_vae x{ev['ratio_to_matmul_floor']:.2f}, plain PyTorch x{ev['pytorch_ratio_to_matmul_floor']:.2f} "
        f"(floor {ev['seconds']['matmul-floor']:.2f} s, {ev['matmul_floor_flops'] / 1e9:.0f} GFLOP/s); "
        f"log-density: {', '.join(f'{k}: {v}' for k, v in ev['log_density'].items())}"
    )
    if result["epoch"]:
        ep = result["epoch"]
        lines.append(
            f"epoch of {ep['images']} images at batch {ep['batch_size']}: Pyro SVI {ep['seconds']['svi-novalid']:.1f} s "
            f"(x{ep['ratio']:.2f}), compiled loss (--engine jit) {ep['seconds']['module-jit']:.1f} s (x{ep['ratio_jit']:.2f}), "
            f"plain PyTorch {ep['seconds']['pytorch']:.1f} s"
        )
    if result.get("default_training"):
        dt = result["default_training"]
        engine, medians = dt["engine"], dt["median_epoch_seconds"]
        lines.append(
            f"ppl-vae train with its defaults: --engine {engine['requested']} ran {engine['engine']} ({engine['reason']}; "
            f"check {engine['check_seconds']:.2f} s); an epoch of {dt['images']} images at batch {dt['batch_size']}: "
            f"{medians['default']:.2f} s against plain PyTorch {medians['pytorch']:.2f} s, x{dt['ratio']:.2f} (medians of "
            f"{dt['repeats']} interleaved epochs; the run's own epochs: "
            f"{', '.join(f'{s:.2f}' for s in dt['run_epoch_seconds'])} s, the first compiling)"
        )
    if result.get("ais"):
        lines.append(format_ais_benchmark(result["ais"]))
    return "\n".join(lines)


def decoder_gradient_floor(vae: VAE, rows: int, passes: int, device: torch.device) -> Callable[[], None]:
    """``passes`` bare decoder forward passes at [rows, latent] and backward to z (no density, no Pyro): AIS's floor.

    Every leapfrog step of AIS needs the gradient of log p(x, z) in z, so no AIS of this decoder at these shapes
    can take less than this on this device.
    """
    z = torch.randn(rows, vae.config.latent_dim, device=device, requires_grad=True)

    def run() -> None:
        for _ in range(passes):
            out = vae.decoder(z)
            torch.autograd.grad(out, z, torch.ones_like(out))

    return run


# What ``ppl-vae bench`` times AIS with by default: fewer steps than an evaluation (seconds, not minutes).
BENCH_AIS = AisSettings(steps=30, chains=8, leapfrog_steps=5)


def time_ais(device: torch.device, num_examples: int = 100, steps: int | None = None, chains: int | None = None,
             leapfrog_steps: int | None = None, repeats: int = 3, settings: AisSettings | None = None) -> dict[str, Any]:
    """AIS on the default VAE against its floor: the same number of decoder forward + backward passes at its shapes.

    ``ais`` runs :func:`ppl_vae.evaluate.ais_log_evidence` (validation off, as ``ppl-vae evaluate`` runs) on
    ``num_examples`` random binary images in one chunk with ``settings`` (or :data:`BENCH_AIS` with the keywords
    given); ``floor`` runs :func:`decoder_gradient_floor` with as
    many passes as AIS makes gradient evaluations (T - 1 + pilot - 1 transitions of L leapfrog steps, plus the
    two starting states) at [chains x images, latent]. Interleaved repeats, medians; ``fraction_of_floor`` is
    floor time over AIS time (1 would be nothing but the decoder's own passes). On the CPU the process's CPU time
    is measured too (``cpu_seconds``, ``cpu_fraction_of_floor``): on a machine shared with other work, wall time
    counts the time the process waits for a core, which CPU time does not.
    """
    options = {"steps": steps, "chains": chains, "leapfrog_steps": leapfrog_steps}
    if settings is None:
        settings = replace(BENCH_AIS, **{name: value for name, value in options.items() if value is not None})
    else:
        settings = AisSettings.of(settings, **options)
    vae = _fresh_vae(device)
    x = torch.bernoulli(torch.full((num_examples, 784), 0.3, device=device))
    passes = settings.leapfrog_steps * (settings.steps - 1 + settings.pilot - 1) + 2
    variants = {
        "ais": lambda: ais_log_evidence(vae.model, vae.guide, x, settings=settings, chunk_size=num_examples),
        "floor": decoder_gradient_floor(vae, settings.chains * num_examples, passes, device),
    }
    runs: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    with pyro.validation_enabled(False):
        ais_log_evidence(vae.model, vae.guide, x[:2], steps=2, chains=2, leapfrog_steps=1)  # one-time set-up
        for _ in range(repeats):
            for name, run in variants.items():
                _sync(device)
                started, cpu_started = time.perf_counter(), time.process_time()
                run()
                _sync(device)
                runs[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - cpu_started)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    result = {"device": device_description(device), "num_examples": num_examples, "settings": settings.record(),
              "decoder_passes": passes, "seconds": medians, "all_seconds": runs,
              "fraction_of_floor": medians["floor"] / medians["ais"]}
    if device.type == "cpu":
        cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
        result.update(cpu_seconds=cpu_medians, all_cpu_seconds=cpu,
                      cpu_fraction_of_floor=cpu_medians["floor"] / cpu_medians["ais"])
    return result


def format_ais_benchmark(result: dict[str, Any]) -> str:
    s = result["settings"]
    return (f"AIS, T={s['steps']} L={s['leapfrog_steps']} C={s['chains']} (pilot {s['pilot_steps']}) over "
            f"{result['num_examples']} images: {result['seconds']['ais']:.2f} s against the floor of "
            f"{result['decoder_passes']} bare decoder forward+backward passes, {result['seconds']['floor']:.2f} s: "
            f"{100 * result['fraction_of_floor']:.0f}% of the floor{_cpu_share(result)} ({result['device']})")


def _cpu_share(result: dict[str, Any]) -> str:
    share = result.get("cpu_fraction_of_floor")
    return "" if share is None else f", {100 * share:.0f}% in CPU time"
