"""Generation sharded over processes (``generate --processes N``): one per GPU, or CPU processes.

Sample ``i`` depends only on the run's seed and ``i`` (``seeding.sample_rng``), so the indices can be
made anywhere. The still-missing indices are cut into blocks of ``block`` samples (one batched
``generate`` call each), dealt to the processes in turn (block ``j`` to process ``j mod N``). Each
process (forked from a server that imported the libraries once, with the caller's environment) loads
the fitted model from a saved folder, reads the good images itself, makes (and, with the filter, checks
and redraws) its samples and sends them back; this process writes them in index order
through the one ``SampleWriter``, so the output, its manifest and resume are exactly those of a
one-process run. Process ``k`` uses ``cuda:k mod (number of GPUs)``, or its share of the CPU cores.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queues
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from anomalygen.errors import AnomalygenError
from anomalygen.types import AnomalySample


@dataclass(frozen=True)
class ShardJob:
    """What every process needs: the saved model, the data, and which samples to make."""

    model: str | None  # a saved model folder; None: ``sharded_samples`` saves the generator it is given
    data: str
    category: str | None
    skip_bad: bool
    seed: int
    start: int
    num: int
    block: int
    processes: int
    defect_type: str | None
    calibration: Any  # generation.validity.Calibration with the filter on, else None
    max_attempts: int
    keep_failing: bool = False
    give_up_after: int = 0  # generation.redraw.DrawBudget's, per process
    label: str = ""  # the run's name in errors (method category/type)
    compile: bool = False  # pipeline.generate's: a torch.compile'd UNet
    environment: dict[str, str] = field(default_factory=lambda: dict(os.environ))  # the caller's, at the job's making


def blocks(job: ShardJob, rank: int) -> list[tuple[int, int]]:
    """(first index, count) of the blocks process ``rank`` makes."""
    firsts = range(job.start, job.num, job.block)
    return [(first, min(job.block, job.num - first)) for j, first in enumerate(firsts) if j % job.processes == rank]


def _work(job: ShardJob, rank: int, out: mp.Queue) -> None:
    """One process: make its blocks and send ``("sample", index, sample)``, then ``("done", rank, None)``."""
    os.environ.clear()  # the forkserver's environment is the one it started with
    os.environ.update(job.environment)
    try:
        import torch

        from anomalygen.data import load_training
        from anomalygen.generation.redraw import draw_budget, filtered
        from anomalygen.methods.base import AnomalyGenerator

        if torch.cuda.is_available():
            torch.cuda.set_device(rank % torch.cuda.device_count())
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.processes))
        generator = AnomalyGenerator.load(job.model)
        if job.compile:
            generator.compile_unet()
        _, _, goods = load_training(job.data, job.category, skip_bad=job.skip_bad)
        budget = draw_budget(job.max_attempts, job.keep_failing, job.give_up_after, job.label)
        for first, count in blocks(job, rank):
            made = generator.generate(goods, count, seed=job.seed, start=first, defect_type=job.defect_type)
            if job.calibration is not None:
                made = filtered(made, generator, goods, job.calibration, job.seed, first, job.defect_type,
                                job.max_attempts, budget)
            for index, sample in enumerate(made, first):
                out.put(("sample", index, sample))
        out.put(("done", rank, None))
    except Exception as error:  # sent back as one line; the parent stops the others
        out.put(("error", rank, str(error) if isinstance(error, AnomalygenError) else f"{type(error).__name__}: {error}"))


def sharded_samples(job: ShardJob, generator: Any) -> Iterator[AnomalySample]:
    """The samples ``job.start`` .. ``job.num - 1`` in index order, made by ``job.processes`` processes
    from the model at ``job.model``, or, when that is None, from ``generator`` saved to a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        if job.model is None:
            job = replace(job, model=shard_model(generator, Path(folder)))
        yield from _collect(job)


def _collect(job: ShardJob) -> Iterator[AnomalySample]:
    context = _context()
    results = context.Queue()
    workers = [context.Process(target=_work, args=(job, rank, results), daemon=True) for rank in range(job.processes)]
    for worker in workers:
        worker.start()
    waiting: dict[int, AnomalySample] = {}
    done: set[int] = set()
    try:
        for index in range(job.start, job.num):
            while index not in waiting:
                try:
                    kind, key, value = results.get(timeout=1.0)
                except queues.Empty:
                    dead = [rank for rank, w in enumerate(workers) if rank not in done and not w.is_alive()]
                    if dead:
                        raise AnomalygenError(f"generation process {dead[0]} died (exit code {workers[dead[0]].exitcode}) "
                                              "before sending its samples; re-run to resume") from None
                    continue
                if kind == "error":
                    raise AnomalygenError(f"generation process {key}: {value}")
                if kind == "done":
                    done.add(key)
                    if len(done) == len(workers) and index not in waiting:
                        raise AnomalygenError(f"every generation process ended without sample {index}")
                else:
                    waiting[key] = value
            yield waiting.pop(index)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join()


def _context() -> mp.context.BaseContext:
    """Processes forked from a server that imported torch and the package once (CUDA, not yet
    initialised there, is safe), not each importing them again; spawned where there is no forkserver."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "diffusers", "transformers", "anomalygen.data", "anomalygen.generation.redraw",
                                    "anomalygen.generation.sharding", "anomalygen.methods"])
    return context


def shard_model(generator: Any, folder: Path) -> str:
    """``generator`` saved to ``folder``, for the processes to load."""
    generator.save(folder)
    return str(folder)
