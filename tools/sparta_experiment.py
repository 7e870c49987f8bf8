"""ReLU baseline vs SPARTA (rule ``sparta_stage_last``) under the same adversarial-training budget, MNIST-5k.

    python tools/sparta_experiment.py                 # 3 epochs each, PGD-5 training, PGD-20 evaluation

Both models are ``DemoPreActResNet(act="relu", blocks=1)`` from the same seed; the SPARTA one has the last
ReLU of each stage replaced (reduction 4) before training, and everything is trained from scratch with
the same epochs, ε, steps, learning rate and batch order. Evaluation: clean accuracy and PGD-20 (one
restart, step 2.5·ε/20) on the MNIST-5k test split, with the exact gradient (SPARTA has no masking operator).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import graphsparse as gs  # noqa: E402
from graphsparse.data import load_dataset  # noqa: E402
from graphsparse.demo.models import DemoPreActResNet  # noqa: E402
from graphsparse.robust.pgd import pgd_attack  # noqa: E402
from graphsparse.robust.train import train  # noqa: E402


def accuracy(model, xs, ys, eps=0.0, steps=20, seed=0) -> float:
    model.eval()
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(xs), 250):
        xb, yb = xs[i : i + 250], ys[i : i + 250]
        if eps:
            xb = pgd_attack(model, xb, yb, eps, 2.5 * eps / steps, steps, "Linf", g)
        with torch.no_grad():
            correct += int((model(xb).argmax(1) == yb).sum())
    return 100.0 * correct / len(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    train_set, test_set = load_dataset("mnist5k", split="train"), load_dataset("mnist5k", split="test")
    xs = torch.stack([test_set[i][0] for i in range(args.n)])
    ys = torch.tensor([int(test_set[i][1]) for i in range(args.n)])
    results = {}
    for name in ("relu", "sparta"):
        torch.manual_seed(0)
        model = DemoPreActResNet(act="relu", blocks=1)
        if name == "sparta":
            model = gs.rewrite(model, "sparta_stage_last", torch.zeros(1, 1, 28, 28))
        params = sum(p.numel() for p in model.parameters())
        t0 = time.time()
        train(model, train_set, epochs=args.epochs, eps=args.eps, steps=args.steps, lr=0.05, batch_size=128,
              eps_warmup_epochs=1, seed=0)
        seconds = time.time() - t0
        results[name] = {"params": params, "train_seconds": round(seconds, 1), "clean": accuracy(model, xs, ys),
                         "pgd20": accuracy(model, xs, ys, eps=args.eps)}
        print(name, results[name], flush=True)
    print(f"\nMNIST-5k test, n = {args.n}, L∞ ε = {args.eps:g}; training: {args.epochs} epochs PGD-{args.steps}; "
          "evaluation: PGD-20, 1 restart")
    print("| model | parameters | clean % | PGD-20 % | training s |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['params']:,} | {r['clean']:.1f} | {r['pgd20']:.1f} | {r['train_seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
