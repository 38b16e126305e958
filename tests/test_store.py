"""The run directory contract: atomic creation, round trip, refusal of foreign files."""

import threading

import h5py
import numpy as np
import pytest

from scoretrain.run import store
from scoretrain.errors import RunError


def sample_run(with_scores=True):
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)]
    run = store.Run(attrs=store.base_attrs(1, "numpy", "cpu", 0.13, 0.31, spec=""), weights=weights, k=0.5)
    if with_scores:
        run.scores = [rng.standard_normal(w.shape).astype(np.float32) for w in weights]
        run.masks = [np.abs(s) > 0.5 for s in run.scores]
    for e in (1, 2):
        for key in store.METRICS:
            run.metrics[key].append(e if key == "epoch" else 0.1 * e)
    run.optimizer = {"name": "sgd", "steps": 7, "slots": {"momentum": [np.ones_like(w) for w in weights]}}
    return run


def test_round_trip(tmp_path):
    run = sample_run()
    store.save(tmp_path, run)
    back = store.load(tmp_path, with_optimizer=True)
    assert back.epochs_done == 2 and back.k == 0.5
    for a, b in zip(run.weights + run.scores + run.masks, back.weights + back.scores + back.masks):
        np.testing.assert_array_equal(a, b)
    assert back.metrics == run.metrics
    assert back.optimizer["steps"] == 7 and back.optimizer["name"] == "sgd"
    np.testing.assert_array_equal(back.optimizer["slots"]["momentum"][1], np.ones((3, 5)))
    assert back.attrs["status"] == "running" and back.attrs["format_version"] == store.FORMAT_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["run.h5"]  # no temporary file left behind


def test_file_layout_follows_the_documented_format(tmp_path):
    store.save(tmp_path, sample_run())
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f.attrs["format"] == "scoretrain-run" and f.attrs["format_version"] == 1
        assert list(f["layers"]) == ["00", "01"]
        assert f["layers/00/weight"].shape == (5, 4) and f["layers/00/weight"].dtype == np.float32
        assert f["layers/01/mask"].dtype == np.uint8 and f["layers/01"].attrs["k"] == 0.5
        assert set(f["metrics"]) == set(store.METRICS) and f["metrics/epoch"][()].tolist() == [1, 2]
        for key in ("status", "created", "scoretrain_version", "backend", "device", "seed", "input_mean", "input_std"):
            assert key in f.attrs


def test_dense_run_has_no_scores(tmp_path):
    store.save(tmp_path, sample_run(with_scores=False))
    back = store.load(tmp_path)
    assert back.scores is None and back.masks is None


def test_named_run_is_never_overwritten(tmp_path):
    first = store.create_run_dir(tmp_path, "exp", "x")
    (first / "marker").write_text("keep")
    with pytest.raises(RunError, match="already exists"):
        store.create_run_dir(tmp_path, "exp", "x")
    assert (first / "marker").read_text() == "keep"


def test_generated_names_never_collide_across_threads(tmp_path):
    made = []
    threads = [threading.Thread(target=lambda: made.extend(store.create_run_dir(tmp_path, None, "ep") for _ in range(20))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 160 and len(set(made)) == 160


def test_bad_names_are_refused(tmp_path):
    for bad in ("../escape", "a/b", "", " x"):
        with pytest.raises(RunError):
            store.create_run_dir(tmp_path, bad, "x")


def test_not_a_run_missing_corrupt_and_newer(tmp_path):
    with pytest.raises(RunError, match="no such run directory"):
        store.load(tmp_path / "missing")
    with pytest.raises(RunError, match="not a scoretrain run"):
        store.load(tmp_path)
    (tmp_path / "run.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(RunError, match="corrupt or truncated"):
        store.load(tmp_path)
    store.save(tmp_path, sample_run())
    data = (tmp_path / "run.h5").read_bytes()
    (tmp_path / "run.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match="corrupt or truncated"):
        store.load(tmp_path)
    run = sample_run()
    run.attrs["format_version"] = 99
    store.save(tmp_path, run)
    with pytest.raises(RunError, match="format_version 99 is newer"):
        store.load(tmp_path)


def test_stale_running_status_reads_as_interrupted(tmp_path):
    run = sample_run()
    assert store.live_status(run) == "running"  # this process is alive
    run.attrs["pid"] = 2**22 + 12345  # above the default pid_max: no such process
    assert store.live_status(run) == "interrupted"
    run.attrs["status"] = "completed"
    assert store.live_status(run) == "completed"


def test_every_array_carries_a_checksum_and_bit_rot_names_the_array(tmp_path):
    run = sample_run()
    run.metrics["epoch"], run.metrics["test_acc"] = [1], [0.5]
    run.metrics.update({k: [0.0] for k in store.METRICS if k not in ("epoch", "test_acc")})
    store.save(tmp_path, run)
    with h5py.File(tmp_path / "run.h5", "r") as f:
        arrays = []
        f.visititems(lambda name, obj: arrays.append(obj) if isinstance(obj, h5py.Dataset) else None)
        assert arrays and all(a.fletcher32 for a in arrays), [a.name for a in arrays if not a.fletcher32]
        chunk = f["layers/00/scores"].id.get_chunk_info(0)
    with open(tmp_path / "run.h5", "r+b") as fh:  # one byte of the first layer's scores flipped
        fh.seek(chunk.byte_offset + 5)
        byte = fh.read(1)
        fh.seek(chunk.byte_offset + 5)
        fh.write(bytes([byte[0] ^ 1]))
    store.load_summary(tmp_path)  # the metrics are intact
    with pytest.raises(RunError, match=r"cannot read the array /layers/00/scores \(its checksum does not match"):
        store.load(tmp_path)


@pytest.mark.parametrize("edit,problem", [
    (lambda m: m.update(test_acc=[0.1, 0.2]), "test_acc has 2 values for 1 epochs"),
    (lambda m: m.update(epoch=[3]), "epoch counts [3], not 1 to 1"),
])
def test_metrics_that_are_not_one_row_per_epoch_are_refused(tmp_path, edit, problem):
    run = sample_run()
    run.metrics = {k: [0.5] for k in store.METRICS}
    run.metrics["epoch"] = [1]
    edit(run.metrics)
    store.save(tmp_path, run)
    for read in (store.load, store.load_summary):
        with pytest.raises(RunError, match="inconsistent metrics") as e:
            read(tmp_path)
        assert problem in str(e.value)


def test_folder_kinds_and_a_runs_dir_that_is_not_a_folder_of_runs(tmp_path):
    assert store.folder_kind(tmp_path / "missing") is None and store.folder_kind(tmp_path) is None
    run_dir = store.create_run_dir(tmp_path / "runs", "a", "x")
    store.save(run_dir, sample_run())
    assert store.folder_kind(run_dir) == "a run folder" and store.folder_kind(tmp_path / "runs") == "a folder of runs"
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.yaml").write_text("format: scoretrain-sweep\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    assert store.folder_kind(tmp_path / "s") == "a sweep folder" and store.folder_kind(tmp_path / "d") == "a dataset folder"
    for folder, kind in ((run_dir, "a run folder"), (tmp_path / "s", "a sweep folder"), (tmp_path / "d", "a dataset folder")):
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(RunError, match=f"--runs-dir is {kind}, not a folder of runs"):
            store.create_run_dir(folder, None, "x")
        assert sorted(p.name for p in folder.iterdir()) == before


def test_a_run_that_cannot_start_takes_back_the_folders_made_for_it(tmp_path):
    run_dir = store.create_run_dir(tmp_path / "new" / "deep", None, "x")
    store.remove_unstarted(run_dir)
    assert list(tmp_path.iterdir()) == []
