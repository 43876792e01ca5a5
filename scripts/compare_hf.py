#!/usr/bin/env python3
"""Greedy generation with Hugging Face transformers next to minifd, token for token.

    python scripts/compare_hf.py --weights DIR [--max-new-tokens 32] [--json-out FILE] PROMPT...

transformers and torch are not minifd dependencies; run this from an environment that has them
(CPU torch is enough: the model runs in float32 with eager attention). Each prompt is tokenized
as raw text (no chat template, no BOS: SmolLM2's tokenizer adds none) and continued greedily by
both engines. Exit status: 0 when every prompt matches, 1 on any mismatch, 2 when transformers/torch
are missing.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minifd.fixture import fixture_dir, fixture_ready  # noqa: E402

MISSING_HF_HINT = "pip install torch==2.13.0 transformers  (CPU torch is enough)"


def import_hf():
    try:
        import torch
        import transformers
    except ImportError as missing:
        print(f"compare_hf: {missing}; this script needs torch and transformers: {MISSING_HF_HINT}", file=sys.stderr)
        raise SystemExit(2) from None
    return torch, transformers


def hf_greedy(weights, prompts, max_new_tokens):
    """prompts -> [{prompt, prompt_ids, generated_ids, finish_reason, text}] from transformers' greedy decoding.

    generated_ids follows minifd's Completion convention: the EOS that ended generation is left
    out, and finish_reason says "eos" or "length".
    """
    torch, transformers = import_hf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(weights)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        weights, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    eos_ids = model.generation_config.eos_token_id
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    results = []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt, return_tensors="pt")  # input_ids: [1, prompt_len]
        with torch.no_grad():
            output = model.generate(
                **prompt_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )  # [1, prompt_len + generated]
        generated = output[0, prompt_ids["input_ids"].shape[1] :].tolist()
        ended_by_eos = bool(generated) and generated[-1] in eos_ids
        if ended_by_eos:
            generated = generated[:-1]
        results.append(
            {
                "prompt": prompt,
                "prompt_ids": prompt_ids["input_ids"][0].tolist(),
                "generated_ids": generated,
                "finish_reason": "eos" if ended_by_eos else "length",
                "text": tokenizer.decode(generated, skip_special_tokens=False),
            }
        )
    return results


def minifd_greedy(weights, prompts, max_new_tokens):
    """prompts -> [Completion] from minifd on CPU."""
    import minifd

    engine = minifd.load(weights, device="cpu")
    return [
        engine.generate([prompt], max_new_tokens=max_new_tokens, temperature=0.0).completions[0] for prompt in prompts
    ]


def first_mismatch(expected, actual):
    """Index of the first differing token, len of the shorter when one is a prefix, None when equal."""
    for position, (left, right) in enumerate(zip(expected, actual)):
        if left != right:
            return position
    return None if len(expected) == len(actual) else min(len(expected), len(actual))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=None, help=f"HF model directory (default: {fixture_dir()})")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json-out", type=Path, default=None, help="also write HF's results as JSON here")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")
    args = parser.parse_args(argv)
    weights = args.weights or fixture_dir()
    if args.weights is None and not fixture_ready():
        print(f"compare_hf: {weights} is not prepared: run scripts/prepare_smollm2.py", file=sys.stderr)
        return 2

    hf_results = hf_greedy(str(weights), args.prompts, args.max_new_tokens)
    for result in hf_results:
        print(f"prompt {result['prompt']!r} ids {result['prompt_ids']}")
        print(f"  hf     ids  {result['generated_ids']} (finish: {result['finish_reason']})")
        print(f"  hf     text {result['text']!r}")
    if args.json_out:
        payload = {"weights": str(weights), "max_new_tokens": args.max_new_tokens, "results": hf_results}
        args.json_out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json_out}")

    minifd_results = minifd_greedy(str(weights), args.prompts, args.max_new_tokens)
    mismatches = 0
    for result, completion in zip(hf_results, minifd_results):
        minifd_ids = [int(token_id) for token_id in completion.token_ids]
        position = first_mismatch(result["generated_ids"], minifd_ids)
        print(f"prompt {result['prompt']!r}")
        print(f"  hf     ids {result['generated_ids']} (finish: {result['finish_reason']})")
        print(f"  minifd ids {minifd_ids} (finish: {completion.finish_reason})")
        minifd_prompt_ids = [int(token_id) for token_id in completion.prompt_token_ids]
        if minifd_prompt_ids != result["prompt_ids"]:
            mismatches += 1
            print(f"  MISMATCH in prompt tokenization: hf {result['prompt_ids']}, minifd {minifd_prompt_ids}")
        elif position is not None:
            mismatches += 1
            lengths = f"hf {len(result['generated_ids'])} tokens, minifd {len(minifd_ids)}"
            print(f"  MISMATCH at generated token {position} ({lengths})")
        elif completion.finish_reason != result["finish_reason"]:
            mismatches += 1
            endings = f"hf {result['finish_reason']}, minifd {completion.finish_reason}"
            print(f"  MISMATCH in how generation ended: {endings}")
        else:
            print(f"  MATCH ({len(minifd_ids)} tokens)")
    print(f"{len(hf_results) - mismatches} of {len(hf_results)} prompts match token for token")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
