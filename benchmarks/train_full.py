"""P4: the full Exercise 4 run (200,000 steps, manual backward) -- wall and CPU seconds, final losses.

Target: <= 60 s on the 2-core development machine. CPU seconds are printed too: on a busy machine
the wall time includes waiting for a core, the CPU time does not.

    python benchmarks/train_full.py --names ../shared/names.txt [--steps 200000] [--backward manual]
"""

from __future__ import annotations

import argparse
import sys
import time

from reference_model.data import build_splits, load_words
from reference_model.train import train

LECTURE = {"train": 2.0705, "val": 2.1099}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", help="names file (default: the embedded census names)")
    ap.add_argument("--steps", type=int, default=200_000)
    ap.add_argument("--backward", default="manual", choices=("manual", "autograd"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    dataset = build_splits(load_words(args.names))
    result = train(dataset, steps=args.steps, backward=args.backward, threads=args.threads or None, samples=20)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    losses = result.split_losses
    print(f"{args.backward} backward, {args.steps} steps, {args.threads or 'default'} thread(s)")
    print(f"  training loop {result.seconds:.1f} s wall ({result.steps_per_second:,.0f} steps/s); "
          f"whole run {wall:.1f} s wall, {cpu:.1f} s CPU")
    print(f"  train {losses['train']:.4f}  val {losses['val']:.4f}"
          + (f"   (lecture {LECTURE['train']} / {LECTURE['val']}; differences "
             f"{losses['train'] - LECTURE['train']:+.4f} / {losses['val'] - LECTURE['val']:+.4f})"
             if args.names and args.steps == 200_000 else ""))
    print("  samples: " + " ".join(result.samples))
    print(f"  P4 {'MET' if wall <= 60 else 'NOT MET'} by wall time; {'MET' if cpu <= 60 else 'NOT MET'} by CPU time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
