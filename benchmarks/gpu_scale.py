"""Editor training and editing at real model sizes, on randomly initialised models.

    python benchmarks/gpu_scale.py                # CUDA, bf16: GPT-2 XL, GPT-J 6B, Llama 7B, 13B
    python benchmarks/gpu_scale.py --tiny         # the same code on CPU with tiny configs

Reports per model: editor-training step time and peak memory (GPU: torch.cuda.max_memory_allocated),
single-edit latency. Weights are random, so only speed and memory mean anything here. The goal:
editor training for the 7B model within 24 GB of GPU memory.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from mend.config import EditorConfig, TrainConfig
from mend.edit import MendEditor
from mend.editor import Editor
from mend.files import write_json
from mend.models import find_editable
from mend.models.upper import UpperStack
from mend.train import build_rows, edit_step
from mend.types import EditRequest, Probe

REAL = {
    "gpt2-xl-1.5b": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024)),
    "gptj-6b": ("gptj", dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_positions=2048)),
    "llama-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, max_position_embeddings=2048)),
    "llama-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                num_attention_heads=40, max_position_embeddings=2048)),
}  # fmt: skip
TINY = {
    "gpt2-tiny": ("gpt2", dict(n_embd=64, n_layer=4, n_head=4, n_positions=128)),
    "llama-tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, max_position_embeddings=128)),
}  # fmt: skip
WORDS = [
    "the",
    "of",
    "capital",
    "city",
    "is",
    "located",
    "in",
    "river",
    "mountain",
    "speaks",
    "language",
    "plays",
    "piano",
    "guitar",
    "born",
]


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(
        [" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(200)], trainer
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def requests(n: int, seed: int = 0) -> list[EditRequest]:
    rng = random.Random(seed)

    def sentence(k):
        return " ".join(rng.choices(WORDS, k=k))

    return [EditRequest(sentence(12), sentence(2), (sentence(12),), (Probe(sentence(12), sentence(1)),),
                        sentence(2)) for _ in range(n)]  # fmt: skip


def measure(name, family, overrides, device, dtype, steps, rank) -> dict:
    tok = tokenizer()
    cfg = AutoConfig.for_model(family, **overrides)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval().requires_grad_(False)
    params = find_editable(model)
    tcfg = TrainConfig(editor=EditorConfig(rank=rank), batch_size=4, loc_per_edit=4)
    editor = Editor({p.name: p.in_out for p in params}, tcfg.editor).to(device).train()
    me = MendEditor(model, tok, editor)
    stack = UpperStack(model, UpperStack.first_edited_block(model, [p.name for p in params]))
    opt = torch.optim.Adam(editor.parameters(), lr=1e-5)
    pool = requests(64)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):
        rng = random.Random(step)
        reqs = rng.sample(pool, 4)
        sync()
        t = time.perf_counter()
        loss, _ = edit_step(me, reqs, build_rows(reqs, pool, tcfg, rng), tcfg, stack)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    editor.eval()
    lat = []
    for r in pool[:6]:
        sync()
        t = time.perf_counter()
        res = me.edit([r])
        sync()
        lat.append(time.perf_counter() - t)
        res.revert()
    n_params = sum(p.numel() for p in model.parameters()) / 1e9
    row = {"model": name, "params_b": n_params, "train_step_s": statistics.median(times),
           "peak_gib": peak, "edit_s": statistics.median(lat[1:]),
           "editor_params_m": sum(p.numel() for p in editor.parameters()) / 1e6}  # fmt: skip
    print(f"{name:<14} {n_params:6.2f}B  step {row['train_step_s']:.3f} s  peak {peak:.1f} GiB  "
          f"edit {row['edit_s'] * 1e3:.1f} ms  editor {row['editor_params_m']:.0f}M params")  # fmt: skip
    del model, editor, opt, me, stack
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--tiny", action="store_true", help="tiny configs on CPU (keeps the script tested)"
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--only", nargs="*", help="model names to run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        table, device, dtype, rank = TINY, "cpu", torch.float32, min(args.rank, 32)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny on CPU")
        table, device, dtype, rank = REAL, "cuda", torch.bfloat16, args.rank
    rows = [measure(n, f, o, device, dtype, args.steps, rank) for n, (f, o) in table.items()
            if not args.only or n in args.only]  # fmt: skip
    if args.out:
        write_json(Path(args.out), {"device": device, "rows": rows})


if __name__ == "__main__":
    main()
