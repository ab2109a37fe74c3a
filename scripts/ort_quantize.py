#!/usr/bin/env python3
"""onnxruntime's side of `scripts/compare-quant.sh`: quantize a model with
onnxruntime.quantization, calibrated on exactly the inputs `smelt quantize --calib` reads.

Calibration data mirrors smelt_data: an MNIST idx folder gives the first --limit images of the
split as float 0..255 [1,1,28,28] (one per call: MNIST-8 has a fixed batch of 1); a Brown corpus
folder with --tokenizer gives the first --limit sentences of >= 5 words, tokenized with the same
tokenizer.json (padding off, truncation to --max-len, batches padded to their longest sentence).

Prints one JSON line: the wall time of the quantize call alone (`seconds`; calibration inputs are
prepared before the clock starts), of the optional pre-processing, and the output path.
Also importable: ort_eval.py reuses the readers below.
"""
import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

IMAGES_MAGIC = 0x0803
LABELS_MAGIC = 0x0801
BROWN_NAME = re.compile(r"^c[a-z][0-9][0-9]$")


def die(msg):
    print(f"ort_quantize: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _idx_file(d, prefix, kind, rank):
    for name in (f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    return None


def _read_idx(path, magic, limit):
    with open(path, "rb") as f:
        raw = f.read()
    rank = magic & 0xFF
    if len(raw) < 4 + 4 * rank:
        raise ValueError(f"{path}: truncated header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: bad magic 0x{got:08x}, expected 0x{magic:08x}")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(rank)]
    n = dims[0] if limit is None else min(dims[0], limit)
    row = int(np.prod(dims[1:])) if rank > 1 else 1
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank)
    if body.size < dims[0] * row:
        raise ValueError(f"{path}: truncated: header says {dims} but body has {body.size} bytes")
    return body[:n * row].reshape([n] + dims[1:])


def mnist(d, split="test", limit=None):
    """(images float32 [N,1,28,28] holding raw 0..255, labels int64 [N] or None), the first
    `limit` of `split` in file order, like smelt_data::load_idx_dir."""
    prefix = "train" if split == "train" else "t10k"
    ip = _idx_file(d, prefix, "images", 3)
    if ip is None:
        raise ValueError(f"no MNIST images file in {d}: expected {prefix}-images-idx3-ubyte")
    x = _read_idx(ip, IMAGES_MAGIC, limit).astype(np.float32)
    x = x.reshape(x.shape[0], 1, x.shape[1], x.shape[2])
    lp = _idx_file(d, prefix, "labels", 1)
    y = _read_idx(lp, LABELS_MAGIC, limit).astype(np.int64) if lp else None
    return x, y


def _brown_line(line):
    words = []
    for tok in line.split():
        w, sep, _tag = tok.rpartition("/")
        w = w if sep and w else tok
        words.append('"' if w in ("``", "''") else w)
    n_words = sum(1 for w in words if any(c.isalnum() for c in w))
    return " ".join(words) if n_words >= 5 else None


def brown_sentences(d, n):
    """The first `n` sentences of >= 5 words, tags stripped, files `ca01`..`cr09` in name order:
    the same list as smelt_data::brown_sentences."""
    files = sorted(f for f in os.listdir(d) if BROWN_NAME.match(f) and os.path.isfile(os.path.join(d, f)))
    if not files:
        raise ValueError(f"Brown corpus directory {d}: no corpus files (expected names like ca01 .. cr09)")
    out = []
    for f in files:
        if len(out) >= n:
            break
        with open(os.path.join(d, f), encoding="utf-8") as fh:
            text = fh.read()
        for line in text.split("\n"):
            if len(out) >= n:
                break
            s = _brown_line(line[:-1] if line.endswith("\r") else line)
            if s is not None:
                out.append(s)
    return out


class TextEncoder:
    """tokenizer.json set up like smelt_data::tokenize: the file's padding is dropped, truncation
    to max_len (special tokens included), batches padded with the pad id to their longest row."""

    def __init__(self, tokenizer_json, max_len=128):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tokenizer_json)
        pad = tok.padding
        self.pad_id = pad["pad_id"] if pad else next(
            (i for i in (tok.token_to_id(t) for t in ("[PAD]", "<pad>")) if i is not None), 0)
        tok.no_padding()
        tok.no_truncation()
        n_special = len(tok.encode("", add_special_tokens=True).ids)
        if max_len <= n_special:
            raise ValueError(f"max_len {max_len} leaves no room for text: the tokenizer adds {n_special} special tokens")
        tok.enable_truncation(max_length=max_len)
        self.tok = tok

    def encode(self, sentences):
        encs = self.tok.encode_batch(list(sentences), add_special_tokens=True)
        seq = max(len(e.ids) for e in encs)
        b = len(encs)
        ids = np.full((b, seq), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, seq), dtype=np.int64)
        types = np.zeros((b, seq), dtype=np.int64)
        for r, e in enumerate(encs):
            k = len(e.ids)
            ids[r, :k] = e.ids
            types[r, :k] = e.type_ids
            mask[r, :k] = e.attention_mask
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def runtime_inputs(model_path):
    """Graph inputs that are not initializers: (name, shape as list of int or None)."""
    import onnx

    m = onnx.load(model_path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    out = []
    for i in m.graph.input:
        if i.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
        out.append((i.name, dims))
    return out


def text_feeds(model_path, brown_dir, tokenizer, limit, max_len, batch):
    names = [n for n, _ in runtime_inputs(model_path)]
    enc = TextEncoder(tokenizer, max_len)
    sents = brown_sentences(brown_dir, limit)
    if not sents:
        raise ValueError(f"no text found in {brown_dir}")
    feeds = []
    for s in range(0, len(sents), batch):
        b = enc.encode(sents[s:s + batch])
        for n in names:
            if n not in b:
                raise ValueError(f"text data provides input_ids, attention_mask and token_type_ids, but the model also wants '{n}'")
        feeds.append({n: b[n] for n in names})
    return feeds, len(sents)


def image_feeds(model_path, d, split, limit, batch):
    ins = runtime_inputs(model_path)
    if len(ins) != 1:
        raise ValueError(f"image data feeds one input, but the model has {len(ins)}")
    name, shape = ins[0]
    x, _ = mnist(d, split, limit)
    if shape and shape[0] == 1:
        batch = 1  # fixed batch of 1, as smelt feeds MNIST-8
    return [{name: x[s:s + batch]} for s in range(0, len(x), batch)], len(x)


def is_brown_dir(p):
    return os.path.isfile(os.path.join(p, "ca01"))


def _flatten_gemm_bias(path):
    """Reshapes [1, N] Gemm biases to [N] (the same broadcast). The ORT optimizer fuses
    MNIST-8's MatMul + Add into a Gemm keeping the [1, 10] bias, and quantize_static's
    per-channel int32-bias check then fails on it ("truth value of an array ... is ambiguous")."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    inits = {i.name: i for i in m.graph.initializer}
    changed = False
    for n in m.graph.node:
        if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] in inits:
            b = inits[n.input[2]]
            if len(b.dims) == 2 and b.dims[0] == 1:
                users = [u for u in m.graph.node if n.input[2] in u.input]
                if len(users) == 1:
                    b.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(b).reshape(-1), b.name))
                    # IR v3 graphs also list initializers as inputs, with their shape.
                    for vi in list(m.graph.input) + list(m.graph.value_info):
                        if vi.name == b.name:
                            dims = vi.type.tensor_type.shape.dim
                            del dims[0]
                    changed = True
    if changed:
        onnx.save(m, path)
    return path


class ListReader:
    """CalibrationDataReader over feeds prepared in advance, so reading and tokenizing stay
    outside the timed quantize call."""

    def __init__(self, feeds):
        self.feeds = feeds
        self.i = 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--mode", choices=["static", "dynamic"], default="static")
    ap.add_argument("--method", choices=["minmax", "percentile", "entropy"], default="minmax",
                    help="activation calibration (static only)")
    ap.add_argument("--percentile", type=float, default=99.999)
    ap.add_argument("--per-channel", action="store_true", help="per-output-channel weight scales")
    ap.add_argument("--weight-type", choices=["int8", "uint8"], default="int8")
    ap.add_argument("--act-type", choices=["uint8", "int8"], default="uint8")
    ap.add_argument("--act-sym", action="store_true", help="symmetric activation ranges")
    ap.add_argument("--weight-asym", action="store_true",
                    help="asymmetric weights (default: onnxruntime's, symmetric for int8, asymmetric for uint8)")
    ap.add_argument("--calib", help="MNIST idx folder, or Brown corpus folder with --tokenizer")
    ap.add_argument("--split", choices=["train", "test"], default="train")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--tokenizer")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1,
                    help="calibration rows per run (text is padded to the batch's longest; a model with a fixed batch of 1 gets 1)")
    ap.add_argument("--exclude", action="append", default=[], help="node name to leave in float")
    ap.add_argument("--preprocess", action="store_true",
                    help="run quant_pre_process (ORT optimizer + shape inference) first, timed separately")
    a = ap.parse_args()

    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_dynamic, quantize_static)

    if not os.path.isfile(a.model):
        die(f"model {a.model} does not exist")
    if a.limit < 1 or a.batch < 1 or a.max_len < 1:
        die("--limit, --batch and --max-len must be at least 1")
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    src = a.model
    tmp = tempfile.TemporaryDirectory(prefix="ort_quantize.")
    pre_s = 0.0
    # quantize_static lifts opset < 11 models to 11 only, but a per-channel DequantizeLinear
    # (its `axis`) needs opset 13, so ORT would write a model it cannot load itself: lift first.
    upgraded_from = None
    if a.per_channel:
        import onnx
        from onnx import version_converter

        m = onnx.load(src)
        v = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 13)
        if v < 13:
            t0 = time.perf_counter()
            m = version_converter.convert_version(m, 13)
            src = os.path.join(tmp.name, "opset13.onnx")
            onnx.save(m, src)
            pre_s += time.perf_counter() - t0
            upgraded_from = v

    if a.preprocess:
        pre_out = os.path.join(tmp.name, "pre.onnx")
        t0 = time.perf_counter()
        # Symbolic shape inference needs sympy, which the venv does not carry; ONNX shape
        # inference and the ORT optimizer (constant folding) still run.
        try:
            import sympy  # noqa: F401
            skip_sym = False
        except ImportError:
            skip_sym = True
        quant_pre_process(src, pre_out, skip_symbolic_shape=skip_sym)
        src = _flatten_gemm_bias(pre_out)
        pre_s += time.perf_counter() - t0
    samples = 0
    prep_s = 0.0
    if a.mode == "static":
        if not a.calib:
            die("static mode needs --calib")
        if not os.path.exists(a.calib):
            die(f"calibration path {a.calib} does not exist")
        t0 = time.perf_counter()
        try:
            if a.tokenizer:
                if not (os.path.isdir(a.calib) and is_brown_dir(a.calib)):
                    die(f"{a.calib} is not a Brown corpus folder (no ca01)")
                feeds, samples = text_feeds(src, a.calib, a.tokenizer, a.limit, a.max_len, a.batch)
            else:
                feeds, samples = image_feeds(src, a.calib, a.split, a.limit, a.batch)
        except (ValueError, OSError) as e:
            die(str(e))
        prep_s = time.perf_counter() - t0
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[a.method]
        extra = {"ActivationSymmetric": a.act_sym}
        if a.weight_asym:
            extra["WeightSymmetric"] = False
        if a.method == "percentile":
            extra["CalibPercentile"] = a.percentile
        t0 = time.perf_counter()
        # The histogram calibrators print progress on stdout, which must stay one JSON line.
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(src, a.output, ListReader(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=a.per_channel, activation_type=qtype[a.act_type],
                            weight_type=qtype[a.weight_type], nodes_to_exclude=a.exclude,
                            calibrate_method=method, extra_options=extra)
        secs = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            quantize_dynamic(src, a.output, per_channel=a.per_channel, weight_type=qtype[a.weight_type],
                             nodes_to_exclude=a.exclude,
                             extra_options={"WeightSymmetric": False} if a.weight_asym else None)
        secs = time.perf_counter() - t0
    tmp.cleanup()
    print(json.dumps({
        "tool": "onnxruntime", "version": ort.__version__, "model": a.model, "output": a.output,
        "mode": a.mode, "method": a.method if a.mode == "static" else None,
        "per_channel": a.per_channel, "weight_type": a.weight_type, "weight_asym": a.weight_asym,
        "act_type": a.act_type if a.mode == "static" else None,
        "calib_samples": samples, "calib_batches": len(feeds) if a.mode == "static" else 0,
        "preprocessed": a.preprocess, "opset_upgraded_from": upgraded_from, "preprocess_seconds": pre_s, "calib_prep_seconds": prep_s,
        "seconds": secs,
    }))


if __name__ == "__main__":
    main()
