"""Checkpoint files: safe loading, atomic writes, rotation, skipping corrupt files."""

import os
import pickle

import pytest
import torch

from diffusion.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    check_no_newer_run,
    find_resumable,
    load_checkpoint_file,
    save_run_checkpoint,
    step_checkpoints,
)

STATE = {"config": {"seed": 0}, "weights": torch.arange(4.0)}


class RunsCode:
    """An object whose unpickling would run a shell command."""

    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_checkpoint_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "config": {}, "x": RunsCode()}, path)
    with pytest.raises(CheckpointError, match="not a plain-tensor checkpoint"):
        load_checkpoint_file(path)
    assert not (tmp_path / "pwned_by_checkpoint").exists()


def test_round_trip_and_format_check(tmp_path):
    path = atomic_save({"format_version": FORMAT_VERSION, **STATE}, tmp_path / "a" / "c.pt")
    loaded = load_checkpoint_file(path)
    assert torch.equal(loaded["weights"], STATE["weights"])
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temp file left behind
    atomic_save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this codebase"):
        load_checkpoint_file(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint_file(tmp_path)


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = atomic_save({"format_version": FORMAT_VERSION, **STATE}, tmp_path / "c.pt")
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        atomic_save({"bad": lambda: None}, path)  # a lambda cannot be pickled
    assert torch.equal(load_checkpoint_file(path)["weights"], STATE["weights"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_rotation_keeps_last_k_and_links_last(tmp_path):
    for step in (10, 20, 30, 40):
        save_run_checkpoint({**STATE, "step": step}, tmp_path, step, keep_last=2)
    assert [s for s, _ in step_checkpoints(tmp_path)] == [30, 40]
    assert load_checkpoint_file(tmp_path / "last.pt")["step"] == 40


def test_rotation_never_deletes_the_checkpoint_it_just_wrote(tmp_path):
    """Saving step 500 into a folder holding steps 1000-2000 (another run's) keeps the new file
    and deletes nothing of the other run; check_no_newer_run is what refuses that case."""
    for step in (1000, 1500, 2000):
        save_run_checkpoint({**STATE, "step": step}, tmp_path, step, keep_last=3)
    path = save_run_checkpoint({**STATE, "step": 500}, tmp_path, 500, keep_last=3)
    assert path.exists() and load_checkpoint_file(tmp_path / "last.pt")["step"] == 500
    assert [s for s, _ in step_checkpoints(tmp_path)] == [500, 1000, 1500, 2000]
    with pytest.raises(ValueError, match=r"already holds checkpoints up to step 2000, past this "
                                         r"run's step 500; pass --resume auto"):
        check_no_newer_run(tmp_path, 500)
    check_no_newer_run(tmp_path, 2000)
    check_no_newer_run(tmp_path / "empty", 0)


def test_find_resumable_skips_a_truncated_newest_file(tmp_path):
    for step in (1, 2, 3):
        save_run_checkpoint({**STATE, "step": step}, tmp_path, step, keep_last=5)
    newest = step_checkpoints(tmp_path)[-1][1]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"skipping unusable checkpoint.*step_00000003"):
        path, state = find_resumable(tmp_path)
    assert state["step"] == 2 and path.name == "step_00000002.pt"
    assert find_resumable(tmp_path / "nothing_here") is None
