"""Train the demo model: a small pre-activation ResNet (GELU), PGD adversarial training on MNIST-5k.

    python tools/train_demo_model.py                 # writes graphsparse/assets/demo_preact_mnist.safetensors

Deterministic from ``--seed`` on CPU. The training record (command, settings, per-epoch figures, test clean
and PGD accuracy) is stored in the weights file's metadata; ``graphsparse.demo.models.demo_model_info()`` reads it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphsparse.artifact.io import atomic_write  # noqa: E402
from graphsparse.data import load_dataset  # noqa: E402
from graphsparse.demo.models import DEMO_WEIGHTS, DemoPreActResNet  # noqa: E402
from graphsparse.robust.pgd import pgd_attack  # noqa: E402
from graphsparse.robust.train import train  # noqa: E402


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.0, steps: int = 0,
             batch: int = 250, seed: int = 0) -> float:
    model.eval()
    correct = 0
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        if eps > 0:
            xb = pgd_attack(model, xb, yb, eps, 2.5 * eps / steps, steps, "Linf", g)
        with torch.no_grad():
            correct += int((model(xb).argmax(1) == yb).sum())
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default="demo_train_ckpt.safetensors")
    ap.add_argument("--output", default=str(ROOT / "graphsparse" / "assets" / DEMO_WEIGHTS))
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    model = DemoPreActResNet()
    train_set = load_dataset("mnist5k", split="train", seed=0)
    test_set = load_dataset("mnist5k", split="test", seed=0)

    def progress(p) -> None:
        if p.end_of_epoch:
            print(f"epoch {p.epoch}/{p.epochs}: loss {p.loss:.3f} clean {p.clean_acc:.3f} adv {p.adv_acc:.3f} "
                  f"eps {p.eps:.3f} lr {p.lr:.4f}", flush=True)

    t0 = time.time()
    record = train(model, train_set, epochs=args.epochs, eps=args.eps, steps=args.steps, lr=args.lr,
                   batch_size=args.batch_size, eps_warmup_epochs=args.warmup, seed=args.seed,
                   checkpoint=args.checkpoint, resume=Path(args.checkpoint).exists(), progress=progress)
    seconds = time.time() - t0
    xs = torch.stack([test_set[i][0] for i in range(len(test_set))])
    ys = torch.tensor([int(test_set[i][1]) for i in range(len(test_set))])
    clean = accuracy(model, xs, ys)
    robust = accuracy(model, xs, ys, eps=args.eps, steps=20)
    info = {
        "command": "python tools/train_demo_model.py " + " ".join(sys.argv[1:]),
        "settings": vars(args) | {"output": Path(args.output).name, "checkpoint": None},
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": record.to_dict()["epochs"],
        "train_seconds": round(seconds, 1),
        "test": {"split": "mnist5k test (seed 0)", "n": len(xs), "clean_acc": clean,
                 f"pgd20_linf_{args.eps}_acc": robust},
        "torch": torch.__version__.split("+")[0],
    }
    print(json.dumps(info["test"]), flush=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(args.output, lambda tmp: save_file(state, tmp, metadata={"training": json.dumps(info)}))
    print(f"wrote {args.output} ({Path(args.output).stat().st_size // 1024} KiB) in {seconds:.0f} s of training")


if __name__ == "__main__":
    main()
