"""Data-layer benchmark: tokenizer throughput and the share of a demo step spent waiting for the sampler.

Prints one JSON object:

* ``tokenize_mb_per_s_per_core``: MB of UTF-8 text per CPU-second, bundled 4096-token BPE, batch encoding over
  all cores (target >= 2); ``tokenize_mb_per_s_single_thread`` one thread; ``..._wall_all_cores`` wall-clock;
* ``sampler_ms_per_batch``: mean ``MixtureSampler.next_batch()`` time for the demo size (seq_len 128, batch 16);
* ``step_ms``: forward + backward + AdamW of a demo-sized torch model (d=128, 4 layers, 2048 tokens), wall;
* ``data_wait_share``: sampler / (sampler + step) (target < 0.02).

Usage: ``python benchmarks/data.py [--steps 2000]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tokenizer_throughput(data, mb: float = 4.0) -> dict:
    # Benchmark text = the demo shards decoded back to text (the bundle is self-contained; no corpus needed).
    docs: list[str] = []
    size = 0
    for name in data.source_names:
        tokens = data.train_tokens(name)
        off = data.doc_offsets(name)
        for i in range(len(off) - 1):
            doc = data.decode(tokens[off[i] : off[i + 1]])
            docs.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= mb * 1e6 * (data.source_names.index(name) + 1) / len(data.source_names):
                break
    tok = data.tokenizer
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encode(docs[:100], add_special_tokens=False)  # warm-up
    cores = int(os.environ.get("RAYON_NUM_THREADS") or os.cpu_count() or 1)
    # Per core = text / CPU seconds of all threads: robust on a shared machine, where wall time / cores would
    # charge other processes' load to the tokenizer. Wall throughput is reported too.
    t0, c0 = time.perf_counter(), time.process_time()
    encode(docs, add_special_tokens=False)
    par_wall, par_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    for d in docs:  # single encode calls run on one thread
        tok.encode(d, add_special_tokens=False)
    single_cpu = time.process_time() - c0
    mbytes = size / 1e6
    return {
        "tokenize_text_mb": round(mbytes, 2),
        "tokenize_cores": cores,
        "tokenize_mb_per_s_per_core": round(mbytes / par_cpu, 2),
        "tokenize_mb_per_s_wall_all_cores": round(mbytes / par_wall, 2),
        "tokenize_mb_per_s_single_thread": round(mbytes / single_cpu, 2),
    }


def sampler_time(data, steps: int) -> float:
    from moecpt.data.mixture import MixtureSampler

    s = MixtureSampler(data, {"english": 0.5, "code": 0.3, "german": 0.2}, seq_len=128, batch_size=16, seed=0,
                       allow_repeat=True)
    for _ in range(50):
        s.next_batch()
    t0 = time.perf_counter()
    for _ in range(steps):
        s.next_batch()
    return (time.perf_counter() - t0) / steps


def step_time(vocab: int, steps: int = 20) -> float:
    import torch
    from torch import nn

    torch.manual_seed(0)
    def layer():
        return nn.TransformerEncoderLayer(128, 4, 352, dropout=0.0, batch_first=True, norm_first=True)

    model = nn.Sequential(nn.Embedding(vocab, 128), *[layer() for _ in range(4)], nn.Linear(128, vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, vocab, (16, 129))
    mask = nn.Transformer.generate_square_subsequent_mask(128)

    def step():
        h = model[0](x[:, :-1])
        for blk in model[1:-1]:
            h = blk(h, src_mask=mask, is_causal=True)
        loss = nn.functional.cross_entropy(model[-1](h).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description="data-layer benchmark")
    ap.add_argument("--steps", type=int, default=2000, help="sampler batches timed")
    args = ap.parse_args()
    from moecpt.data.prepared import PreparedData

    t0 = time.perf_counter()
    data = PreparedData.open("demo")
    open_s = time.perf_counter() - t0
    out = {"demo_open_s": round(open_s, 3)}
    out.update(tokenizer_throughput(data))
    t_batch = sampler_time(data, args.steps)
    t_step = step_time(data.vocab_size)
    out.update({
        "sampler_ms_per_batch": round(t_batch * 1e3, 4),
        "step_ms": round(t_step * 1e3, 2),
        "data_wait_share": round(t_batch / (t_batch + t_step), 5),
        "targets": {"tokenize_mb_per_s_per_core": ">= 2", "data_wait_share": "< 0.02"},
    })
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
