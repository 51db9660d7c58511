"""Speed and memory of the UNet at the guide's two configurations; prints JSON.

    python tests/benchmarks/bench_unet.py [--configs small default] [--compile] [--repeats 7]
                                          [--no-memory] [--default-malloc]

`--compile` also times torch.compile (training and inference) and inference compiled with
inductor's `freezing` (weights as constants, pre-packed for oneDNN; for inference only).

Method (a benchmark, not a test: nothing here asserts anything about time):
- 2 threads (torch.set_num_threads), fp32 unless stated; every figure is the median of
  `--repeats` (7) timed runs after 2 warm-ups. `matmul_gflops` is a 2048x2048 fp32 matmul
  measured the same way in the same run, the yardstick for `*_fraction_of_matmul`
  (measured again just before each configuration, `matmul_gflops_before`, which the
  fractions use: on a shared machine the rate moves).
- "small" is the guide's Complete Training Example (model_channels 64, channel_mult (1, 2),
  num_res_blocks 1, 4 heads, context_dim 256) at 32x32 with attention_resolutions (16,),
  batch 8; "default" is the guide's DiffusionConfig defaults at 64x64, batch 2. Context
  length 77 (all tokens real). Dropout is the config's (0.1 in both), active in training.
- inference: eval mode under torch.no_grad inside nets.prepacked_for_cpu_inference(model)
  (as the pipeline's sampling loop runs it), so the convolutions and linear layers use
  weights prepacked for oneDNN and the UNet runs in channels_last inside (nets/cpu.py);
  `inference_unpacked_ms` is the same outside the block (plain eager layers, NCHW). train:
  train mode, zero_grad(set_to_none=True), forward, MSE loss, backward (no optimizer step).
- the timing process calls nets.keep_freed_memory() first, as train.py and sample.py do
  (`--default-malloc` leaves glibc's defaults, under which every buffer above 32 MiB is
  mmapped and page-faulted in again on each step).
- FLOPs: torch.utils.flop_counter counts convolutions and matmuls but not the CPU's fused
  SDPA kernel, so attention adds 4 B N M (h d) per layer forward (Q K^T and P V, 2 FLOPs per
  multiply-add) and twice that backward, recorded by hooks on every attention layer. The
  total is checked against the counter on the explicit softmax(Q K^T) V path
  (`flops_check_*`, which should be 1.0). Checkpointed runs are rated on the same (useful)
  FLOPs, so their fraction shows the cost of recomputation.
- memory: each measurement runs in a fresh child process with MALLOC_MMAP_THRESHOLD_=65536,
  so glibc returns every freed tensor to the OS and the resident set size (RSS) follows live
  memory. After 2 full warm-up steps (parameters, gradients and the trainer's fused AdamW state
  all allocated) the kernel's peak-RSS counter is reset (/proc/self/clear_refs, "5") and one
  training step runs. activation_mb = peak RSS during forward + backward minus the RSS
  before it, i.e. peak minus parameters, gradients and optimizer state; step_peak_mb adds
  the optimizer step and is the absolute peak RSS of the process.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffusion import DiffusionConfig  # noqa: E402
from diffusion.optim import parameter_groups  # noqa: E402
from nets import (  # noqa: E402
    AdvancedUNet,
    CrossAttention,
    cpu_has_fast_low_precision,
    keep_freed_memory,
    prepacked_for_cpu_inference,
)
from sampling.cli import positive_int  # noqa: E402

THREADS = 2
WARMUP = 2
MATMUL_N = 2048
CONTEXT_LENGTH = 77
MMAP_THRESHOLD = "65536"

BENCH_CONFIGS = {
    "small": dict(
        config=dict(in_channels=3, out_channels=3, model_channels=64, num_res_blocks=1,
                    attention_resolutions=(16,), dropout=0.1, channel_mult=(1, 2),
                    num_heads=4, use_spatial_transformer=True, transformer_depth=1,
                    context_dim=256, sample_size=32),
        batch=8),
    "default": dict(config=dict(sample_size=64), batch=2),
}


def median_ms(fn, repeats):
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def matmul_gflops(repeats):
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    ms = median_ms(lambda: a @ b, repeats)
    return 2 * MATMUL_N ** 3 / (ms / 1000) / 1e9


def build(name, gradient_checkpointing=False):
    spec = BENCH_CONFIGS[name]
    config = DiffusionConfig(**spec["config"], gradient_checkpointing=gradient_checkpointing)
    torch.manual_seed(0)
    model = AdvancedUNet(config)
    batch = spec["batch"]
    gen = torch.Generator().manual_seed(0)
    size = config.sample_size
    x = torch.randn(batch, config.in_channels, size, size, generator=gen)
    t = torch.randint(0, config.num_train_timesteps, (batch,), generator=gen)
    context = torch.randn(batch, CONTEXT_LENGTH, config.context_dim, generator=gen)
    return model, (x, t, context)


def train_step(model, x, t, context):
    out = model(x, t, context)["sample"]
    out.float().square().mean().backward()


def count_flops(model, inputs, backward):
    """(counted by torch's FlopCounterMode, attention FLOPs by formula)."""
    attention_flops = []

    def hook(module, args, kwargs, output):
        x = args[0]
        context = args[1] if len(args) > 1 else kwargs.get("context")
        b, n, m = x.shape[0], x.shape[1], (context if context is not None else x).shape[1]
        attention_flops.append(4 * b * n * m * module.heads * module.dim_head)

    handles = [layer.register_forward_hook(hook, with_kwargs=True)
               for layer in model.modules() if isinstance(layer, CrossAttention)]
    counter = FlopCounterMode(display=False)
    with counter:
        if backward:
            train_step(model, *inputs)
        else:
            with torch.no_grad():
                model(*inputs)
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops(), sum(attention_flops) * (3 if backward else 1)


def flops(model, inputs):
    """Useful FLOPs of inference and of forward + backward, plus the explicit-path check.

    Counted on the plain layers (outside prepacked_for_cpu_inference): FlopCounterMode does
    not see the oneDNN ops that the prepacked layers call; they do the same multiply-adds.
    """
    out = {}
    for key, backward in (("inference", False), ("train", True)):
        model.unet.set_attention_backend(None)
        counted, formula = count_flops(model, inputs, backward)
        model.unet.set_attention_backend("explicit")
        explicit, _ = count_flops(model, inputs, backward)
        model.unet.set_attention_backend(None)
        out[f"gflop_{key}"] = (counted + formula) / 1e9
        out[f"gflop_attention_formula_{key}"] = formula / 1e9
        out[f"flops_check_{key}"] = explicit / (counted + formula)
    return out


def timings(name, repeats, use_compile):
    model, inputs = build(name)
    x, t, context = inputs
    res = {"params": sum(p.numel() for p in model.parameters()), "batch": x.shape[0]}
    res.update(flops(model, inputs))

    def infer(m=model, xi=x, bf16=False):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            m(xi, t, context)

    def train(m=model, xi=x, bf16=False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = m(xi, t, context)["sample"].float().square().mean()
        loss.backward()  # outside autocast, as torch.amp prescribes

    # every inference timing but `inference_unpacked_ms` (and torch.compile's, whose graphs
    # lay weights out themselves) runs inside the block, as the pipeline's sampling loop does
    model.eval()
    with prepacked_for_cpu_inference(model):
        res["inference_ms"] = median_ms(infer, repeats)
    res["inference_unpacked_ms"] = median_ms(infer, repeats)  # eager layers, NCHW throughout
    model.train()
    res["train_ms"] = median_ms(train, repeats)
    model.unet.enable_gradient_checkpointing()
    res["train_checkpointing_ms"] = median_ms(train, repeats)
    model.unet.disable_gradient_checkpointing()

    model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    model.eval()
    with prepacked_for_cpu_inference(model):
        res["inference_channels_last_ms"] = median_ms(lambda: infer(xi=x_cl), repeats)
    model.train()
    res["train_channels_last_ms"] = median_ms(lambda: train(xi=x_cl), repeats)
    model.to(memory_format=torch.contiguous_format)

    # Where bf16 is emulated (bf16_native false) the UNet computes in fp32 under autocast
    # (UNet.fp32_when_cpu_autocast_is_slow), so these equal fp32 plus the casts.
    model.eval()
    with prepacked_for_cpu_inference(model):
        res["inference_bf16_ms"] = median_ms(lambda: infer(bf16=True), repeats)
    model.train()
    res["train_bf16_ms"] = median_ms(lambda: train(bf16=True), repeats)

    if use_compile:
        compiled = torch.compile(model)
        model.eval()
        res["inference_compile_ms"] = median_ms(lambda: infer(m=compiled), repeats)
        model.train()
        res["train_compile_ms"] = median_ms(lambda: train(m=compiled), repeats)
        # Inference with inductor's freezing: the weights become constants, laid out once for
        # oneDNN by inductor (eager inference does the same inside
        # nets.prepacked_for_cpu_inference).
        # Last, since it changes the weights: the zero-initialised layers get small random
        # values, so that comparing with eager checks something (the untrained output is 0).
        model.eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            torch._dynamo.reset()  # else the compile above is reused or hits the recompile limit
            frozen = torch.compile(model, options={"freezing": True})
            eager_out = model(x, t, context)["sample"]
            res["inference_compile_frozen_rel_diff"] = (
                (frozen(x, t, context)["sample"] - eager_out).norm() / eager_out.norm()).item()
        res["inference_compile_frozen_ms"] = median_ms(lambda: infer(m=frozen), repeats)
    return res


# ---- memory, in a child process ----

def _rss_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name, checkpointing):
    torch.set_num_threads(THREADS)
    model, inputs = build(name, gradient_checkpointing=checkpointing)
    model.train()
    # the trainer's optimizer: AdamW over its parameter groups, fused on the CPU
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-4, fused=True)
    for _ in range(WARMUP):  # allocates gradients and optimizer state
        train_step(model, *inputs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    before = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    train_step(model, *inputs)
    fwd_bwd_peak = _rss_mb("VmHWM")
    optimizer.step()
    step_peak = _rss_mb("VmHWM")
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    print(json.dumps({"activation_mb": fwd_bwd_peak - before, "step_peak_mb": step_peak,
                      "before_step_mb": before, "params_mb": params_mb}))


def memory(name):
    res = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    for checkpointing in (False, True):
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", name, str(int(checkpointing))],
            env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench_unet: the memory child for {name} failed:\n{proc.stderr}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        suffix = "_checkpointing" if checkpointing else ""
        res[f"train_activation_mb{suffix}"] = child["activation_mb"]
        res[f"train_step_peak_mb{suffix}"] = child["step_peak_mb"]
        res["params_mb"] = child["params_mb"]
    res["checkpointing_activation_saving"] = 1 - (res["train_activation_mb_checkpointing"]
                                                  / res["train_activation_mb"])
    return res


def cpu_name():
    """The CPU's model name: the machines of one kind differ (an AVX2 EPYC one day, an
    AVX-512/AMX Xeon another), and the fractions of the matmul rate differ with them."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(BENCH_CONFIGS),
                        choices=list(BENCH_CONFIGS))
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--default-malloc", action="store_true",
                        help="do not call nets.keep_freed_memory() (glibc's defaults)")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], bool(int(args.memory_child[1])))
        return
    torch.set_num_threads(THREADS)
    kept = False if args.default_malloc else keep_freed_memory()
    report = {"torch": torch.__version__, "cpu": cpu_name(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": THREADS, "repeats": args.repeats, "warmup": WARMUP,
              "bf16_native": cpu_has_fast_low_precision(torch.bfloat16),
              "keep_freed_memory": kept,
              "matmul_gflops": matmul_gflops(args.repeats)}
    for name in args.configs:
        matmul_before = matmul_gflops(args.repeats)
        res = timings(name, args.repeats, args.compile)
        res["matmul_gflops_before"] = matmul_before
        if not args.no_memory:
            res.update(memory(name))
        for key in [k for k in res if k.endswith("_ms")]:
            gflop = res["gflop_inference" if key.startswith("inference") else "gflop_train"]
            res[key.replace("_ms", "_fraction_of_matmul")] = (
                gflop / (res[key] / 1000) / res["matmul_gflops_before"])
        report[name] = res
    report["matmul_gflops_end"] = matmul_gflops(args.repeats)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
