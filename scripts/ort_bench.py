#!/usr/bin/env python3
"""onnxruntime's side of `scripts/bench.sh`: median latency of MODEL on synthesized inputs.
`smelt compress/prune --ort-python` run this file (compiled into the binary) once per model per
round: onnxruntime's idle threads spin after a run, so two sessions timed in one process slow
each other down.

Inputs follow smelt's rule (smelt_engine::analysis::synth_inputs): symbolic first dim = batch,
other symbolic dims = seq-len; floats uniform in [0,1); integer inputs named like a mask = 1,
integer inputs named like token types / segments = 0, other integers in [0,100). Prints one JSON object like `smelt bench --json`.
"""
import argparse, json, resource, statistics, time

import numpy as np
import onnxruntime as ort

TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
         "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = []
        for k, d in enumerate(i.shape):
            if isinstance(d, int):
                shape.append(a.batch if k == 0 and d == 1 and a.batch != 1 else d)
            else:
                shape.append(a.batch if k == 0 else a.seq_len)
        t = TYPES[i.type]
        if t == np.float32:
            feeds[i.name] = rng.random(shape, dtype=np.float32)
        elif "mask" in i.name.lower():
            feeds[i.name] = np.ones(shape, dtype=t)
        elif "type" in i.name.lower() or "segment" in i.name.lower():
            feeds[i.name] = np.zeros(shape, dtype=t)
        else:
            feeds[i.name] = rng.integers(0, 100, shape).astype(t)
    for _ in range(a.warmup):
        sess.run(None, feeds)
    ms = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    pick = lambda p: ms[round((len(ms) - 1) * p)]
    print(json.dumps({"model": a.model, "batch": a.batch, "threads": a.threads, "runs": len(ms),
                      "median_ms": pick(0.5), "p10_ms": pick(0.1), "p90_ms": pick(0.9),
                      "peak_rss_bytes": peak_rss_bytes()}))


def peak_rss_bytes():
    """VmHWM, as `smelt bench` reads it: getrusage's ru_maxrss survives exec, so a process
    started by a large one (a test binary) would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
