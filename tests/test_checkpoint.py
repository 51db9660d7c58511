"""Checkpoint files: safe loading, atomic writes, rotation, skipping corrupt files."""

import dataclasses
import io
import os
import pickle
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch

from diffusion import DiffusionConfig
from diffusion.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    check_no_newer_run,
    check_same_model,
    config_from_checkpoint,
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


def future_format(path):
    """Rewrite a checkpoint in place (hard links see it too) as a newer format version."""
    state = torch.load(path, weights_only=True)
    buffer = io.BytesIO()
    torch.save({**state, "format_version": FORMAT_VERSION + 1}, buffer)
    path.write_bytes(buffer.getvalue())


def test_a_folder_whose_checkpoints_all_fail_to_load_is_refused(tmp_path):
    """Starting from scratch there would overwrite them: the caller must hear about it."""
    for step in (1, 2):
        save_run_checkpoint({**STATE, "step": step}, tmp_path, step, keep_last=5)
    for _, path in step_checkpoints(tmp_path):
        future_format(path)  # last.pt is a second name of step 2: broken with it
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        with pytest.raises(CheckpointError, match=r"none of the 2 checkpoint file\(s\) in .* "
                                                  r"loads .*starting from scratch would overwrite"):
            find_resumable(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_resumable(empty) is None


def test_find_resumable_takes_last_pt_when_it_is_separate(tmp_path):
    """A copied run may hold only last.pt, or a last.pt newer than its step files."""
    copied = tmp_path / "copied"
    save_run_checkpoint({**STATE, "step": 3}, tmp_path, 3, keep_last=5)
    copied.mkdir()
    (copied / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes())
    path, state = find_resumable(copied)
    assert path == copied / "last.pt" and state["step"] == 3
    save_run_checkpoint({**STATE, "step": 1}, copied, 1, keep_last=5)  # links last.pt to step 1
    (copied / "last.pt").unlink()
    (copied / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes())
    path, state = find_resumable(copied)
    assert path == copied / "last.pt" and state["step"] == 3
    future_format(copied / "last.pt")
    with pytest.warns(UserWarning, match="skipping unusable checkpoint.*last.pt"):
        path, state = find_resumable(copied)
    assert path.name == "step_00000001.pt" and state["step"] == 1


def test_a_fresh_run_counts_a_lone_or_broken_last_pt(tmp_path):
    save_run_checkpoint({**STATE, "step": 4}, tmp_path, 4, keep_last=5)
    (tmp_path / "checkpoints" / "step_00000004.pt").unlink()  # last.pt alone
    with pytest.raises(ValueError, match="already holds checkpoints up to step 4, past this "
                                         "run's step 0"):
        check_no_newer_run(tmp_path, 0)
    check_no_newer_run(tmp_path, 4)  # resuming from last.pt itself
    future_format(tmp_path / "last.pt")
    with pytest.raises(ValueError, match="holds a last.pt that does not load"):
        check_no_newer_run(tmp_path, 4)


def test_flipped_bytes_inside_a_tensor_are_caught(tmp_path):
    """torch.load does not check the zip records' CRC-32s; load_checkpoint_file does."""
    path = atomic_save({"format_version": FORMAT_VERSION, **STATE,
                        "weights": torch.zeros(100_000)}, tmp_path / "c.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the 400 kB tensor record
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"truncated, corrupt .*'archive/data/0' fails its "
                                              r"CRC-32 check"):
        load_checkpoint_file(path)


def test_a_stored_config_this_code_refuses_blames_the_checkpoint(tmp_path):
    path = atomic_save({"format_version": FORMAT_VERSION, "config": {"old_field": 1}},
                       tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint '{path}' holds a config this code "
                                              "cannot use: unknown config field"):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match="the checkpoint holds a config this code cannot "
                                              r"use: .*'old_field'"):
        config_from_checkpoint({"config": {"old_field": 1}})


def test_saving_removes_temp_files_a_killed_save_left(tmp_path):
    """A SIGKILL between mkstemp and rename orphans a whole checkpoint's worth of disk."""
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / ".step_00000001.pt.k2j3h4.tmp",
             tmp_path / ".last.pt.x9y8z7.tmp",
             tmp_path / ".last.pt.tmp"]  # a link a kill left: os.link would fail, making a copy
    kept = [tmp_path / "checkpoints" / "notes.tmp", tmp_path / ".step_1.pt.tmp"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    save_run_checkpoint({**STATE, "step": 2}, tmp_path, 2, keep_last=5)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)


def test_atomic_save_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path,
                                                                            monkeypatch):
    """A power cut after the rename must find the new bytes on disk, under the new name."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync file" if stat.S_ISREG(os.fstat(fd).st_mode) else "fsync folder")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_save({"x": torch.zeros(1)}, tmp_path / "c.pt")
    assert events == ["fsync file", "rename", "fsync folder"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_get_the_mode_a_plain_save_would(tmp_path, umask, mode):
    """mkstemp made every checkpoint 0600, unreadable by colleagues on shared storage; the
    files now get open()'s 0666 minus the umask, like torch.save(obj, path)."""
    old = os.umask(umask)
    try:
        path = save_run_checkpoint({**STATE, "step": 1}, tmp_path, 1, keep_last=2)
        torch.save(STATE, tmp_path / "plain.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.pt").stat().st_mode) == mode


def test_the_next_save_removes_the_temp_file_of_a_save_killed_before_its_rename(tmp_path,
                                                                                monkeypatch):
    """atomic_save's temp file sits next to its target (an atomic same-filesystem rename) under
    a name that save_run_checkpoint's stale-temp cleanup recognises."""
    temps = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (temps.append(Path(src)),
                                                          real_replace(src, dst)))
    target = tmp_path / "checkpoints" / "step_00000001.pt"
    atomic_save({"x": torch.zeros(1)}, target)
    monkeypatch.undo()
    (orphan,) = temps
    assert orphan.parent == target.parent
    orphan.write_bytes(b"partial")  # what a SIGKILL between write and rename leaves
    save_run_checkpoint({**STATE, "step": 2}, tmp_path, 2, keep_last=5)
    assert not orphan.exists()


@pytest.mark.parametrize("state", [
    {"config": {}},  # no format_version
    {"format_version": FORMAT_VERSION - 1, "config": {}},  # an older format
    {"format_version": FORMAT_VERSION},  # no config
    torch.zeros(2),  # not a dict at all
])
def test_files_that_are_not_our_checkpoints_are_refused(tmp_path, state):
    path = tmp_path / "c.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="not a checkpoint of this codebase"):
        load_checkpoint_file(path)


def test_a_missing_checkpoint_says_it_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match=r"'.*nope\.pt' does not exist"):
        load_checkpoint_file(tmp_path / "nope.pt")


def test_a_stored_config_with_a_wrong_type_blames_the_checkpoint():
    """A TypeError would escape find_resumable, which skips CheckpointErrors only."""
    with pytest.raises(CheckpointError, match=r"cannot use: seed='x' must be int"):
        config_from_checkpoint({"config": {"seed": "x"}})


# One other valid value for each field that defines the network or its training target.
MODEL_CHANGES = {
    "in_channels": 1, "out_channels": 1, "model_channels": 64, "num_res_blocks": 1,
    "attention_resolutions": (16,), "channel_mult": (1, 2), "num_heads": 4,
    "use_spatial_transformer": False, "transformer_depth": 2, "context_dim": 512,
    "sample_size": 32, "use_scale_shift_norm": False, "pooled_text_conditioning": True,
    "text_encoder_layers": 1, "text_encoder_width": 128, "max_text_length": 32,
    "num_train_timesteps": 500, "beta_start": 0.001, "beta_end": 0.01,
    "beta_schedule": "cosine", "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
}


@pytest.mark.parametrize("name, value", MODEL_CHANGES.items())
def test_resuming_refuses_a_config_whose_model_differs(name, value):
    saved = DiffusionConfig(prediction_type="sample")
    with pytest.raises(ValueError, match=rf"cannot resume: .*{name}: checkpoint "):
        check_same_model(saved, dataclasses.replace(saved, **{name: value}))


def test_resuming_accepts_changes_outside_the_model():
    """Fine-tuning with another learning rate, loss weighting or length is a resume."""
    saved = DiffusionConfig()
    check_same_model(saved, dataclasses.replace(
        saved, learning_rate=3e-4, snr_gamma=None, max_steps=5, batch_size=2, seed=1,
        output_dir="elsewhere"))


@pytest.mark.parametrize("keep_last", [1, 2, 5])
def test_rotation_keeps_exactly_the_newest_keep_last(tmp_path, keep_last):
    for step in range(1, 8):
        save_run_checkpoint({**STATE, "step": step}, tmp_path, step, keep_last=keep_last)
        assert [s for s, _ in step_checkpoints(tmp_path)] == \
            list(range(max(1, step - keep_last + 1), step + 1))


def test_rotation_ignores_files_that_only_start_like_step_checkpoints(tmp_path):
    """A researcher's backup copy next to the step files is neither pruned nor resumed from."""
    save_run_checkpoint({**STATE, "step": 1}, tmp_path, 1, keep_last=1)
    backup = tmp_path / "checkpoints" / "step_00000001.pt.bak"
    shutil.copy(tmp_path / "checkpoints" / "step_00000001.pt", backup)
    save_run_checkpoint({**STATE, "step": 2}, tmp_path, 2, keep_last=1)
    assert backup.exists()
    assert [p.name for _, p in step_checkpoints(tmp_path)] == ["step_00000002.pt"]


def test_last_pt_is_a_copy_where_hard_links_fail(tmp_path, monkeypatch):
    def no_hard_links(src, dst):
        raise OSError("hard links are not supported here")

    monkeypatch.setattr(os, "link", no_hard_links)
    for step in (1, 2):
        save_run_checkpoint({**STATE, "step": step}, tmp_path, step, keep_last=5)
    assert load_checkpoint_file(tmp_path / "last.pt")["step"] == 2
    path, state = find_resumable(tmp_path)
    assert state["step"] == 2 and path.name == "step_00000002.pt"  # a tie: the step file


def test_a_fresh_run_counts_step_files_newer_than_a_separate_last_pt(tmp_path):
    for step in (3, 5):
        save_run_checkpoint({**STATE, "step": step}, tmp_path, step, keep_last=5)
    (tmp_path / "last.pt").unlink()
    shutil.copy(tmp_path / "checkpoints" / "step_00000003.pt", tmp_path / "last.pt")
    with pytest.raises(ValueError, match="already holds checkpoints up to step 5"):
        check_no_newer_run(tmp_path, 4)


def test_find_resumable_stops_at_the_newest_file_that_loads(tmp_path):
    """Older checkpoints (gigabytes each) are neither loaded nor reported."""
    for step in (1, 2, 3):
        save_run_checkpoint({**STATE, "step": step}, tmp_path, step, keep_last=5)
    step_checkpoints(tmp_path)[0][1].write_bytes(b"not a checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path, state = find_resumable(tmp_path)
    assert state["step"] == 3


def test_a_lone_last_pt_that_does_not_load_is_refused(tmp_path):
    """Returning None there would let a fresh run start over the only checkpoint."""
    save_run_checkpoint({**STATE, "step": 4}, tmp_path, 4, keep_last=5)
    (tmp_path / "checkpoints" / "step_00000004.pt").unlink()
    future_format(tmp_path / "last.pt")
    with pytest.warns(UserWarning, match="skipping unusable checkpoint.*last.pt"):
        with pytest.raises(CheckpointError, match=r"none of the 1 checkpoint file\(s\)"):
            find_resumable(tmp_path)
