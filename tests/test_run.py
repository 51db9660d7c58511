"""The run folder (diffusion/run.py) and progress reports (diffusion/progress.py), without
train.py: metrics.jsonl truncation, resume and the data position, the stop flag, plain log
lines when the output is not a terminal."""

import io
import json
import os
import signal

import pytest
import torch
from helpers import tiny_config

from diffusion import AdvancedDiffusionTrainer, GlobalBatchSampler
from diffusion.progress import Progress
from diffusion.run import StopFlag, TrainingRun, open_metrics, setup_distributed
from nets import AdvancedUNet


def make_run(tmp_path, resume=None, **overrides):
    config = tiny_config(output_dir=str(tmp_path / "run"), dataset="shapes", **overrides)
    torch.manual_seed(config.seed)
    trainer = AdvancedDiffusionTrainer(AdvancedUNet(config), config)
    batches = GlobalBatchSampler(40, config.batch_size, seed=config.seed)
    return TrainingRun(config, trainer, batches, 40, resume=resume)


def batch(seed=0, size=2):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(size, 3, 16, 16, generator=g) * 2 - 1,
            "prompts": ["a red circle"] * size}


def test_open_metrics_drops_lines_past_the_step_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # killed mid-write
    with open_metrics(path, 2) as f:
        f.write(json.dumps({"step": 3, "loss": 0.5}) + "\n")
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert not (tmp_path / ".metrics.jsonl.tmp").exists()


def test_output_dir_that_is_a_file_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ValueError, match=r"output_dir=.*run' is a file; it must be a folder"):
        make_run(tmp_path)


def test_open_writes_the_config_and_log_writes_one_line_per_step(tmp_path):
    run = make_run(tmp_path, use_ema=False)
    assert not run.dir.exists()  # nothing is written before open()
    run.open()
    assert (run.dir / "config.yaml").exists()
    for i in range(2):
        metrics = run.trainer.train_step(batch(i))
        run.log(metrics)
    run.close()
    lines = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert lines[1]["loss"] == pytest.approx(metrics["loss"])
    assert lines[1]["lr"] == metrics["learning_rate"]
    assert lines[1]["images_s"] == pytest.approx(4 * lines[1]["it_s"])  # batch_size 4


def test_log_eval_writes_the_evaluation_under_its_step(tmp_path):
    run = make_run(tmp_path, use_ema=False)
    run.open()
    run.trainer.train_step(batch())
    run.log_eval({"fd": 1.5, "kid": 0.01, "adherence": None})
    run.close()
    line = json.loads((run.dir / "metrics.jsonl").read_text())
    assert line == {"step": 1, "eval": {"fd": 1.5, "kid": 0.01, "adherence": None}}


def test_save_then_resume_auto_restores_step_and_data_position(tmp_path):
    run = make_run(tmp_path, use_ema=False)
    run.open()
    for i in range(3):
        run.trainer.train_step(batch(i))
        run.batch_done()
    run.epoch_done()
    run.batch_done()
    run.save()
    run.close()
    resumed = make_run(tmp_path, resume="auto", use_ema=False)
    assert resumed.trainer.global_step == 3
    assert (resumed.epoch, resumed.batch) == (1, 1)


def test_resume_auto_in_an_empty_folder_starts_from_scratch(tmp_path, capsys):
    run = make_run(tmp_path, resume="auto")
    assert run.trainer.global_step == 0 and (run.epoch, run.batch) == (0, 0)
    assert "no checkpoint in" in capsys.readouterr().err


def test_unwritable_output_dir_is_a_value_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("")
    config_dir = tmp_path / "file" / "run"  # a folder under a file cannot be created
    run = make_run(tmp_path)
    run.dir = config_dir
    with pytest.raises(ValueError, match=r"cannot create output_dir=.*file/run"):
        run.open()


def test_stop_flag_waits_for_the_end_of_an_accumulation_window():
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = StopFlag()

        class Trainer:
            accumulating = True

        assert not stop.stopping(Trainer)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
        assert not stop.stopping(Trainer)  # mid-window: finish the window first
        Trainer.accumulating = False
        assert stop.stopping(Trainer)
        stop.sync(torch.device("cpu"))  # no process group: nothing to agree on
        assert stop.signal == signal.SIGTERM
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_setup_distributed_without_torchrun_is_one_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup_distributed() == (0, 1, torch.device("cpu"))


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_prints_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    progress = Progress(10, every=4, desc="train", stream=out)
    for step in range(10):
        progress.update(loss=f"{step / 10:.1f}")
    progress.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split()[1] for line in lines] == ["0/10", "4/10", "8/10", "10/10"]
    assert lines[0].endswith("start") and lines[-1].endswith("end")
    assert "loss=0.3" in lines[1] and "loss=0.9" in lines[-1]


def test_progress_resumed_counts_from_initial_and_disabled_prints_nothing():
    out = io.StringIO()
    with Progress(10, initial=6, every=2, desc="train", stream=out) as progress:
        progress.update()
        progress.update()
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["6/10", "8/10", "8/10"]
    quiet = io.StringIO()
    with Progress(10, stream=quiet, enabled=False) as progress:
        progress.update(5)
    assert quiet.getvalue() == ""


def test_progress_draws_a_bar_on_a_terminal():
    out = FakeTerminal()
    with Progress(3, desc="sampling", stream=out) as progress:
        for _ in range(3):
            progress.update()
    assert "\r" in out.getvalue() and "3/3" in out.getvalue()
