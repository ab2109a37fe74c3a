#!/usr/bin/env python3
"""Evaluates a (quantized) model in onnxruntime for `scripts/compare-quant.sh`. Prints one JSON line.

--task mnist: top-1 accuracy on the MNIST test split (10k images, float 0..255, one per run
  when the model's batch is fixed at 1).
--task minilm --reference REF.onnx: sentence embeddings (last_hidden_state averaged over tokens,
  weighted by the attention mask) of the first --limit Brown sentences, compared with the
  reference model's by cosine similarity; reports mean and min.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True  # no scripts/__pycache__ in the work tree
import ort_quantize as oq  # noqa: E402  (shared readers)


def session(path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def eval_mnist(a):
    x, y = oq.mnist(a.data, a.split, a.limit)
    if y is None:
        raise ValueError(f"no labels for the {a.split} split in {a.data}")
    s = session(a.model, a.threads)
    inp = s.get_inputs()[0]
    fixed_one = isinstance(inp.shape[0], int) and inp.shape[0] == 1
    bs = 1 if fixed_one else a.batch
    correct = 0
    for i in range(0, len(x), bs):
        logits = s.run(None, {inp.name: x[i:i + bs]})[0]
        correct += int((logits.reshape(logits.shape[0], -1).argmax(axis=1) == y[i:i + bs]).sum())
    return {"samples": int(len(x)), "correct": correct, "accuracy": correct / len(x)}


def pooled(s, feeds, out_name):
    embs = []
    for f in feeds:
        h = s.run([out_name], {k: v for k, v in f.items() if k in {i.name for i in s.get_inputs()}})[0]
        m = f["attention_mask"].astype(np.float64)[:, :, None]
        embs.append((h.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9))
    return np.concatenate(embs)


def eval_minilm(a):
    if not a.reference or not a.tokenizer:
        raise ValueError("--task minilm needs --reference and --tokenizer")
    enc = oq.TextEncoder(a.tokenizer, a.max_len)
    sents = oq.brown_sentences(a.data, a.limit)
    if not sents:
        raise ValueError(f"no sentences in {a.data}")
    feeds = [enc.encode(sents[i:i + a.batch]) for i in range(0, len(sents), a.batch)]
    q = pooled(session(a.model, a.threads), feeds, a.output_name)
    r = pooled(session(a.reference, a.threads), feeds, a.output_name)
    cos = (q * r).sum(axis=1) / np.maximum(np.linalg.norm(q, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
    return {"samples": len(sents), "reference": a.reference, "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--task", choices=["mnist", "minilm"], required=True)
    ap.add_argument("--data", required=True, help="MNIST idx folder, or Brown corpus folder")
    ap.add_argument("--split", choices=["train", "test"], default="test")
    ap.add_argument("--limit", type=int, help="samples (minilm default 200, mnist default all)")
    ap.add_argument("--reference")
    ap.add_argument("--tokenizer")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1,
                    help="rows per run (text batches are padded to their longest sentence)")
    ap.add_argument("--output-name", default="last_hidden_state")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.task == "minilm" and a.limit is None:
        a.limit = 200
    a.batch = max(1, a.batch)
    for m in (a.model, a.reference):
        if m and not os.path.isfile(m):
            print(f"ort_eval: error: model {m} does not exist", file=sys.stderr)
            sys.exit(2)
    t0 = time.perf_counter()
    try:
        res = eval_mnist(a) if a.task == "mnist" else eval_minilm(a)
    except (ValueError, OSError) as e:
        print(f"ort_eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"tool": "onnxruntime", "model": a.model, "task": a.task, **res,
                      "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
