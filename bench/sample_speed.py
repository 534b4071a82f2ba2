"""
Decoding speed against its memory bound: tokens/s of greedy decoding with the KV cache (batch 1) for a config's
model (random weights: speed does not depend on them), its weights in float32 or (--weights=bfloat16)
bfloat16, laid out for decoding (EMO.for_decoding). Each new token reads the weights it uses once: attention,
router, the top_k experts of every layer and the LM head; with this machine's bandwidth (a matrix-vector
product over 1 GiB of weights, the same dtype, measured before and after the decodes and the higher taken: the
machine's bandwidth varies with its neighbours) that bounds the rate. Printed: bytes per token, bandwidth, the
bound, the rate reached and its share of the bound (every token timed on its own: the best token, like the
bandwidth's best of 5 the machine at its quietest, and the median), and whether the tokens equal the training
layout's (if not, the decoding layout fed the training layout's tokens: at how many positions it picks the same
token, and how near a tie its top two logits were where it does not). Then, to tell what the bound leaves from
what products of this size allow, the bandwidth of matrix-vector products over matrices of an expert's
up-projection shape (2H x C, as many as make 1 GiB: none is in cache) and the rate's share of the rate they
would allow. Last, since the bandwidth moves within seconds, each token of one more decode against the 1 GiB
bandwidth measured right after it (one pass): the best and the median of those shares. Not a test.

    python bench/sample_speed.py config/emo_full.py --n_experts=16 --weights=float32    # the release at 12.5%
    python bench/sample_speed.py config/emo_full.py --n_experts=16 --weights=bfloat16
    python bench/sample_speed.py config/emo_tiny.py --prompt_tokens=200 --new_tokens=200
"""

import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import parse_args  # noqa: E402
from model import EMO, KVCache, ModelConfig  # noqa: E402
from train import TrainConfig  # noqa: E402


@dataclass
class SampleConfig:
    prompt_tokens: int = 32
    new_tokens: int = 32
    weights: str = "float32"  # or bfloat16
    repeats: int = 3  # timed decodes in the decoding layout, every token timed on its own


def bytes_per_token(cfg, itemsize):
    """Bytes of weights one decoded token reads: per layer attention (4 C^2), router (E C), top_k experts
    (3 C H each), two norms; then the final norm and the LM head (V C); the embedding row."""
    C = cfg.d_model
    per_layer = [4 * C * C + E * C + min(cfg.top_k, E) * 3 * C * cfg.expert_hidden + 2 * C
                 for E in cfg.layer_experts()]
    return (sum(per_layer) + C + cfg.vocab_size * C + C) * itemsize


def bandwidth_probe(dtype, rows=None, columns=16384, gib=1.0):
    """A function giving the bytes/s of one pass of matrix-vector products over gib GiB of weights laid out
    output x input: one matrix of the given columns, or (rows given) as many rows x columns matrices as make
    gib GiB, one product each."""
    total_rows = int(gib * 2 ** 30 / dtype.itemsize / columns)
    rows = rows or total_rows
    weights = torch.randn(total_rows // rows, rows, columns).to(dtype)
    x = torch.randn(1, columns).to(dtype)

    def probe():
        start = time.perf_counter()
        for weight in weights:
            F.linear(x, weight)
        return weights.numel() * dtype.itemsize / (time.perf_counter() - start)
    return probe


def bandwidth(dtype, rows=None, columns=16384, gib=1.0, repeats=5):
    """The best of repeats passes of bandwidth_probe."""
    probe = bandwidth_probe(dtype, rows, columns, gib)
    return max(probe() for _ in range(repeats))


@torch.inference_mode()
def timed_decode(model, prompt, new_tokens, after_each=None):
    """Greedy decoding with the KV cache, as EMO.generate does it, each new token after the first timed on its
    own and followed (untimed) by after_each(), if given: (tokens (1, prompt + new_tokens), seconds of each of
    the new_tokens - 1 later tokens, what after_each returned after each)."""
    cache = KVCache(model.cfg, 1, prompt.device, model.embed.weight.dtype)
    tokens = torch.cat([prompt, model(prompt, cache=cache)[:, -1].argmax(-1, keepdim=True)], dim=1)
    seconds, after = [], []
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        next_token = model(tokens[:, -1:], cache=cache)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        seconds.append(time.perf_counter() - start)
        tokens = torch.cat([tokens, next_token], dim=1)
        if after_each is not None:
            after.append(after_each())
    return tokens, seconds, after


def decode(model, prompt, new_tokens, repeats=1):
    """(tokens, seconds of every timed token over repeats decodes)."""
    tokens, seconds, _ = timed_decode(model, prompt, new_tokens)
    for _ in range(repeats - 1):
        seconds += timed_decode(model, prompt, new_tokens)[1]
    return tokens, seconds


def paired_shares(model, prompt, new_tokens, per_token, probe):
    """Each token's rate as a share of the bandwidth measured (one pass of probe) right after it: the machine's
    bandwidth moves within seconds, and a pair sees the same moment. (best share, median share)."""
    _, seconds, rates = timed_decode(model, prompt, new_tokens, after_each=probe)
    shares = [per_token / s / rate for s, rate in zip(seconds, rates)]
    return max(shares), statistics.median(shares)


def rates(seconds, bound):
    """The best token's and the median token's rate, each with its share of the bound."""
    best, median = 1 / min(seconds), 1 / statistics.median(seconds)
    return f"best token {best:.2f} tokens/s ({best / bound:.0%}), median {median:.2f} ({median / bound:.0%})"


@torch.inference_mode()
def forced_choices(model, tokens, prompt_tokens):
    """Fed tokens (1, S) one at a time with the KV cache after the first prompt_tokens, the model's greedy choice
    at each position and the margin between its top two logits there: (choices (S - prompt_tokens,), margins)."""
    cache = KVCache(model.cfg, 1, tokens.device, model.embed.weight.dtype)
    logits = [model(tokens[:, :prompt_tokens], cache=cache)[0, -1]]
    logits += [model(tokens[:, i:i + 1], cache=cache)[0, -1] for i in range(prompt_tokens, tokens.shape[1] - 1)]
    top2 = torch.stack(logits).float().topk(2, dim=-1)
    return top2.indices[:, 0], top2.values[:, 0] - top2.values[:, 1]


def agreement(model, reference, prompt_tokens):
    """How the model's greedy choices compare with another path's tokens reference (1, S), fed that path's
    tokens: where they differ, a near tie that rounding decides, or a real difference?"""
    choices, margins = forced_choices(model, reference, prompt_tokens)
    differ = choices != reference[0, prompt_tokens:]
    largest = f", the largest top-two margin among those {float(margins[differ].max()):.2g}" if differ.any() else ""
    return (f"fed the training layout's tokens, the same choice at {int((~differ).sum())} of {len(differ)}{largest} "
            f"(median margin {float(margins.median()):.2g})")


def main():
    (train_cfg, model_cfg, bench), _ = parse_args(sys.argv[1:], TrainConfig, ModelConfig, SampleConfig)
    if bench.weights not in ("float32", "bfloat16"):
        raise SystemExit(f"--weights={bench.weights}: float32 or bfloat16")
    dtype = getattr(torch, bench.weights)
    cfg = dataclasses.replace(model_cfg, seq_len=max(model_cfg.seq_len, bench.prompt_tokens + bench.new_tokens))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = EMO(cfg)
    model.to(dtype).to_empty(device="cpu")
    model.init_weights()
    model.eval()
    prompt = torch.randint(0, cfg.vocab_size - 1, (1, bench.prompt_tokens))
    n_params = sum(p.numel() for p in model.parameters())
    per_token = bytes_per_token(cfg, dtype.itemsize)
    rate_before = bandwidth(dtype)
    print(f"cpu ({torch.get_num_threads()} threads, {bench.weights}) | {n_params / 1e9:.2f}B parameters | "
          f"{bench.prompt_tokens} prompt + {bench.new_tokens} new tokens, greedy, batch 1")
    reference, reference_seconds = decode(model, prompt, bench.new_tokens)
    model.for_decoding()
    tokens, seconds = decode(model, prompt, bench.new_tokens, bench.repeats)
    assert torch.equal(tokens, model.generate(prompt, bench.new_tokens, temperature=0))  # the timed loop is generate's
    same = "yes" if torch.equal(tokens, reference) else "no; " + agreement(model, reference, bench.prompt_tokens)
    rate_after = bandwidth(dtype)
    rate = max(rate_before, rate_after)  # the best of 5 before and after the decodes: the higher bounds them
    bound = rate / per_token
    print(f"bytes read per token {per_token / 1e9:.3f} GB | bandwidth {rate / 1e9:.1f} GB/s (before "
          f"{rate_before / 1e9:.1f}, after {rate_after / 1e9:.1f}) | bound {bound:.2f} tokens/s")
    print(f"training layout, {len(reference_seconds)} tokens: {rates(reference_seconds, bound)}")
    print(f"decoding layout, {len(seconds)} tokens ({bench.repeats} decodes): {rates(seconds, bound)} | "
          f"same tokens: {same}")
    expert_rate = bandwidth(dtype, rows=2 * cfg.expert_hidden, columns=cfg.d_model)
    allowed = expert_rate / per_token
    print(f"products over {2 * cfg.expert_hidden} x {cfg.d_model} matrices {expert_rate / 1e9:.1f} GB/s "
          f"({expert_rate / rate:.0%} of the bandwidth): they allow {allowed:.2f} tokens/s | decoding layout's "
          f"best token {1 / min(seconds) / allowed:.0%} of that, median {1 / statistics.median(seconds) / allowed:.0%}")
    best, median = paired_shares(model, prompt, bench.new_tokens, per_token, bandwidth_probe(dtype))
    print(f"decoding layout, each token against the 1 GiB bandwidth measured right after it: best {best:.0%}, "
          f"median {median:.0%}")


if __name__ == "__main__":
    main()
