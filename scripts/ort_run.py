#!/usr/bin/env python3
"""Runs an ONNX model in onnxruntime on .npy inputs and writes each output as NAME.npy.

The reference side of smelt's cross-checks (tests and benchmarks). Inputs whose first dimension
is larger than the model's fixed batch of 1 are run row by row and the outputs concatenated.

usage: ort_run.py MODEL --input NAME=FILE.npy [...] --output-dir DIR [--threads N]
       ort_run.py MODEL --optimized-ops  (prints the op counts of onnxruntime's optimized graph as
                                          JSON: shows which QDQ patterns it fused into integer ops)
"""
import argparse, collections, json, os, re, sys, tempfile

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--input", action="append", default=[])
    ap.add_argument("--output-dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--optimized-ops", action="store_true")
    a = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    if a.optimized_ops:
        import onnx

        so.log_severity_level = 3  # the "hardware specific optimizations" warning
        with tempfile.TemporaryDirectory() as d:
            so.optimized_model_filepath = os.path.join(d, "opt.onnx")
            ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
            ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
        print(json.dumps(dict(sorted(ops.items()))))
        return 0
    if not a.output_dir:
        ap.error("--output-dir is required")
    sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in a.input:
        name, path = spec.split("=", 1)
        feeds[name] = np.load(path)
    decl = {i.name: i.shape for i in sess.get_inputs()}
    row_by_row = any(
        isinstance(decl[n][0], int) and decl[n][0] == 1 and v.ndim > 0 and v.shape[0] > 1
        for n, v in feeds.items() if n in decl and len(decl[n]) > 0
    )
    names = [o.name for o in sess.get_outputs()]
    if row_by_row:
        n = next(iter(feeds.values())).shape[0]
        parts = [sess.run(names, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
        outs = [np.concatenate([p[j] for p in parts], axis=0) for j in range(len(names))]
    else:
        outs = sess.run(names, feeds)
    os.makedirs(a.output_dir, exist_ok=True)
    for name, val in zip(names, outs):
        np.save(os.path.join(a.output_dir, re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".npy"), val)


if __name__ == "__main__":
    sys.exit(main())
