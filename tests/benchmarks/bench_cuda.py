"""Speed and memory of the UNet on a CUDA GPU at the guide's two configurations; prints JSON
lines: the GPU and its matmul rates first, then each measurement as it finishes.

    python tests/benchmarks/bench_cuda.py [--configs small default] [--repeats 20] [--compile]

Method (a benchmark, not a test: nothing here asserts anything about time):
- the configurations and inputs of bench_unet.py ("small" at batch 8, "default" at batch 2,
  context length 77), and the same models at a larger batch (`--throughput-batch`), where a
  GPU is no longer waiting on kernel launches.
- every figure is the median of `--repeats` (20) runs after 3 warm-ups, each run timed by
  the wall clock between two torch.cuda.synchronize() calls. inference: eval mode under
  torch.no_grad. train: train mode, forward, MSE loss, backward (no optimizer step), with
  the loss's backward outside autocast, as torch.amp prescribes.
- precisions: "fp32" (TF32 off for matmuls and convolutions), "tf32" (both on), "bf16" and
  "fp16" autocast over fp32 weights, as train.py runs mixed precision. Under bf16 also:
  each attention kernel forced (set_attention_backend), channels_last, gradient
  checkpointing, and (`--compile`) torch.compile.
- FLOPs: torch.utils.flop_counter.FlopCounterMode, which on CUDA counts the fused attention
  kernels too (on the CPU it misses them: see bench_unet.py); `flops_check_*` is the count
  on the explicit softmax(Q K^T) V path over it, and should be 1.0. `*_tflops` is the achieved
  rate; `*_fraction_of_matmul` divides it by an 8192^3 matmul's rate at the same precision
  (fp32 for fp32, TF32 for tf32, bf16 for bf16, fp16 for fp16) measured in the same run.
- memory: torch.cuda.max_memory_allocated during one forward + backward, after two full
  training steps with the trainer's AdamW (parameters, gradients and optimizer state all
  allocated), minus the memory allocated before it: activation memory, with and without
  gradient checkpointing, in fp32 and bf16.
"""

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_unet import BENCH_CONFIGS, build  # noqa: E402

from diffusion.optim import parameter_groups  # noqa: E402
from sampling.cli import positive_int  # noqa: E402

CUDA = torch.device("cuda")
WARMUP = 3
MATMUL_N = 8192
PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
              "fp16": torch.float16}
ATTENTION_KERNELS = ("flash", "efficient", "math")


@contextmanager
def tf32(name):
    """TF32 matmuls and convolutions on for "tf32" alone (for the backward pass too)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(name):
    return torch.autocast("cuda", dtype=PRECISIONS[name], enabled=name in ("bf16", "fp16"))


def median_ms(fn, repeats):
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def matmul_tflops(name, repeats):
    dtype = torch.float32 if name in ("fp32", "tf32") else PRECISIONS[name]
    a, b = (torch.randn(MATMUL_N, MATMUL_N, device=CUDA, dtype=dtype) for _ in range(2))
    with tf32(name):
        ms = median_ms(lambda: a @ b, repeats)
    return 2 * MATMUL_N ** 3 / (ms / 1000) / 1e12


def step(model, inputs, name, train):
    """One inference forward, or one forward + backward, at precision `name`. The backward
    adds to existing gradients: the timings free them first, the memory runs keep them."""
    with tf32(name):
        if not train:
            with torch.no_grad(), autocast(name):
                model(*inputs)
            return
        with autocast(name):
            out = model(*inputs)["sample"]
        out.float().square().mean().backward()


def count_tflop(model, inputs, train):
    counter = FlopCounterMode(display=False)
    with counter:
        step(model, inputs, "fp32", train)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e12


def on_cuda(name, batch=None):
    model, inputs = build(name)
    if batch is not None:  # the same random inputs, repeated up to the larger batch
        reps = -(-batch // inputs[0].shape[0])
        inputs = tuple(v.repeat(reps, *[1] * (v.dim() - 1))[:batch] for v in inputs)
    return model.to(CUDA), tuple(v.to(CUDA) for v in inputs)


def timings(name, repeats, batch, use_compile, matmul):
    model, inputs = on_cuda(name, batch)
    res = {"params": sum(p.numel() for p in model.parameters()), "batch": inputs[0].shape[0]}
    for kind, train in (("inference", False), ("train", True)):
        res[f"tflop_{kind}"] = count_tflop(model.train(train), inputs, train)
        model.unet.set_attention_backend("explicit")  # check: written-out softmax(Q K^T) V
        res[f"flops_check_{kind}"] = count_tflop(model, inputs, train) / res[f"tflop_{kind}"]
        model.unet.set_attention_backend(None)

    def time_all(label, precisions=tuple(PRECISIONS), m=model, xs=inputs):
        for prec in precisions:
            for kind, train in (("inference", False), ("train", True)):
                m.train(train)

                def timed(p=prec, tr=train):
                    m.zero_grad(set_to_none=True)  # as a training step starts
                    step(m, xs, p, tr)

                ms = median_ms(timed, repeats)
                key = f"{kind}_{prec}{label}"
                res[f"{key}_ms"] = ms
                tflops = res[f"tflop_{kind}"] / (ms / 1000)
                res[f"{key}_tflops"] = tflops
                res[f"{key}_fraction_of_matmul"] = tflops / matmul[prec]
                print(f"bench_cuda: {name} batch {res['batch']} {key}: {ms:.2f} ms",
                      file=sys.stderr, flush=True)

    time_all("")
    for kernel in ATTENTION_KERNELS:
        model.unet.set_attention_backend(kernel)
        time_all(f"_{kernel}_attention", ("bf16",))
    model.unet.set_attention_backend(None)
    model.unet.enable_gradient_checkpointing()
    time_all("_checkpointing", ("bf16",))
    model.unet.disable_gradient_checkpointing()
    model.to(memory_format=torch.channels_last)
    x, t, context = inputs
    time_all("_channels_last", ("bf16",),
             xs=(x.contiguous(memory_format=torch.channels_last), t, context))
    model.to(memory_format=torch.contiguous_format)
    if use_compile:
        start = time.perf_counter()
        time_all("_compile", ("bf16",), m=torch.compile(model))
        res["compile_total_s"] = time.perf_counter() - start  # compiling and timing
    return res


def activation_mb(name, prec, checkpointing):
    model, inputs = on_cuda(name)
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-4, fused=True)
    for _ in range(2):  # allocates gradients and optimizer state
        step(model, inputs, prec, True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(model, inputs, prec, True)  # into the zeroed gradients: no gradient is freed or made
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def memory(name):
    res = {}
    for prec in ("fp32", "bf16"):
        for checkpointing in (False, True):
            suffix = "_checkpointing" if checkpointing else ""
            res[f"train_activation_mb_{prec}{suffix}"] = activation_mb(name, prec, checkpointing)
            torch.cuda.empty_cache()
        res[f"checkpointing_activation_saving_{prec}"] = 1 - (
            res[f"train_activation_mb_{prec}_checkpointing"] / res[f"train_activation_mb_{prec}"])
    return res


def emit(record):
    """One JSON line per record, as soon as it is measured (a run cut short keeps its lines)."""
    print(json.dumps(record), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(BENCH_CONFIGS),
                        choices=list(BENCH_CONFIGS))
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--throughput-batch", nargs=2, type=positive_int, default=(128, 16),
                        metavar=("SMALL", "DEFAULT"), help="the larger batches (default 128 16)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (bf16)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda: needs a CUDA GPU (tests/benchmarks/bench_unet.py times the CPU)")
    matmul = {prec: matmul_tflops(prec, args.repeats) for prec in PRECISIONS}
    emit({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
          "repeats": args.repeats, "warmup": WARMUP, "matmul_tflops": matmul})
    big = dict(zip(BENCH_CONFIGS, args.throughput_batch))
    for name in args.configs:
        emit({name: timings(name, args.repeats, None, args.compile, matmul)})
        emit({f"{name}_memory": memory(name)})
    for name in args.configs:
        emit({f"{name}_batch{big[name]}": timings(name, args.repeats, big[name], False, matmul)})
    emit({"matmul_tflops_end": {prec: matmul_tflops(prec, args.repeats) for prec in PRECISIONS}})


if __name__ == "__main__":
    main()
