"""Decode speed of a transformers MoE model, unpatched (HF eager) and patched with pymoe.

The model is random-initialised from a config with the real layer widths of one of the
models below but only a few layers and a small vocabulary, so that it fits one machine and
its time is the MoE blocks' and the attention's, not the embedding's. One model is built:
it runs unpatched first, then `pymoe.hf.patch(model)` swaps its MoE blocks for pymoe
MoELayers and it runs again, on the same prompt, greedy, N new tokens. Decode tokens/s =
(N - 1) / (median time of generate(N) - median time of generate(1)): the prefill of the
prompt and generate's set-up cancel out. Writes results/hf/<device>/<stamp>-<dtype>-<model>-decode.json.

    python scripts/bench_hf_decode.py --model qwen3-30b-a3b --device cpu --layers 2
    python scripts/bench_hf_decode.py --model deepseek-v3 --device gpu --dtype bfloat16 --layers 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pymoe.bench.workload import GIB, MEMORY_SHARE, gpu_memory_bytes, host_memory_bytes  # noqa: E402
from pymoe.dtypes import torch_dtype  # noqa: E402
from pymoe.results import result_header, write_result  # noqa: E402

SCHEMA = "pymoe.hf_decode/1"
MODELS = ("qwen3-30b-a3b", "gpt-oss-20b", "deepseek-v3")


def hf_config(model: str, layers: int = 2, vocab: int = 1024, **overrides):
    """A transformers config with the real widths of `model`'s layers (attention and MoE),
    `layers` decoder layers, all of them MoE, and a `vocab`-token vocabulary; `overrides`
    replace any field (tests shrink the widths)."""
    from transformers import DeepseekV3Config, GptOssConfig, Qwen3MoeConfig

    if model == "qwen3-30b-a3b":  # Qwen/Qwen3-30B-A3B config.json
        fields = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                      norm_topk_prob=True, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                      intermediate_size=6144)
        make = Qwen3MoeConfig
    elif model == "gpt-oss-20b":  # openai/gpt-oss-20b: the config's defaults are its widths, with 32 experts
        kinds = ["sliding_attention", "full_attention"]
        fields = dict(num_local_experts=32, num_experts_per_tok=4, layer_types=[kinds[i % 2] for i in range(layers)])
        make = GptOssConfig
    elif model == "deepseek-v3":  # the config's defaults are DeepSeek-V3's widths; no dense first layers
        fields = dict(first_k_dense_replace=0)
        make = DeepseekV3Config
    else:
        raise ValueError(f"unknown model {model!r}; choose one of {MODELS}")
    return make(**{**fields, "num_hidden_layers": layers, "vocab_size": vocab, **overrides})


def model_bytes(config, dtype: str) -> int:
    """Bytes of the model's weights in `dtype` (counted on the meta device, nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * torch_dtype(dtype).itemsize


def check_fits(config, device: str, dtype: str, patched: bool) -> int:
    """The model's bytes; a ValueError before anything is allocated when it (plus pymoe's copy
    of its MoE weights and their float32 host copy, for the patched run) does not fit."""
    nbytes = model_bytes(config, dtype)
    # pymoe.hf.patch builds its layers through from_hf: a float32 host copy of the blocks'
    # weights (counted as the whole model's), then the layer's own copy on the device.
    float32_copy = nbytes * 4 // torch_dtype(dtype).itemsize if patched else 0
    host_need = float32_copy + (nbytes * (1 + patched) if device == "cpu" else 0)
    host = host_memory_bytes()
    if host_need > MEMORY_SHARE * host:
        raise ValueError(f"the model needs about {host_need / GIB:.1f} GiB of host memory, this machine has "
                         f"{host / GIB:.1f} GiB: use fewer --layers" + (" or --device gpu" if device == "cpu" else ""))
    if device == "gpu":
        need, have = nbytes * (1 + patched), gpu_memory_bytes()
        if need > MEMORY_SHARE * have:
            raise ValueError(f"the model needs about {need / GIB:.1f} GiB of GPU memory, the GPU has "
                             f"{have / GIB:.1f} GiB: use fewer --layers")
    return nbytes


def build_model(config, device: str, dtype: str, seed: int = 0):
    """The random-initialised model, made on the device in the dtype, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    with torch.device("cuda" if device == "gpu" else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    return model.eval()


def generate_times(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of `repeats` greedy generate() calls of exactly `new_tokens` tokens
    (after one untimed call), and the tokens they made."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    with torch.inference_mode():
        out = model.generate(prompt, **kwargs)
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            model.generate(prompt, **kwargs)
            sync()
            times.append(time.perf_counter() - start)
    return times, out[:, prompt.shape[1]:]


def decode_row(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Decode tokens/s of `model` (see the module docstring) and its raw timings."""
    one, _ = generate_times(model, prompt, 1, repeats)
    many, tokens = generate_times(model, prompt, new_tokens, repeats)
    decode_s = statistics.median(many) - statistics.median(one)
    return {
        "generate_1_s": one, "generate_n_s": many,
        "decode_s_per_token": decode_s / (new_tokens - 1),
        "decode_tokens_per_s": (new_tokens - 1) / decode_s if decode_s > 0 else None,
        "tokens": tokens.tolist(),
    }


def run(model_name: str, *, device: str = "cpu", dtype: str = "float32", layers: int = 2, vocab: int = 1024,
        prompt_tokens: int = 16, new_tokens: int = 32, repeats: int = 3, batch: int = 1, patched: bool = True,
        seed: int = 0, command: str = "", config_overrides: dict | None = None) -> dict:
    """Build the model, time it unpatched, then (with `patched`) patched; the result dict."""
    if new_tokens < 2 or repeats < 1 or layers < 1 or prompt_tokens < 1 or batch < 1:
        raise ValueError("--new-tokens must be >= 2 and --repeats, --layers, --prompt-tokens, --batch >= 1")
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("--device gpu, but PyTorch sees no GPU")
    config = hf_config(model_name, layers, vocab, **(config_overrides or {}))
    nbytes = check_fits(config, device, dtype, patched)
    result = {**result_header(SCHEMA, command), "device": device, "dtype": dtype, "model": model_name,
              "layers": layers, "vocab": vocab, "batch": batch, "prompt_tokens": prompt_tokens,
              "new_tokens": new_tokens, "repeats": repeats, "model_bytes": nbytes,
              "hf_config": config.to_dict(), "rows": []}
    began = time.perf_counter()
    model = build_model(config, device, dtype, seed)
    result["build_s"] = time.perf_counter() - began
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, vocab, (batch, prompt_tokens), generator=generator).to(model.device)
    result["rows"].append({"name": "hf_eager", "label": "transformers, eager, unpatched", "status": "ok",
                           **decode_row(model, prompt, new_tokens, repeats)})
    if patched:
        row = {"name": "pymoe_patched", "label": "transformers with pymoe.hf.patch (pymoe MoELayer blocks)"}
        try:
            from pymoe.hf import patch

            start = time.perf_counter()
            row["blocks_patched"] = patch(model, device=device)
            row["patch_s"] = time.perf_counter() - start
            row.update(status="ok", **decode_row(model, prompt, new_tokens, repeats))
            base = result["rows"][0]
            same = [a == b for x, y in zip(base["tokens"], row["tokens"]) for a, b in zip(x, y)]
            row["same_tokens_as_unpatched"] = sum(same) / len(same)
            if base["decode_tokens_per_s"] and row["decode_tokens_per_s"]:
                row["speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        except Exception as exc:  # recorded, not raised: the unpatched row is still a result
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
        result["rows"].append(row)
    result["wall_s"] = time.perf_counter() - began
    return result


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="Sequences decoded together.")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-patch", action="store_true", help="Time the unpatched model only.")
    parser.add_argument("--out", type=Path, default=Path("results"), help="Folder of results/ (hf/<device>/...).")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    command = " ".join(["python scripts/bench_hf_decode.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        result = run(args.model, device=args.device, dtype=args.dtype, layers=args.layers, vocab=args.vocab,
                     prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                     batch=args.batch, patched=not args.no_patch, command=command)
    except ValueError as err:
        parser.error(str(err))
    for row in result["rows"]:
        if row["status"] == "ok":
            extra = f", {row['same_tokens_as_unpatched']:.0%} same tokens" if "same_tokens_as_unpatched" in row else ""
            rate = row["decode_tokens_per_s"]
            print(f"{row['name']}: {rate:.2f} decode tokens/s{extra}" if rate else f"{row['name']}: no decode time")
        else:
            print(f"{row['name']}: {row['status']}: {row['error']}")
    if args.no_save:
        return None
    path = write_result(args.out / "hf" / args.device, f"{args.dtype}-{args.model}-decode", result)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
