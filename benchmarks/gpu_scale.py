"""EditorNet training and editing at real model sizes, on randomly initialised models.

    python benchmarks/gpu_scale.py --out docs/results/gpu-scale/h100   # CUDA, bf16, all REAL models
    python benchmarks/gpu_scale.py --tiny                          # the same code on CPU, tiny configs
    python benchmarks/gpu_scale.py --tiny --device cuda            # a quick smoke test on a GPU
    python benchmarks/gpu_scale.py --tiny --dtype bf16             # the GPU's bf16 model, on CPU (tested)

Reports per model, measured side by side in one process: editor-training step time and peak
memory of the fast path and of the reference path (`--reference-steps 0` skips it) and their
ratio; single-edit latency (checked, and unchecked: `boost=()`) next to one plain no-grad forward
of the same prompt; edits/s of one batched edit of 10. Peak memory on CUDA is
torch.cuda.max_memory_allocated (model weights included), reset before each path; on CPU it is
the process's peak resident memory (Linux, reset likewise; it includes the Python and PyTorch
runtime, ~0.5 GiB), so a real size that fits in RAM can be sized without a GPU:
    python benchmarks/gpu_scale.py --device cpu --dtype bf16 --only llama-7b --reference-steps 0
Weights are random, so only speed and memory mean anything here (a checked edit of a random
model usually misses its target and tries every boost: the unchecked time is the edit's own
cost). The goal: editor training for the 7B model within 24 GB of GPU memory.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import traceback
from pathlib import Path

import torch
from speed import reset_rss_peak, rss_peak_mb  # benchmarks/speed.py
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from mend.config import EditorConfig, Sampling, TrainConfig
from mend.edit import MendEditor
from mend.editor import EditorNet
from mend.files import write_json
from mend.models import find_editable
from mend.models.upper import UpperStack
from mend.training.sampling import build_rows
from mend.training.step import edit_step
from mend.types import EditRequest, Probe

REAL = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True, max_position_embeddings=2048)),
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
WORDS = "the of capital city is located in river mountain speaks language plays piano guitar born"
WORDS = WORDS.split()


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


class Clock:
    """Wall time and peak memory on one device (CUDA work is synchronised before reading)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_rss_peak()

    def peak_gib(self) -> float:
        """Peak GPU memory allocated (CUDA) or peak resident memory (CPU) since the reset."""
        return (torch.cuda.max_memory_allocated() if self.cuda else rss_peak_mb() * 2**20) / 2**30

    def median(self, fn, repeats: int) -> float:
        """Median seconds of fn() over `repeats` calls, after one untimed warm-up call."""
        fn()
        times = []
        for _ in range(repeats):
            t = self.now()
            fn()
            times.append(self.now() - t)
        return statistics.median(times)


def train_path(editor, stack, pool, tcfg, clock: Clock, steps: int) -> dict:
    """Median step time (forward, backward, Adam) and peak memory of one training path."""
    opt = torch.optim.Adam(editor.net.parameters(), lr=1e-5)
    step = iter(range(10**9))

    def one():
        rng = random.Random(next(step))
        reqs = rng.sample(pool, tcfg.sampling.edits_per_step)
        loss, _ = edit_step(editor, reqs, build_rows(reqs, pool, tcfg.sampling, rng), tcfg, stack)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    clock.reset_peak()
    sec = clock.median(one, steps)
    return {"step_s": sec, "peak_gib": clock.peak_gib()}


def measure(name, family, overrides, device, dtype, args) -> dict:
    clock = Clock(device)
    tok = tokenizer()
    cfg = AutoConfig.for_model(family, **overrides)
    t = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval().requires_grad_(False)
    build_s = time.perf_counter() - t
    params = find_editable(model)
    tcfg = TrainConfig(editor=EditorConfig(rank=args.rank), sampling=Sampling(loc_per_edit=4))
    torch.manual_seed(0)
    net = EditorNet({p.name: p.in_out for p in params}, tcfg.editor).to(device).train()
    editor = MendEditor(model, tok, net)
    stack = UpperStack(model, UpperStack.first_edited_block(model, [p.name for p in params]))
    pool = requests(64)
    row = {"model": name, "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
           "editor_params_m": sum(p.numel() for p in net.parameters()) / 1e6,
           # the key preconditioners: one (in, in) matrix per edited weight (1 GB for GPT-J's fc_out)
           "editor_buffers_m": sum(b.numel() for b in net.buffers()) / 1e6,
           "edited": [p.name for p in params], "build_s": build_s}  # fmt: skip
    row["fast"] = train_path(editor, stack, pool, tcfg, clock, args.steps)
    if args.reference_steps:
        row["reference"] = train_path(editor, None, pool, tcfg, clock, args.reference_steps)
        row["speedup"] = row["reference"]["step_s"] / row["fast"]["step_s"]
    net.eval()
    req = [pool[0]]
    ids = tok(req[0].prompt, return_tensors="pt").to(device)
    unchecked = MendEditor(model, tok, net, boost=())

    @torch.no_grad()
    def forward():
        model(**ids, use_cache=False)

    row["prompt_tokens"] = ids["input_ids"].shape[1]
    row["forward_s"] = clock.median(forward, args.repeats)
    row["edit_s"] = clock.median(lambda: editor.edit(req).revert(), args.repeats)
    row["unchecked_edit_s"] = clock.median(lambda: unchecked.edit(req).revert(), args.repeats)
    row["unchecked_over_forward"] = row["unchecked_edit_s"] / row["forward_s"]
    k10 = clock.median(lambda: unchecked.edit(pool[:10]).revert(), max(2, args.repeats // 3))
    row["batched10_edits_per_s"] = 10 / k10
    ref = row.get("reference")
    print(f"{name:<13} {row['params_b']:6.2f}B  train step fast {row['fast']['step_s']:.3f} s"
          + (f" / reference {ref['step_s']:.3f} s ({row['speedup']:.2f}x)" if ref else "")
          + f", peak {row['fast']['peak_gib']:.2f} GiB" + (f" / {ref['peak_gib']:.2f} GiB" if ref else "")
          + (" (CUDA allocated)" if clock.cuda else " (CPU resident)")
          + f"; edit {row['unchecked_edit_s'] * 1e3:.1f} ms unchecked ({row['edit_s'] * 1e3:.1f}"
          f" checked) vs forward {row['forward_s'] * 1e3:.1f} ms: "
          f"{row['unchecked_over_forward']:.2f}x; k=10 {row['batched10_edits_per_s']:.0f} edits/s; "
          f"editor {row['editor_params_m']:.0f}M params + {row['editor_buffers_m']:.0f}M in buffers",
          flush=True)  # fmt: skip
    return row  # the model and editor go with this frame; main() frees their memory


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--tiny", action="store_true", help="tiny configs (on CPU unless --device says otherwise)"
    )
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument("--steps", type=int, default=5, help="timed fast-path steps per model")
    ap.add_argument(
        "--reference-steps", type=int, default=3, help="timed reference steps (0: skip)"
    )
    ap.add_argument("--repeats", type=int, default=6, help="timed edits and forwards per model")
    ap.add_argument(
        "--dtype", choices=("auto", "bf16", "fp32"), default="auto",
        help="base model dtype (auto: bf16 on CUDA, fp32 on CPU); the editor stays fp32",
    )  # fmt: skip
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--only", nargs="*", help="model names to run")
    ap.add_argument("--out", default=None, help="write OUT.json (after every model)")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on CPU")
    table = TINY if args.tiny else REAL
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.startswith("cuda"))
    dtype = torch.bfloat16 if bf16 else torch.float32
    rank = min(args.rank, 32) if args.tiny else args.rank
    args.rank = rank
    report = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
              "torch": torch.__version__, "dtype": str(dtype), "rank": rank, "batch_edits": 4,
              "peak_memory": "torch.cuda.max_memory_allocated" if device.startswith("cuda")
              else "peak resident memory of the process (VmHWM)",
              "rows": [], "failed": {}}  # fmt: skip
    for name, (family, overrides) in table.items():
        if args.only and name not in args.only:
            continue
        try:
            report["rows"].append(measure(name, family, overrides, device, dtype, args))
        except Exception as e:  # noqa: BLE001 - one model's failure must not lose the others
            traceback.print_exc()
            report["failed"][name] = f"{type(e).__name__}: {e}"
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if args.out:
            write_json(Path(args.out).with_suffix(".json"), report)
            Path(args.out).with_suffix(".md").write_text(to_markdown(report))
    if report["failed"]:
        raise SystemExit(f"failed: {', '.join(report['failed'])}")


def to_markdown(r: dict) -> str:
    """The report as a Markdown table, one row per model."""
    where = "GPU memory allocated" if r["peak_memory"].startswith("torch.cuda") else "peak RSS"
    lines = [f"# Scale: {r['device']}, model {r['dtype']}, editor rank {r['rank']}, "
             f"{r['batch_edits']} edits per step", "",
             f"| model | params | editor (+ buffers) | train step fast / reference (ratio) | {where} fast / "
             "reference | forward | edit unchecked / checked (unchecked / forward) | k=10 edits/s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for x in r["rows"]:
        ref = x.get("reference")
        step = f"{x['fast']['step_s']:.3f} s" + (f" / {ref['step_s']:.3f} s ({x['speedup']:.2f}x)" if ref else "")  # fmt: skip
        mem = f"{x['fast']['peak_gib']:.2f} GiB" + (f" / {ref['peak_gib']:.2f} GiB" if ref else "")
        lines.append(f"| {x['model']} | {x['params_b']:.2f}B | {x['editor_params_m']:.0f}M "
                     f"(+ {x.get('editor_buffers_m', float('nan')):.0f}M) | {step} | "
                     f"{mem} | {x['forward_s'] * 1e3:.1f} ms | {x['unchecked_edit_s'] * 1e3:.1f} / "
                     f"{x['edit_s'] * 1e3:.1f} ms ({x['unchecked_over_forward']:.2f}x) | "
                     f"{x['batched10_edits_per_s']:.1f} |")  # fmt: skip
    lines += [f"| {name} | failed: {why} | | | | | | |" for name, why in r["failed"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
