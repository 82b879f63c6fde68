"""generate --processes N: the same files as one process, resumable, errors as one line."""

import os

import pytest
import torch

from anomalygen import pipeline
from anomalygen.errors import AnomalygenError
from anomalygen.generation.sharding import ShardJob, blocks


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_blocks_deal_every_missing_index_once():
    job = ShardJob("m", "d", None, False, 0, start=3, num=20, block=4, processes=3, defect_type=None,
                   calibration=None, max_attempts=1)
    dealt = [blocks(job, rank) for rank in range(3)]
    assert dealt[0] == [(3, 4), (15, 4)] and dealt[1] == [(7, 4), (19, 1)] and dealt[2] == [(11, 4)]
    indices = sorted(i for shard in dealt for first, count in shard for i in range(first, first + count))
    assert indices == list(range(3, 20))


@pytest.mark.slow
def test_two_processes_write_what_one_writes_and_resume(demo_root, tmp_path):
    data = demo_root / "nut"
    one = pipeline.generate("croppaste", data, tmp_path / "one", 11, seed=4, max_attempts=20)
    two = pipeline.generate("croppaste", data, tmp_path / "two", 11, seed=4, max_attempts=20, processes=2)
    assert two.total == 11 and two.redrawn == one.redrawn and two.rejected == one.rejected
    assert _files(one.out) == _files(two.out)
    # resumed with 2 processes after 5 samples written by one
    pipeline.generate("croppaste", data, tmp_path / "resumed", 5, seed=4, max_attempts=20)
    pipeline.generate("croppaste", data, tmp_path / "resumed", 11, seed=4, max_attempts=20, processes=2)
    assert _files(one.out) == _files(tmp_path / "resumed" / "nut")


@pytest.mark.slow
def test_a_fitted_diffusion_model_shards_identically(demo_root, tmp_path):
    # batches of 3 (generate_batch_size 0: the CPU default, batch_size): the processes' blocks must
    # follow them, since a sample's numbers depend on the batch it is made in
    options = {"model": "tiny", "max_steps": 2, "resolution": 32, "num_inference_steps": 2, "device": "cpu", "batch_size": 3}
    model = pipeline.fit("textual-inversion", demo_root / "nut", tmp_path / "model", options=options)
    one = pipeline.generate(None, demo_root / "nut", tmp_path / "one", 9, checkpoint=model, filter=False)
    two = pipeline.generate(None, demo_root / "nut", tmp_path / "two", 9, checkpoint=model, filter=False, processes=2)
    assert _files(one.out).keys() == _files(two.out).keys()
    assert _files(one.out) == _files(two.out)


def test_the_processes_get_blocks_of_the_generators_batch(demo_root, tmp_path, monkeypatch):
    from anomalygen.methods.croppaste import CropPaste

    class Seen(Exception):
        pass

    def capture(job, generator):
        raise Seen(job.block, job.compile)

    compiled = []  # and compile, an argument to this process's generator and the job's
    monkeypatch.setattr(CropPaste, "compile_unet", lambda self: compiled.append(self.name))
    monkeypatch.setattr(CropPaste, "generation_batch", lambda self: 5)
    monkeypatch.setattr(pipeline, "sharded_samples", capture)
    with pytest.raises(Seen) as seen:
        pipeline.generate("croppaste", demo_root / "nut", tmp_path, 12, processes=2, filter=False, compile=True)
    assert seen.value.args == (5, True) and compiled == ["croppaste"]


def test_a_resumed_run_restarts_at_the_batch_of_its_first_missing_sample(demo_root, tmp_path, monkeypatch):
    """Samples are made in the batches of an uninterrupted run: after 4 of 9 samples in batches of
    3, the resumed run makes 3..8 (and drops sample 3, already written); the files are identical."""
    from anomalygen.methods.croppaste import CropPaste

    monkeypatch.setattr(CropPaste, "generation_batch", lambda self: 3)
    calls = []
    generate = CropPaste.generate

    def spy(self, good, n, **kwargs):
        calls.append((kwargs["start"], n))
        return generate(self, good, n, **kwargs)

    monkeypatch.setattr(CropPaste, "generate", spy)
    whole = pipeline.generate("croppaste", demo_root / "nut", tmp_path / "whole", 9, filter=False)
    pipeline.generate("croppaste", demo_root / "nut", tmp_path / "resumed", 4, filter=False)
    calls.clear()
    resumed = pipeline.generate("croppaste", demo_root / "nut", tmp_path / "resumed", 9, filter=False)
    assert calls == [(3, 6)] and resumed.written == 5
    assert _files(whole.out) == _files(resumed.out)


def test_bad_process_counts_are_one_line_errors(demo_root, tmp_path):
    for bad in (0, 65, True):
        with pytest.raises(AnomalygenError, match=f"^processes {bad}: give a number from 1 to 64"):
            pipeline.generate("croppaste", demo_root / "nut", tmp_path, 2, processes=bad)
    assert not any(tmp_path.iterdir())


def test_a_failing_process_stops_the_run_with_its_error(demo_root, tmp_path, monkeypatch):
    # the model folder the processes load is missing its config: the first process's error ends the run
    from anomalygen.generation import sharding

    monkeypatch.setattr(sharding, "shard_model", lambda generator, folder: str(folder / "nothing"))
    with pytest.raises(AnomalygenError, match="generation process .: .*not a saved anomalygen model"):
        pipeline.generate("croppaste", demo_root / "nut", tmp_path / "out", 4, processes=2)
    assert (tmp_path / "out" / "nut" / "manifest.jsonl").exists() is False or not (tmp_path / "out" / "nut" / "manifest.jsonl").read_text()


def test_a_process_works_in_the_environment_its_job_was_made_in(demo_root, tmp_path, monkeypatch):
    """The processes fork from a server started with the environment of its first use; each takes on
    the caller's environment of the job's making; ``compile`` reaches it as the job's argument."""
    import queue

    from anomalygen.generation import sharding
    from anomalygen.methods.base import AnomalyGenerator, create

    model = tmp_path / "model"
    _, defects, goods = pipeline.load_training(demo_root / "nut")
    generator = create("croppaste")
    generator.fit(defects, goods)
    generator.save(model)
    monkeypatch.setenv("ANOMALYGEN_SETTING", "1")
    job = ShardJob(str(model), str(demo_root / "nut"), None, False, 0, start=0, num=2, block=2, processes=1,
                   defect_type=None, calibration=None, max_attempts=1, compile=True)
    monkeypatch.setenv("ANOMALYGEN_SETTING", "0")  # what the server's environment would be
    compiled = []
    monkeypatch.setattr(AnomalyGenerator, "compile_unet", lambda self: compiled.append(self.name))
    monkeypatch.setenv("LEFT_OVER", "1")
    out, threads = queue.Queue(), torch.get_num_threads()
    try:
        sharding._work(job, 0, out)
    finally:
        torch.set_num_threads(threads)  # (a process sets its share of the cores: not this one's to keep)
    assert os.environ.get("ANOMALYGEN_SETTING") == "1" and "LEFT_OVER" not in os.environ and compiled == ["croppaste"]
    assert [out.get()[0] for _ in range(3)] == ["sample", "sample", "done"]
