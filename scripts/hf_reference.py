#!/usr/bin/env python3
"""Reference logits from Hugging Face `transformers` for one of our tiny checkpoints.

Loads a checkpoint directory written by `moe checkpoint new` with the native transformers
class (no trust_remote_code), in float32 with eager attention, runs greedy decoding with
the KV cache for two fixed prompts, and writes the generated ids and the last-position
logits after the prefill and after every decode step as JSON. `model/tests/parity_hf.rs`
replays the same prompts through our engine and compares.

Usually run through `scripts/hf_reference.sh`, which writes every architecture's file.

    python scripts/hf_reference.py --model DIR --out model/tests/data/hf/ARCH.json

Before anything runs, the script checks that every tensor of the checkpoint was loaded
(transformers silently random-initialises missing weights) and that the checkpoint's
config does not rely on a setting the transformers class ignores (see `check_conventions`).
Nothing of the loaded config is patched.
"""

import argparse
import inspect
import json
import math
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM

# Two fixed prompts (ids in [3, 500)), 10 and 23 tokens. Never change them without
# regenerating every reference file: the Rust test reads the prompts from the files.
PROMPTS = [
    [17, 342, 5, 96, 471, 208, 33, 150, 399, 64],
    [3, 488, 121, 257, 12, 77, 301, 450, 9, 186, 233, 58, 499, 140, 371, 26, 95, 412,
     7, 266, 318, 44, 167],
]
NEW_TOKENS = 12
SEED = 1  # the seed the checkpoint was written with (recorded, not used here)


def fnv1a64_file(path):
    """FNV-1a 64 of a file's bytes; the Rust test computes the same over the checkpoint it
    writes, to tell a stale reference from a real mismatch."""
    h = 0xCBF29CE484222325
    with open(path, "rb") as f:
        data = f.read()
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def check_conventions(raw):
    """Fails when the checkpoint's config.json uses a setting that the transformers class
    does not implement, so that the reference would silently describe another model."""
    mt = raw["model_type"]
    problems = []
    if mt in ("deepseek_v2", "deepseek_v3"):
        # transformers decides dense vs MoE by `layer_idx >= first_k_dense_replace` only;
        # DeepSeek's original code also requires `layer_idx % moe_layer_freq == 0`.
        if raw.get("moe_layer_freq", 1) != 1:
            problems.append("moe_layer_freq != 1 is ignored by transformers")
    if mt == "deepseek_v3":
        # The router is hard-wired: sigmoid scores, noaux_tc (bias for selection only),
        # group score = sum of the top-2 per group.
        if raw.get("scoring_func", "sigmoid") != "sigmoid":
            problems.append("scoring_func other than sigmoid is ignored by transformers")
        if raw.get("topk_method", "noaux_tc") != "noaux_tc":
            problems.append("topk_method other than noaux_tc is ignored by transformers")
    if mt == "deepseek_v2":
        # transformers' DeepseekV2TopkRouter never renormalises and always multiplies by
        # routed_scaling_factor; the original renormalises when norm_topk_prob and k > 1
        # (and then does not scale).
        if raw.get("norm_topk_prob") and raw.get("num_experts_per_tok", 1) > 1:
            problems.append("norm_topk_prob=true is ignored by transformers' DeepSeek-V2 router")
        if raw.get("scoring_func", "softmax") != "softmax":
            problems.append("scoring_func other than softmax is ignored by transformers")
    rs = raw.get("rope_scaling") or {}
    if rs and (rs.get("rope_type") or rs.get("type")) == "yarn" and "factor" in rs:
        # The cos/sin scale. DeepSeek's code (and our engine):
        #   get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim),
        #   defaults mscale=1, mscale_all_dim=0.
        # transformers: that ratio only when both are present and non-zero, otherwise
        # get_mscale(factor) (i.e. mscale=1) -- and an explicit `attention_factor` wins.
        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        f = rs["factor"]
        ms, msad = rs.get("mscale"), rs.get("mscale_all_dim")
        ours = get_mscale(f, 1.0 if ms is None else ms) / get_mscale(f, msad or 0.0)
        if rs.get("attention_factor") is not None:
            theirs = rs["attention_factor"]
        elif ms and msad:
            theirs = get_mscale(f, ms) / get_mscale(f, msad)
        else:
            theirs = get_mscale(f)
        if not math.isclose(ours, theirs, rel_tol=1e-12):
            problems.append(f"yarn cos/sin scale: DeepSeek's rule gives {ours}, "
                            f"transformers' gives {theirs}")
    if problems:
        sys.exit(f"{mt}: config.json relies on behaviour transformers does not implement: "
                 + "; ".join(problems))


def round7(x):
    return float(f"{x:.7g}")


def forward(model, ids, cache, cache_kw):
    kwargs = {"input_ids": ids, "use_cache": True}
    if cache is not None:
        kwargs[cache_kw] = cache
    out = model(**kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits[0, -1].float(), new_cache


def run_case(model, prompt, cache_kw):
    tokens, logits, margins = [], [], []
    ids = torch.tensor([prompt], dtype=torch.long)
    cache = None
    for step in range(NEW_TOKENS):
        last, cache = forward(model, ids, cache, cache_kw)
        top2 = torch.topk(last, 2)
        nxt = int(top2.indices[0])
        margins.append(float(top2.values[0] - top2.values[1]))
        tokens.append(nxt)
        logits.append([round7(v) for v in last.tolist()])
        ids = torch.tensor([[nxt]], dtype=torch.long)
    return tokens, logits, min(margins)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()

    with open(os.path.join(args.model, "config.json")) as f:
        raw = json.load(f)
    check_conventions(raw)

    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    # `dtype` is the transformers >= 4.56 name of `torch_dtype` (deprecated in 5.x).
    model, info = AutoModelForCausalLM.from_pretrained(
        args.model,
        dtype=torch.float32,
        attn_implementation="eager",
        output_loading_info=True,
    )
    bad = {k: v for k, v in info.items() if v}
    if bad:
        sys.exit(f"{args.model}: transformers did not load the checkpoint cleanly: {bad}")
    if type(model).__name__ != raw["architectures"][0]:
        sys.exit(f"loaded {type(model).__name__}, config says {raw['architectures'][0]}")
    model.eval()
    # transformers 5.x renamed the cache argument `past_key_values` -> `cache`.
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"

    cases = []
    with torch.no_grad():
        for prompt in PROMPTS:
            tokens, logits, margin = run_case(model, prompt, cache_kw)
            if margin < 1e-3:
                print(f"warning: {raw['model_type']}: a greedy choice has a top-1/top-2 "
                      f"margin of {margin:.2e}; token parity may hinge on rounding",
                      file=sys.stderr)
            cases.append({"prompt": prompt, "tokens": tokens, "logits": logits,
                          "min_top2_margin": round7(margin)})

    doc = {
        "arch": raw["model_type"],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": SEED,
        "weights_fnv1a64": fnv1a64_file(os.path.join(args.model, "model.safetensors")),
        "config": raw,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"{raw['model_type']}: wrote {args.out} ({os.path.getsize(args.out)} bytes); "
          + "; ".join(f"case {i}: {c['tokens']}" for i, c in enumerate(cases)))


if __name__ == "__main__":
    main()
