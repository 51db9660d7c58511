"""`python train.py` end to end: artefacts, exact resume, SIGKILL and SIGTERM, bad arguments."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from PIL import Image

from diffusion.checkpoint import FORMAT_VERSION
from diffusion.data import DATA_ORDER

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CPU_ONLY = {**ENV, "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU, on a GPU machine too


def write_config(tmp_path, **overrides) -> Path:
    fields = dict(output_dir=str(tmp_path / "run"), dataset="shapes", log_every=1,
                  save_every=2, sample_every=1000, keep_last=10, dropout=0.1, use_ema=True,
                  ema_decay=0.9)
    config = tiny_config(**{**fields, **overrides})
    path = tmp_path / "tiny.yaml"
    config.to_yaml(path)
    return path


def train(*args, check=True, timeout=300, env=ENV):
    result = subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def load(path):
    return torch.load(path, weights_only=True)


def test_shapes_config_writes_every_artefact(tmp_path):
    run = tmp_path / "shapes"
    train("--config", "configs/shapes.yaml", "--max-steps", 20, "--set",
          f"output_dir={run}", "log_every=5", "save_every=10", "sample_every=10")
    assert (run / "config.yaml").exists() and (run / "last.pt").exists()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [5, 10, 15, 20]
    for m in lines:
        assert {"step", "loss", "lr", "grad_norm", "it_s", "images_s"} <= m.keys()
        assert m["loss"] > 0 and m["it_s"] > 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["step_00000010.pt", "step_00000020.pt"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == \
        ["step_00000010.png", "step_00000020.png"]
    state = load(run / "last.pt")
    assert state["step"] == 20 and state["config"]["max_steps"] == 20


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU"))])
def test_resume_through_the_script_is_bitwise_exact(tmp_path, device):
    """On the CPU as configured; on CUDA with deterministic: true (without it, a resumed run
    differed from the straight one in the last bits on an H100)."""
    config = write_config(tmp_path, max_steps=4, deterministic=device == "cuda")
    env = CPU_ONLY if device == "cpu" else ENV
    result = train("--config", config, env=env)
    assert f"training on {device}" in result.stderr
    straight = load(tmp_path / "run" / "last.pt")
    half = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(half, resumed_dir / "checkpoints" / half.name)
    result = train("--config", config, "--set", f"output_dir={resumed_dir}", "--resume", "auto",
                   env=env)
    assert "resuming from" in result.stderr and "since the checkpoint" not in result.stderr
    assert load(half)["extra"]["data_order"] == DATA_ORDER  # so a later rule can tell
    resumed = load(resumed_dir / "last.pt")
    assert resumed["step"] == straight["step"] == 4
    for key in ("model", "text_encoder"):
        for name, value in straight[key].items():  # tensors, and the tokenizer's state
            same = torch.equal(resumed[key][name], value) if isinstance(value, torch.Tensor) \
                else resumed[key][name] == value
            assert same, (key, name)
    for name, value in straight["ema"]["shadow"].items():
        assert torch.equal(resumed["ema"]["shadow"][name], value), name
    for index, value in straight["optimizer"]["state"].items():
        for k in value:
            assert torch.equal(resumed["optimizer"]["state"][index][k], value[k])


def wait_for(predicate, process, timeout=120):
    start = time.time()
    while not predicate():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.2)


def checkpoints(run):
    folder = run / "checkpoints"
    return sorted(folder.glob("step_*.pt")) if folder.exists() else []


def test_sigkill_then_resume_skips_a_truncated_checkpoint(tmp_path):
    config = write_config(tmp_path, max_steps=10_000)
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "train.py", "--config", str(config)], cwd=ROOT,
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for(lambda: len(checkpoints(run)) >= 3, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    saved = checkpoints(run)
    newest, previous = saved[-1], saved[-2]
    newest.write_bytes(newest.read_bytes()[:1000])  # a half-written file
    previous_step = load(previous)["step"]
    result = train("--config", config, "--resume", "auto", "--max-steps", previous_step + 2)
    assert "skipping unusable checkpoint" in result.stderr and newest.name in result.stderr
    assert f"resuming from {previous}" in result.stderr
    assert load(run / "last.pt")["step"] == previous_step + 2


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    config = write_config(tmp_path, max_steps=10_000, save_every=1000)
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "train.py", "--config", str(config)], cwd=ROOT,
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "stopped by signal" in stderr
    assert load(run / "last.pt")["step"] >= 3


def test_signal_inside_an_accumulation_window_stops_at_its_end(tmp_path, monkeypatch):
    """SIGTERM after micro-batch 3 of windows of 2: the run finishes micro-batch 4 (the
    window's update), then saves a checkpoint with no half-accumulated gradients."""

    from diffusion.trainer import AdvancedDiffusionTrainer

    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = write_config(tmp_path, max_steps=100, gradient_accumulation_steps=2,
                          save_every=1000)
    train_step, calls = AdvancedDiffusionTrainer.train_step, []

    def step_then_signal(self, batch):
        metrics = train_step(self, batch)
        calls.append(metrics["updated"])
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(AdvancedDiffusionTrainer, "train_step", step_then_signal)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert script.main(["--config", str(config)]) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert calls == [False, True, False, True]
    state = load(tmp_path / "run" / "last.pt")
    assert state["step"] == 2 and state["counters"]["micro_step"] == 4
    assert state["accumulation_window"] is None


def test_a_run_never_mixes_into_another_runs_folder(tmp_path):
    """A fresh run into a folder with checkpoints, or a resume from an older checkpoint of it,
    would interleave two runs (and rotation would prune one): both are refused, nothing is
    written, and --resume auto continues the run."""
    config = write_config(tmp_path, max_steps=4, save_every=2)
    train("--config", config)
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in sorted((run / "checkpoints").iterdir())}
    metrics = (run / "metrics.jsonl").read_text()
    fresh = train("--config", config, "--max-steps", 6, check=False)
    assert fresh.returncode != 0
    assert "already holds checkpoints up to step 4, past this run's step 0" in fresh.stderr
    older = train("--config", config, "--max-steps", 6, "--resume",
                  run / "checkpoints" / "step_00000002.pt", check=False)
    assert older.returncode != 0 and "past this run's step 2" in older.stderr
    assert {p.name: p.read_bytes() for p in sorted((run / "checkpoints").iterdir())} == before
    assert (run / "metrics.jsonl").read_text() == metrics
    train("--config", config, "--max-steps", 6, "--resume", "auto")
    assert load(run / "last.pt")["step"] == 6


def test_resume_rewrites_metrics_past_the_checkpoint(tmp_path):
    """A run killed after logging steps 3-4 but before saving step 4 logs them again on
    resume: metrics.jsonl keeps one line per step (a line cut short by the kill is dropped)."""
    config = write_config(tmp_path, max_steps=4, save_every=2)
    train("--config", config)
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004.pt").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    train("--config", config, "--resume", "auto", "--max-steps", 4)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_with_another_model_is_a_clear_error(tmp_path):
    config = write_config(tmp_path, max_steps=2)
    train("--config", config)
    result = train("--config", config, "--set", "model_channels=32", "--resume", "auto",
                   check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "train.py: cannot resume: the checkpoint's model differs from the config in " \
           "model_channels: checkpoint 16 vs config 32" in result.stderr


def test_folders_with_unloadable_or_lone_last_checkpoints_are_never_overwritten(tmp_path):
    """A copied run holding only last.pt resumes from it and refuses a fresh run; a run whose
    files all fail to load (here: a newer format version) refuses --resume auto and a fresh
    run alike, and nothing in the folder changes."""
    config = write_config(tmp_path, max_steps=4, save_every=2)
    train("--config", config)
    run, copy = tmp_path / "run", tmp_path / "copy"
    copy.mkdir()
    shutil.copy(run / "last.pt", copy / "last.pt")
    fresh = train("--config", config, "--set", f"output_dir={copy}", "--max-steps", 6,
                  check=False)
    assert fresh.returncode != 0 and "Traceback" not in fresh.stderr
    assert "already holds checkpoints up to step 4, past this run's step 0" in fresh.stderr
    resumed = train("--config", config, "--set", f"output_dir={copy}", "--resume", "auto",
                    "--max-steps", 6)
    assert f"resuming from {copy / 'last.pt'}" in resumed.stderr
    assert load(copy / "last.pt")["step"] == 6
    for path in checkpoints(run):  # in place, so last.pt (a hard link) changes with them
        state = load(path)
        state["format_version"] = FORMAT_VERSION + 1
        torch.save(state, path)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    auto = train("--config", config, "--resume", "auto", "--max-steps", 6, check=False)
    assert auto.returncode != 0 and "Traceback" not in auto.stderr
    assert "train.py: none of the 2 checkpoint file(s) in" in auto.stderr
    fresh = train("--config", config, "--max-steps", 6, check=False)
    assert fresh.returncode != 0 and "already holds checkpoints up to step 4" in fresh.stderr
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_default_sample_prompts_come_from_the_dataset(tmp_path):
    """A folder run was sampled with shapes captions ('a red circle', ...) by default."""
    from diffusion import ImageFolderDataset, ShapesDataset, all_captions
    from diffusion.data import default_sample_prompts

    shapes = ShapesDataset(size=24, sample_size=16)
    assert default_sample_prompts(shapes) == all_captions()[::3]
    captions = ["a cat", "", "a dog", "a cat"] + [f"bird {i}" for i in range(10)]
    for i, caption in enumerate(captions):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i:02d}.png")
        (tmp_path / f"{i:02d}.txt").write_text(caption)
    folder = ImageFolderDataset(tmp_path, sample_size=8)
    expected = ["a cat", "a dog"] + [f"bird {i}" for i in range(6)]
    assert default_sample_prompts(folder) == expected
    for i in range(len(captions)):
        (tmp_path / f"{i:02d}.txt").write_text("")
    uncaptioned = ImageFolderDataset(tmp_path, sample_size=8)  # empty captions
    assert default_sample_prompts(uncaptioned) == [""] * 8


def write_bad_inputs(tmp_path):
    """The files the bad-argument cases name: a plain file, nine images, broken checkpoints
    and a config that is not YAML."""
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "nine").mkdir()
    for i in range(9):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(tmp_path / "nine" / f"{i}.png")
    torch.save({"format_version": FORMAT_VERSION, "config": {"old_field": 1}},
               tmp_path / "old.pt")
    torch.save({"format_version": FORMAT_VERSION, "config": {}, "w": torch.zeros(100_000)},
               tmp_path / "flipped.pt")
    data = bytearray((tmp_path / "flipped.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor's record: torch.load alone would not see it
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    (tmp_path / "broken.yaml").write_text("max_steps: [1,\n  seed")
    (tmp_path / "garbage").mkdir()
    for i in range(4):
        (tmp_path / "garbage" / f"{i}.png").write_bytes(b"not a png")


@pytest.mark.parametrize("args, message", [
    (["--set", "learning_rat=1e-3"], "did you mean 'learning_rate'"),
    (["--set", "dropout=2.0"], "dropout=2.0 is out of range"),
    (["--resume", "no/such/file.pt"], "does not exist"),
    (["--set", "output_dir={tmp}/a_file"], "output_dir='{tmp}/a_file' is a file"),
    (["--set", "output_dir={tmp}/a_file/run"],
     "cannot create output_dir='{tmp}/a_file/run': Not a directory"),
    (["--set", "num_heads=3"], "num_heads=3 must divide"),
    (["--set", "in_channels=1", "out_channels=1"], "dataset='shapes' draws RGB images; "
                                                   "in_channels=1 must be 3"),
    (["--set", "dataset=folder", "data_dir=/nonexistent"],
     "got data_dir='/nonexistent', which is not a folder"),
    (["--set", "dataset=folder", "data_dir={tmp}/nine", "batch_size=16"],
     "the dataset has 9 items, fewer than one global batch of 16"),
    (["--config", "{tmp}/broken.yaml"], "{tmp}/broken.yaml"),
    (["--resume", "{tmp}/old.pt"], "checkpoint '{tmp}/old.pt' holds a config this code cannot "
                                   "use: unknown config field(s): 'old_field'"),
    (["--resume", "{tmp}/flipped.pt"], "fails its CRC-32 check"),
    (["--set", "dataset=folder", "data_dir={tmp}/garbage"],
     "none of the 4 images in '{tmp}/garbage' could be read"),
])
def test_bad_arguments_fail_clearly(tmp_path, args, message):
    """One `train.py: ...` line naming the problem, a non-zero exit and no traceback."""
    config = write_config(tmp_path, max_steps=2)
    write_bad_inputs(tmp_path)
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = train("--config", config, *args, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("train.py: ") and message.format(tmp=tmp_path) in last_line
    assert not (tmp_path / "run").exists()  # refused before writing anything


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc_per_node=2 on a 1-GPU machine: the second rank would fail inside
    torch.cuda.set_device, after the process group had started; it stops first and says why."""
    from diffusion import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(run.dist, "init_process_group",
                        lambda backend: pytest.fail("started a process group"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1, but this machine has 1 CUDA device"
                                         r".*--nproc_per_node.*CUDA_VISIBLE_DEVICES="):
        run.setup_distributed()


def test_torchrun_ddp_matches_one_process_at_the_same_global_batch(tmp_path):
    """2 gloo processes x batch 2 == 1 process x batch 4: same data, same noise (each rank
    takes its slice of the global draws), gradients averaged. Gradient checkpointing is on,
    since DDP with checkpointing is a known failure elsewhere. Tolerance: float32 reduction
    order only (all-reduce sums in a different order), so 1e-5 relative."""
    common = dict(max_steps=3, cfg_dropout=0.5, dropout=0.0, gradient_checkpointing=True,
                  save_every=3)
    single = write_config(tmp_path, batch_size=4, **common)
    train("--config", single, env=CPU_ONLY)
    one = load(tmp_path / "run" / "last.pt")
    ddp_dir = tmp_path / "ddp"
    ddp_config = write_config(tmp_path, batch_size=2, **{**common, "output_dir": str(ddp_dir)})
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "train.py", "--config", str(ddp_config)],
        cwd=ROOT, env=CPU_ONLY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 4 = batch_size 2 x 2 processes" in result.stderr
    assert "training on cpu, backend gloo" in result.stderr
    two = load(ddp_dir / "last.pt")
    assert two["step"] == one["step"] == 3
    for key in ("model", "text_encoder"):
        for name, value in one[key].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(two[key][name], value, rtol=1e-5, atol=1e-6)
            else:  # the tokenizer's state
                assert two[key][name] == value, (key, name)
    assert len(list((ddp_dir / "checkpoints").iterdir())) == 1  # rank 0 alone wrote files


def test_log_redirected_to_a_file_has_plain_lines(tmp_path):
    """Under nohup, a batch scheduler or `> train.log` a progress bar's carriage-return redraws
    pile up into one endless line; a file gets one plain line per log_every steps instead."""
    config = write_config(tmp_path, max_steps=6, log_every=2, save_every=100)
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        subprocess.run([sys.executable, "train.py", "--config", str(config)], cwd=ROOT, env=ENV,
                       stdout=out, stderr=subprocess.STDOUT, timeout=300, check=True)
    text = log.read_text()
    assert "\r" not in text
    progress = [line.split()[1] for line in text.splitlines() if line.startswith("train ")]
    assert progress == ["0/6", "2/6", "4/6", "6/6", "6/6"], text
    assert "loss=" in text.splitlines()[-1]


def test_eval_every_logs_fd_kid_and_adherence_to_the_metrics(tmp_path):
    """eval_every: the EMA model is evaluated against the training folder during the run."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(24):
        colour = (255, 0, 0) if i % 2 else (0, 0, 255)
        Image.new("RGB", (16, 16), colour).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text("red" if i % 2 else "blue")
    config = write_config(tmp_path, max_steps=4, eval_every=2, eval_num_images=4,
                          dataset="folder", data_dir=str(data), save_every=100)
    train("--config", config)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()]
    evals = [line for line in lines if "eval" in line]
    assert [line["step"] for line in evals] == [2, 4]
    for line in evals:
        result = line["eval"]
        assert {"fd", "kid", "kid_std", "adherence", "chance", "fd_floor"} <= result.keys()
        assert result["fd"] >= 0 and 0 <= result["adherence"] <= 1
        assert result["chance"] in (0.5, 0.75, 1.0)  # the top share of 4 prompts of 2 captions
