"""Training throughput of nncore's Solver against PyTorch on the CPU for the same networks, with the BLAS GEMM peak.

Usage: python benchmarks/nncore_throughput.py [--rounds 5] [--threads 1,2] [--nets mlp,conv] [--markdown]

Both frameworks train the same float32 network (MLPs, a 1-D ConvNet on (1, 40) sequences and a CIFAR-sized
2-D ConvNet: conv -> ReLU -> max pool blocks, "same" padding, then the MLP head) with SGD + momentum 0.9 on the
same synthetic data (same
number of samples, a fresh shuffle per epoch). Each round trains two epochs with each framework in turn
and times the second (nncore: the Solver's own samples_per_sec, i.e. its whole minibatch loop with EMA
and divergence checks; torch: the equivalent loop). Reported: the best round of each (which filters out
load from other processes on a shared machine), their ratio, and the median (and range) of the per-round
ratios of back-to-back runs, which sees both frameworks under the same load. GFLOP/s counts the GEMM work the
step needs: forward and weight gradients of every layer (convolutions as their im2col GEMMs), input gradients of
all but the first (2 flops per multiply-add).
"""
import argparse
import math
import os
import statistics
import sys
import time
from datetime import date
from types import SimpleNamespace

import numpy as np
from threadpoolctl import threadpool_info

from nncore.model import build_model
from nncore.solver import Solver
from worker.threads import use_threads

_CONV1D = {"arch": "conv1d", "conv_channels": [32, 64], "conv_kernel": 5, "conv_pool": 2, "hidden": [128]}
_CONV2D = {"arch": "conv2d", "conv_channels": [32, 64], "conv_kernel": 3, "conv_pool": 2, "hidden": [256]}
NETS = {  # kind -> [(label, per-sample input shape, model config, classes, batch size, samples per epoch)]
    "mlp": [
        ("64-256-10", (64,), {"hidden": [256]}, 10, 128, 128 * 400),
        ("784-512-512-10", (784,), {"hidden": [512, 512]}, 10, 256, 256 * 60),
        ("3072-1024-10", (3072,), {"hidden": [1024]}, 10, 256, 256 * 24),
    ],
    "conv": [
        ("conv1d 1x40 c32-c64 k5 p2 h128", (1, 40), _CONV1D, 10, 64, 64 * 150),
        ("conv2d 3x32x32 c32-c64 k3 p2 h256", (3, 32, 32), _CONV2D, 10, 64, 64 * 12),
    ],
}
LR, MOMENTUM = 1e-2, 0.9


def flops_per_sample(input_shape, cfg, classes):
    """GEMM flops of one training step per sample: conv layers as (positions x C*K) @ (C*K x F) im2col GEMMs,
    affine layers as they are; forward and weight gradient everywhere, input gradient but for the first layer."""
    gemms = []  # multiply-adds of each layer's forward GEMM
    width = math.prod(input_shape)
    if cfg.get("arch", "mlp") != "mlp":
        channels, *size = input_shape
        kernel, pool = cfg["conv_kernel"], cfg["conv_pool"]
        for filters in cfg["conv_channels"]:
            gemms.append(math.prod(size) * filters * channels * kernel ** len(size))  # "same" padding, stride 1
            size, channels = [s // pool for s in size], filters
        width = channels * math.prod(size)
    for units in [*cfg["hidden"], classes]:
        gemms.append(width * units)
        width = units
    return 2 * (3 * sum(gemms) - gemms[0])


def synthetic(input_shape, classes, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *input_shape), dtype=np.float32)
    y = rng.integers(0, classes, size=n, dtype=np.int64)
    return x, y


def gemm_peak(size=2048, repeats=3):
    """Best float32 GEMM rate (GFLOP/s) of NumPy's BLAS for size x size matrices."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, b, out=out)
    best = min(_timed(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_nncore(input_shape, cfg, classes, batch, x, y):
    model = build_model(cfg, input_shape, classes, seed=0)
    data = SimpleNamespace(x_train=x, y_train=y, x_val=x[:batch], y_val=y[:batch])
    rates = []
    config = {"update": "momentum", "lr": LR, "momentum": MOMENTUM, "batch_size": batch, "epochs": 2,
              "train_eval_samples": batch, "abort_factor": 1e6}  # random labels: no divergence abort
    result = Solver(model, data, config, callback=lambda m: rates.append(m["samples_per_sec"])).train()
    if result["status"] != "completed":
        raise RuntimeError(f"nncore run {result['status']}: {result['reason']}")
    return rates[-1]


def torch_net(torch, input_shape, cfg, classes):
    """The torch.nn.Sequential equivalent of nncore's model for cfg (conv blocks, then the MLP head)."""
    nn = torch.nn
    layers = []
    width = math.prod(input_shape)
    if cfg.get("arch", "mlp") != "mlp":
        channels, *size = input_shape
        conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(size) == 1 else (nn.Conv2d, nn.MaxPool2d)
        kernel = cfg["conv_kernel"]
        for filters in cfg["conv_channels"]:
            layers += [conv(channels, filters, kernel, padding=(kernel - 1) // 2), nn.ReLU(), pool(cfg["conv_pool"])]
            size, channels = [s // cfg["conv_pool"] for s in size], filters
        width = channels * math.prod(size)
    layers.append(nn.Flatten())
    for units in cfg["hidden"]:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def bench_torch(torch, input_shape, cfg, classes, batch, x, y):
    torch.manual_seed(0)
    net = torch_net(torch, input_shape, cfg, classes)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = len(x)
    for _ in range(2):
        start = time.perf_counter()
        order = torch.randperm(n)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            loss.item()  # the Solver reads every minibatch loss too (divergence check)
        rate = n / (time.perf_counter() - start)
    return rate


def blas_description():
    rows = [f"{i['internal_api']} {i['version']} ({i.get('architecture', '?')} kernels, "
            f"{i.get('threading_layer', '?')}, {i['num_threads']} threads max) {os.path.basename(i['filepath'])}"
            for i in threadpool_info() if i["user_api"] == "blas"]
    return "; ".join(rows) or "no BLAS found by threadpoolctl"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per shape")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated BLAS thread counts")
    parser.add_argument("--nets", default="mlp,conv", help="comma-separated kinds of network: mlp, conv")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
        print("torch is not installed (pip install torch==2.13.0): measuring nncore only", file=sys.stderr)

    print(f"date {date.today()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
          f"numpy {np.__version__}" + (f", torch {torch.__version__}" if torch else ""))
    print(f"BLAS: {blas_description()}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    header = ["threads", "shape", "batch", "nncore samples/s", "torch samples/s", "nncore/torch (best)",
              "paired ratio median (range)", "nncore GFLOP/s", "sgemm peak GFLOP/s", "% of peak"]
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        use_threads(threads)  # as a worker started with --threads does (the allocator setting serves torch too)
        if torch:
            torch.set_num_threads(threads)
        for label, input_shape, cfg, classes, batch, n in [net for kind in args.nets.split(",")
                                                           for net in NETS[kind]]:
            x, y = synthetic(input_shape, classes, n)
            ours, theirs, peaks = [], [], []
            for _ in range(args.rounds):  # interleaved, so all three see the same load
                peaks.append(gemm_peak())
                ours.append(bench_nncore(input_shape, cfg, classes, batch, x, y))
                if torch:
                    theirs.append(bench_torch(torch, input_shape, cfg, classes, batch, x, y))
            gflops = flops_per_sample(input_shape, cfg, classes) * max(ours) / 1e9
            ratios = [a / b for a, b in zip(ours, theirs)]
            rows.append([str(threads), label, str(batch),
                         f"{max(ours):,.0f}", f"{max(theirs):,.0f}" if torch else "n/a",
                         f"{max(ours) / max(theirs):.2f}" if torch else "n/a",
                         (f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                          if torch else "n/a"),
                         f"{gflops:.0f}", f"{max(peaks):.0f}", f"{100 * gflops / max(peaks):.0f}%"])
            print("  ".join(rows[-1]), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.markdown:
        print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
