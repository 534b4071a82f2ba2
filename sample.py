"""
Sample from a trained model: any checkpoint (a run, a pruned model, a Hugging Face folder), its own tokenizer,
routing token by token as the release does at inference, with a KV cache (each new token costs one position).

    python sample.py --ckpt out/emo_tiny --prompt "int main(void)" --max_new_tokens 200
    python sample.py --ckpt out/pruned/emo_tiny/c-keep8-greedy.pt --prompt_file start.c --num_samples 3
    python sample.py --ckpt path/to/Emo_1b14b_1T --prompt "The theorem" --temperature 0 --device cuda
"""

import argparse
import time

import torch

from checkpoint import checkpoint_tokenizer, load_model
from errors import UserError, run_command


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint: file, run directory, Hugging Face folder or hub id")
    parser.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    parser.add_argument("--prompt_file", default="", help="or read the prompt from this UTF-8 file")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: always the most likely token")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the top_k most likely tokens")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--tokenizer", default="", help="when the checkpoint records none")
    parser.add_argument("--no_cache", action="store_true", help="recompute the whole context every token")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.num_samples < 1 or args.top_k < 1:
        raise UserError("--max_new_tokens, --num_samples and --top_k must be at least 1")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: give 0 (the most likely token) or more")
    prompt = args.prompt
    if args.prompt_file:
        try:
            prompt = open(args.prompt_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read --prompt_file {args.prompt_file}: {error}") from None
    model, ckpt = load_model(args.ckpt, args.device)
    if model.embed.weight.device.type == "cpu":
        # the experts laid out for a token at a time (the same model): on CPU measured 1.8x faster than the training
        # layout in bfloat16, 1.06x (the release's shape) to 1.35x (emo_tiny) in float32 (docs/results.md)
        model.for_decoding()
    encoding = checkpoint_tokenizer(ckpt.get("tokenizer"), args.tokenizer, args.ckpt)
    # special tokens written in the prompt (<|endoftext|>: a document boundary) are theirs, as in the exports'
    # tokenizer files for transformers; an empty prompt starts a new document: the EOS that closes the one before
    ids = encoding.encode(prompt, allowed_special="all") or [model.cfg.eos_id]
    torch.manual_seed(args.seed)
    idx = torch.tensor([ids] * args.num_samples, device=args.device)
    start = time.perf_counter()
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, use_cache=not args.no_cache)
    seconds = time.perf_counter() - start
    for row in out.tolist():
        row = row[len(ids):] if not prompt else row
        # ids past the tokenizer's (a vocabulary padded for speed) were never trained on: dropped
        print(encoding.decode([t for t in row if t < encoding.n_vocab]))
        print("-" * 40)
    print(f"{args.num_samples * args.max_new_tokens / seconds:.1f} tokens/s ({'no ' if args.no_cache else ''}KV cache, "
          f"{args.device})")


if __name__ == "__main__":
    run_command(main)
