"""The writer: atomic files, MVTec layout, manifest, resume after a kill, refusal, overwrite."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from anomalygen.errors import AnomalygenError, DataError
from anomalygen.generation.writer import MAX_SAMPLES, NAME_WIDTH, SampleWriter
from anomalygen.io import (
    LOCK_FILE,
    MANIFEST,
    atomic_write_text,
    encode_png,
    folder_lock,
    os_error,
    read_manifest,
    save_png,
)
from anomalygen.types import AnomalySample
from anomalygen.visualize import Section, grid, overlay, write_html

from tests.helpers.cli_harness import lock_held_elsewhere

RUN = {"method": "fake", "seed": 3, "config": {"a": 1}}


def fake_sample(seed: int, index: int) -> AnomalySample:
    rng = np.random.default_rng([seed, index])
    image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    mask = np.zeros((12, 16), bool)
    mask[index % 10 : index % 10 + 2, 3:7] = True
    return AnomalySample(image, mask, ["scratch", "hole"][index % 2], prompt=f"p{index}", meta={"i": index})


def write_run(out, n: int, *, fail_after: int | None = None, run=RUN, overwrite=False) -> SampleWriter:
    with SampleWriter(out, "cat", run, overwrite=overwrite) as writer:
        for i in range(writer.done, n):
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt("simulated kill")
            writer.add(fake_sample(run["seed"], i), source=f"good/{i}.png")
    return writer


def done(out, run=RUN) -> int:
    with SampleWriter(out, "cat", run) as writer:
        return writer.done


def tree_bytes(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_manifest(tmp_path):
    writer = write_run(tmp_path, 4)
    root = tmp_path / "cat"
    assert writer.done == 4
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == [
        "ground_truth/hole/000001_mask.png",
        "ground_truth/hole/000003_mask.png",
        "ground_truth/scratch/000000_mask.png",
        "ground_truth/scratch/000002_mask.png",
        "test/hole/000001.png",
        "test/hole/000003.png",
        "test/scratch/000000.png",
        "test/scratch/000002.png",
    ]
    entries = read_manifest(root / MANIFEST)
    assert [e["index"] for e in entries] == [0, 1, 2, 3]
    assert entries[1] == {
        "index": 1,
        "image": "test/hole/000001.png",
        "mask": "ground_truth/hole/000001_mask.png",
        "method": "fake",
        "seed": 3,
        "source": "good/1.png",
        "defect_type": "hole",
        "prompt": "p1",
        "meta": {"i": 1},
    }
    mask = np.asarray(Image.open(root / entries[1]["mask"]))
    assert set(np.unique(mask)) == {0, 255}
    np.testing.assert_array_equal(mask > 0, fake_sample(3, 1).mask)
    np.testing.assert_array_equal(np.asarray(Image.open(root / entries[1]["image"])), fake_sample(3, 1).image)
    assert json.loads((root / "run.json").read_text()) == RUN
    # Atomic writes keep the permissions a plain open() gives (not mkstemp's private 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in root.rglob("*") if p.is_file()} == {0o666 & ~umask}


@pytest.mark.parametrize("kill_at", [0, 1, 5])
def test_resume_after_kill_is_byte_identical(tmp_path, kill_at):
    write_run(tmp_path / "whole", 7)
    with pytest.raises(KeyboardInterrupt):
        write_run(tmp_path / "killed", 7, fail_after=kill_at)
    assert done(tmp_path / "killed") == kill_at
    write_run(tmp_path / "killed", 7)
    assert tree_bytes(tmp_path / "killed") == tree_bytes(tmp_path / "whole")


def test_resume_drops_torn_line_missing_files_and_partials(tmp_path):
    write_run(tmp_path / "whole", 6)
    write_run(tmp_path / "broken", 5)
    root = tmp_path / "broken" / "cat"
    (root / "test" / "scratch" / "000004.png").unlink()  # sample 4 lost its image
    with open(root / MANIFEST, "a") as handle:  # a torn append
        handle.write('{"index": 5, "ima')
    (root / "test" / "hole" / ".000005.png.abc.partial").write_bytes(b"\x89PNG torn")
    assert done(tmp_path / "broken") == 4
    assert not list(root.rglob("*.partial"))
    write_run(tmp_path / "broken", 6)
    assert tree_bytes(tmp_path / "broken") == tree_bytes(tmp_path / "whole")
    assert len(read_manifest(root / MANIFEST)) == 6


def test_complete_run_is_left_alone_and_extends(tmp_path):
    write_run(tmp_path, 3)
    before = tree_bytes(tmp_path)
    assert write_run(tmp_path, 3).done == 3
    assert tree_bytes(tmp_path) == before
    assert write_run(tmp_path, 5).done == 5


def test_different_run_refused_unless_overwrite(tmp_path):
    write_run(tmp_path, 3)
    other = {**RUN, "seed": 4}
    with pytest.raises(AnomalygenError, match=r"different run \(seed: 3 there, 4 now\).*`overwrite`"):
        SampleWriter(tmp_path, "cat", other)
    writer = write_run(tmp_path, 2, run=other, overwrite=True)
    assert writer.done == 2
    assert len(list((tmp_path / "cat").rglob("*.png"))) == 4
    assert read_manifest(tmp_path / "cat" / MANIFEST)[0]["seed"] == 4


def test_a_run_json_from_before_outside_mask_was_recorded_resumes_and_gains_it(tmp_path):
    write_run(tmp_path, 2)  # RUN has no outside_mask: as written by the previous version
    now = {**RUN, "outside_mask": "kept"}
    assert write_run(tmp_path, 4, run=now).done == 4
    assert json.loads((tmp_path / "cat" / "run.json").read_text())["outside_mask"] == "kept"
    with pytest.raises(AnomalygenError, match="different run"):  # a recorded value that differs still refuses
        SampleWriter(tmp_path, "cat", {**RUN, "outside_mask": "none"})


def test_foreign_folder_is_never_written(tmp_path):
    real = tmp_path / "cat" / "test" / "crack"
    real.mkdir(parents=True)
    (real / "000.png").write_bytes(b"real data")
    for overwrite in (False, True):
        with pytest.raises(AnomalygenError, match="did not write"):
            SampleWriter(tmp_path, "cat", RUN, overwrite=overwrite)
    assert (real / "000.png").read_bytes() == b"real data"


def test_corrupt_manifest_middle_line_is_an_error(tmp_path):
    atomic_write_text(tmp_path / MANIFEST, '{"index": 0}\nnot json\n{"index": 2}\n')
    with pytest.raises(DataError, match="corrupt \\(line 2 is not valid JSON"):
        read_manifest(tmp_path / MANIFEST)


def test_bad_defect_type_name(tmp_path):
    sample = fake_sample(0, 0)
    sample.defect_type = "../escape"
    with SampleWriter(tmp_path, "cat", RUN) as writer, pytest.raises(AnomalygenError, match="folder name"):
        writer.add(sample)
    assert writer.done == 0


def test_overlay_and_grid():
    image = np.full((10, 10, 3), 100, np.uint8)
    mask = np.zeros((10, 10), bool)
    mask[2:7, 2:7] = True
    out = overlay(image, mask, color=(255, 0, 0), alpha=0.5)
    assert (out[~mask] == 100).all()
    assert tuple(out[4, 4]) == (178, 50, 50)  # inside: 0.5 * 100 + 0.5 * colour
    assert tuple(out[2, 2]) == (255, 0, 0)  # outline
    picture = grid([[image, mask], [None, out]], ["good", "mask"], cell=20, pad=2)
    assert picture.shape == (18 + 2 * 22 + 2, 2 * 22 + 2, 3)
    assert (picture[18 + 2 + 5, 2 + 5] == 100).all()  # first cell: the grey image (centred, never upscaled)
    whole = grid([[np.ones((20, 20), bool), None]], cell=20, pad=2)  # a mask covering everything vs an empty cell
    assert (whole[2:22, 2:22] == 255).all() and (whole[2:22, 24:44] == 255).all()
    assert (whole[1, 1:23] == 160).all() and (whole[1:23, 22] == 160).all()  # only the tile is framed
    assert (whole[1, 24:45] == 255).all()
    labelled = grid([[image], [image]], row_labels=["a/b", "c"], cell=20, pad=2)
    assert labelled.shape == (2 * 22 + 2, 6 * 3 + 2 + 22 + 2, 3)
    assert (labelled[2:20, :20] < 128).any()  # the label's dark pixels


def test_write_html_embeds_and_links(tmp_path):
    image = np.zeros((4, 4, 3), np.uint8)
    save_png(tmp_path / "pics" / "a.png", image)
    sections = [
        Section("Grid <1>", text="x & y", images=[("gen", image), ("file", tmp_path / "pics" / "a.png")]),
        Section("Numbers", table=[{"metric": "IS", "value": 1.23456}]),
    ]
    page = write_html(tmp_path / "report.html", "Report", sections).read_text()
    assert "data:image/png;base64," in page and "src='pics/a.png'" in page
    assert "Grid &lt;1&gt;" in page and "x &amp; y" in page and "<td>1.235</td>" in page
    linked = write_html(tmp_path / "linked.html", "R", sections[:1], embed=False).read_text()
    assert "src='linked_files/s00_000.png'" in linked
    assert (tmp_path / "linked_files" / "s00_000.png").is_file()


@given(st.integers(0, MAX_SAMPLES - 1), st.integers(0, MAX_SAMPLES - 1))
def test_sample_names_sort_like_their_indices(a, b):
    """anomalib pairs images and masks by sorted name: names must sort as the indices do, at any count."""
    writer = object.__new__(SampleWriter)  # paths() needs only the name width
    writer.width = NAME_WIDTH
    (image_a, mask_a), (image_b, mask_b) = writer.paths(a, "t"), writer.paths(b, "t")
    assert (image_a.name < image_b.name) == (a < b) == (mask_a.name < mask_b.name)
    assert mask_a.name == image_a.stem + "_mask.png"


def _to_legacy_names(root):
    """Rename a run's files to the three-digit names of earlier versions, as they would have written it."""
    lines = []
    for entry in read_manifest(root / MANIFEST):
        for key in ("image", "mask"):
            old = entry[key].replace(f"{entry['index']:06d}", f"{entry['index']:03d}")
            (root / entry[key]).rename(root / old)
            entry[key] = old
        lines.append(json.dumps(entry, sort_keys=True) + "\n")
    atomic_write_text(root / MANIFEST, "".join(lines))


def test_legacy_three_digit_folder_keeps_its_names(tmp_path):
    write_run(tmp_path / "whole", 5)
    _to_legacy_names(tmp_path / "whole" / "cat")
    write_run(tmp_path / "old", 3)
    _to_legacy_names(tmp_path / "old" / "cat")
    assert write_run(tmp_path / "old", 5).done == 5  # resumed: 003.png, 004.png
    assert tree_bytes(tmp_path / "old") == tree_bytes(tmp_path / "whole")
    assert (tmp_path / "old" / "cat" / "test" / "hole" / "003.png").is_file()
    assert write_run(tmp_path / "new", 1).paths(7, "hole")[0].name == "000007.png"


def _lock_from_another_process(folder) -> subprocess.CompletedProcess:
    code = "import sys; from anomalygen.io import folder_lock\nwith folder_lock(sys.argv[1], 'fit'): print('got it')"
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)


def test_folder_lock_refuses_a_second_process_and_frees_on_exit(tmp_path):
    with folder_lock(tmp_path / "w", "generate"):
        with folder_lock(tmp_path / "w", "generate"):  # nested in one process: no-op
            pass
        other = _lock_from_another_process(tmp_path / "w")
        assert other.returncode != 0 and "got it" not in other.stdout
        assert f"{tmp_path / 'w'}: in use by another anomalygen generate (pid {os.getpid()} on " in other.stderr
        assert socket.gethostname() in other.stderr
        (tmp_path / "w" / "written").write_text("a result")
    assert (tmp_path / "w" / LOCK_FILE).read_bytes() == b""
    assert _lock_from_another_process(tmp_path / "w").stdout == "got it\n"


def test_a_job_that_writes_nothing_leaves_nothing_of_its_making(tmp_path):
    """The lock file and the folders the lock created go when nothing else was written, whether the
    job failed or not; a folder that was there before stays, and so does anything written."""
    (tmp_path / "kept").mkdir()
    with pytest.raises(AnomalygenError, match="refused"):
        with folder_lock(tmp_path / "new" / "deeper" / "cat", "fit"):
            raise AnomalygenError("refused")
    with folder_lock(tmp_path / "kept", "fit"):
        pass
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]
    with folder_lock(tmp_path / "kept" / "a" / "b", "fit"):
        (tmp_path / "kept" / "a" / "b" / "model.json").write_text("{}")
    assert (tmp_path / "kept" / "a" / "b" / LOCK_FILE).read_bytes() == b""
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / LOCK_FILE).write_text('{"pid": 1}')  # a killed holder's: not this job's making
    with folder_lock(tmp_path / "stale", "fit"):
        pass
    assert (tmp_path / "stale" / LOCK_FILE).read_bytes() == b""


def test_a_lock_taken_on_a_file_removed_meanwhile_is_taken_again(tmp_path, monkeypatch):
    """Between our open and our flock the previous holder may remove its lock file as it leaves:
    the lock is then taken on the file that is there now, so two jobs never hold one folder."""
    import fcntl

    from anomalygen import io as io_module

    folder, calls, real_flock = tmp_path / "w", [], fcntl.flock
    folder.mkdir()
    (folder / "result").write_text("kept")

    def flock(fd, operation):
        calls.append(os.fstat(fd).st_ino)
        if len(calls) == 1:
            (folder / LOCK_FILE).unlink()  # the previous holder leaving
        real_flock(fd, operation)

    monkeypatch.setattr(io_module.fcntl, "flock", flock)
    with folder_lock(folder, "generate"):
        assert len(calls) == 2 and calls[1] == os.stat(folder / LOCK_FILE).st_ino
        assert _lock_from_another_process(folder).returncode != 0


def test_a_holder_caught_before_writing_its_record_is_still_named(tmp_path):
    """Between a holder's flock and its record there is a moment with an empty record: the refused
    one reads it again and names the holder."""
    import fcntl
    import threading

    folder = tmp_path / "w"
    folder.mkdir()
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, its record not written yet
    record = json.dumps({"what": "fit", "pid": 4242, "host": "h", "started": "then", "command": "c"}).encode()
    writer = threading.Timer(0.1, lambda: os.pwrite(fd, record, 0))
    writer.start()
    try:
        with pytest.raises(AnomalygenError, match=r"in use by another anomalygen fit \(pid 4242 on h"):
            with folder_lock(folder, "generate"):
                pass
    finally:
        writer.join()
        os.close(fd)


def test_folder_lock_survives_kill_9(tmp_path):
    """flock dies with its process: a holder killed with SIGKILL leaves a record but no lock."""
    with lock_held_elsewhere(tmp_path, "fit") as holder:
        assert f"pid {holder.pid}" in _lock_from_another_process(tmp_path).stderr
    assert b'"pid"' in (tmp_path / LOCK_FILE).read_bytes()  # the stale record
    assert _lock_from_another_process(tmp_path).stdout == "got it\n"


def test_writer_refuses_links_inside_its_folder(tmp_path):
    write_run(tmp_path / "out", 2)
    outside = tmp_path / "outside"
    (tmp_path / "out" / "cat" / "test").rename(outside)
    (tmp_path / "out" / "cat" / "test").symlink_to(outside)
    before = tree_bytes(outside)
    for overwrite in (False, True):
        with pytest.raises(DataError, match=r"cat/test: is a symbolic link \(to .*outside\)"):
            write_run(tmp_path / "out", 3, overwrite=overwrite)
    assert tree_bytes(outside) == before


def test_failed_clear_out_is_an_error(tmp_path, monkeypatch):
    write_run(tmp_path, 2)
    def rmtree(path, ignore_errors=False):  # a folder that cannot be deleted; ignore_errors hides it
        if not ignore_errors:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(DataError, match="cat/test: permission denied"):
        SampleWriter(tmp_path, "cat", {**RUN, "seed": 9}, overwrite=True)


@pytest.mark.parametrize("line, problem", [
    ('[1, 2]', "line 1 is not a JSON object"),
    ('"text"', "line 1 is not a JSON object"),
    (None, "sample 0: image None, expected 'test/scratch/000000.png'"),
    ("../../../etc/passwd", "sample 0: image '../../../etc/passwd'"),
])
def test_tampered_manifest_line_is_corrupt(tmp_path, line, problem):
    write_run(tmp_path, 2)
    manifest = tmp_path / "cat" / MANIFEST
    entries = manifest.read_text().splitlines()
    first = json.loads(entries[0])
    entries[0] = line if line in ('[1, 2]', '"text"') else json.dumps({**first, "image": line})
    manifest.write_text("\n".join(entries) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{manifest}: corrupt ({problem}")):
        SampleWriter(tmp_path, "cat", RUN)


def test_disk_full_names_the_count_and_keeps_what_was_written(tmp_path, monkeypatch):
    import anomalygen.io

    write_run(tmp_path, 2)
    before = tree_bytes(tmp_path)

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(anomalygen.io, "atomic_write_bytes", full)
    with pytest.raises(DataError, match=r"cat: disk full after 2 samples; free space and re-run to resume"):
        write_run(tmp_path, 3)
    assert tree_bytes(tmp_path) == before


def test_os_error_names_the_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    error = FileNotFoundError(errno.ENOTDIR, "Not a directory", str(tmp_path / "f" / "a" / "b"))
    assert str(os_error(error)) == f"{tmp_path / 'f'}: not a folder (a file is in the way)"
    assert str(os_error(OSError(errno.EROFS, "x", "/p"))) == "/p: read-only file system"
    assert str(os_error(OSError(errno.ENOSPC, "x"))) == "disk full"


@given(st.integers(0, 2**32 - 1))
def test_png_is_lossless_at_zlib_level_3(seed):
    """Level 3 (benchmarks/png_speed.py: ~3x faster than PIL's 6 on 256 px images), bytes that read back exactly."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (int(rng.integers(1, 40)), int(rng.integers(1, 40)), 3), dtype=np.uint8)
    mask = rng.random(image.shape[:2]) < 0.3
    for array, expected in ((image, image), (mask, mask.astype(np.uint8) * 255)):
        data = encode_png(array)
        buffer = io.BytesIO()
        Image.fromarray(expected).save(buffer, format="PNG", compress_level=3)
        assert data == buffer.getvalue()
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), expected)
