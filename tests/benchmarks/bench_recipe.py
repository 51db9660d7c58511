"""The recipe benchmark: train one config with several seeds and score every run, so a recipe is
judged by its spread (min / median / max over seeds), never by one draw.

    python tests/benchmarks/bench_recipe.py --config configs/shapes.yaml --seeds 0 1 2 3 4 \
        [--parallel 2] [--set key=value ...] [--eval "" --eval "--sampler ddim --steps 20"] \
        [--out runs/recipe/NAME]

Each seed is its own run, `python train.py --config C --set seed=S output_dir=OUT/seed_S ...`
(so its own initialisation, noise, data order and, for shapes, images), in `--parallel`
processes at once, each given cores // parallel threads. When one finishes, its last.pt is
scored with `python -m sampling.evaluate --checkpoint last.pt` plus each `--eval` string in
turn (shapes: adherence over --seeds 10 images per caption by default; a folder: pass
"--data-dir D --num-images N"). Prints one row per seed and evaluation, then min / median / max
of every score, wall time and steps/s, as a table and JSON lines; the JSON lines also go to
OUT/results.jsonl. A finished seed (its last.pt and result lines present) is not rerun.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCORES = ("colour", "shape", "both", "adherence", "fd", "kid")  # keys read from evaluate's JSON


def run_logged(command: list[str], log: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as out:
        out.write("$ " + shlex.join(command) + "\n")
        out.flush()
        code = subprocess.call(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"{shlex.join(command)} exited with {code}; see {log}")


def last_json(log: Path) -> dict:
    """The last line of `log` that parses as a JSON object (evaluate prints one at the end)."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise RuntimeError(f"no JSON line in {log}")


def median_steps_per_second(run_dir: Path) -> float | None:
    rates = [json.loads(line).get("it_s") for line in
             (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [rate for rate in rates if rate]
    return round(statistics.median(rates), 3) if rates else None


def one_seed(seed: int, args, threads: int) -> list[dict]:
    run_dir = args.out / f"seed_{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "results.jsonl"
    if done.exists() and (run_dir / "last.pt").exists():
        return [json.loads(line) for line in done.read_text().splitlines()]
    log = run_dir / "bench.log"
    train = [sys.executable, "train.py", "--config", args.config, "--set", f"seed={seed}",
             f"output_dir={run_dir}", *args.set]
    start = time.perf_counter()
    run_logged(train, log, threads)
    wall = time.perf_counter() - start
    rate = median_steps_per_second(run_dir)
    rows = []
    for spec in args.eval:
        evaluate = [sys.executable, "-m", "sampling.evaluate", "--checkpoint",
                    str(run_dir / "last.pt"), *shlex.split(spec)]
        run_logged(evaluate, log, threads)
        result = last_json(log)
        row = {"seed": seed, "eval": spec, "train_s": round(wall, 1), "steps_s": rate,
               "threads": threads}
        row.update({key: result[key] for key in SCORES if result.get(key) is not None})
        if "shape_confusion" in result:
            row["shape_confusion"] = result["shape_confusion"]
        rows.append(row)
    done.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def spread(rows: list[dict], keys) -> dict:
    """{key: {"min", "median", "max"}} over the rows that have the key."""
    summary = {}
    for key in keys:
        values = [row[key] for row in rows if row.get(key) is not None]
        if values:
            summary[key] = {"min": min(values), "median": statistics.median(values),
                            "max": max(values)}
    return summary


def summarise(rows: list[dict], specs: list[str]) -> list[dict]:
    """One summary per evaluation: min / median / max of every score over the seeds."""
    summaries = []
    for spec in specs:
        group = [row for row in rows if row["eval"] == spec]
        summaries.append({"summary": spec, "runs": len(group),
                          **spread(group, ("train_s", "steps_s", *SCORES))})
    return summaries


def cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict], summaries: list[dict]) -> None:
    keys = [key for key in ("train_s", "steps_s", *SCORES) if any(key in row for row in rows)]
    print(f"{'seed':>6} {'eval':28s} " + " ".join(f"{key:>9s}" for key in keys))
    for row in rows:
        print(f"{row['seed']:>6} {row['eval'] or '(config)':28s} "
              + " ".join(f"{cell(row.get(key, '-')):>9s}" for key in keys))
    for summary in summaries:
        for stat in ("min", "median", "max"):
            cells = [cell(summary.get(key, {}).get(stat, "-")) for key in keys]
            print(f"{stat:>6} {summary['summary'] or '(config)':28s} "
                  + " ".join(f"{text:>9s}" for text in cells))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--parallel", type=int, default=None,
                        help="runs at once (default: min(seeds, cores))")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per run (default: cores // parallel)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, key=value")
    parser.add_argument("--eval", action="append", default=None,
                        help="extra arguments for one `python -m sampling.evaluate` of each run "
                             "(repeatable; default: one with the config's sampler, --seeds 10)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: runs/recipe/<config name>")
    args = parser.parse_args(argv)
    args.eval = args.eval or [""]
    args.out = (args.out or ROOT / "runs" / "recipe" / Path(args.config).stem).resolve()
    cores = os.cpu_count() or 1
    parallel = max(1, min(args.parallel or min(len(args.seeds), cores), len(args.seeds)))
    threads = args.threads or max(1, cores // parallel)
    print(f"{len(args.seeds)} seeds of {args.config} {' '.join(args.set)}: {parallel} at a "
          f"time, {threads} threads each, into {args.out}", flush=True)
    with ThreadPoolExecutor(parallel) as pool:
        rows = [row for rows in pool.map(lambda s: one_seed(s, args, threads), args.seeds)
                for row in rows]
    summaries = summarise(rows, args.eval)
    print_table(rows, summaries)
    lines = [json.dumps({"config": args.config, "set": args.set, **row}) for row in rows]
    lines += [json.dumps({"config": args.config, "set": args.set, **s}) for s in summaries]
    print("\n".join(lines))
    (args.out / "results.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
