"""Per-token gradients: which tokens of a document carry its gradient?

What it shows, on the embedded tiny default (nothing is downloaded):

1. ``bergson_ray.build(..., attribute_tokens=True)``: a per-token store of a few corpus
   documents. Document ``i`` of length ``L`` gets ``L - 1`` rows, one per loss position:
   row ``t`` is the gradient of the loss of predicting token ``t + 1`` from tokens
   ``0..t``. ``store.offsets[i]:store.offsets[i + 1]`` (or ``store.item_rows(i)``) are its rows.
2. For one document: each token's row norm ``|g_t|`` and its share of the document's
   gradient, ``g_t . G / |G|^2`` with ``G = sum_t g_t`` (the shares sum to 1), with the
   tokens decoded by the tiny tokenizer.
3. A check: an ordinary per-document store of the same documents is built too, and every
   document's token rows sum to its sequence row (the loss is a sum over positions and
   the random projection is linear, so this holds exactly up to float rounding).

Run it from the repository root (well under a minute on a 2-core CPU):

    .venv/bin/python examples/per_token_attribution.py
    .venv/bin/python examples/per_token_attribution.py --doc 7 --num_docs 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bergson_ray.utils.ray_env import set_loopback_env

# A local Ray: loopback only, no token auth, no usage stats. Set before Ray is imported.
set_loopback_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import bergson_ray  # noqa: E402
from bergson_ray.defaults.tiny import load_tiny_tokenizer  # noqa: E402

COMMON = dict(model="tiny", dataset="tiny", projection_dim=16, num_workers=1, overwrite=True)


def run(out: Path, num_docs: int, doc: int, show: int) -> None:
    split = f"train[:{num_docs}]"
    tok_path = bergson_ray.build(
        run_path=out / "tokens", split=split, attribute_tokens=True, **COMMON
    )
    seq_path = bergson_ray.build(run_path=out / "sequences", split=split, **COMMON)

    tokens = bergson_ray.GradientStore.open(tok_path)
    seqs = bergson_ray.GradientStore.open(seq_path)
    print(f"\n{tokens}\n{seqs}")
    print(f"offsets (first row of each document): {tokens.offsets.tolist()}")

    # --- one document, token by token ---------------------------------------------------
    text = tokens.data[doc]["text"]  # data.hf keeps the source text
    tokenizer = load_tiny_tokenizer()
    ids = tokenizer(text)["input_ids"]
    g = tokens.item_rows(doc)  # float32 [len(ids) - 1, dim]
    assert len(g) == len(ids) - 1, (len(g), len(ids))
    total = g.sum(0)
    share = (g @ total) / total.dot(total)  # sums to 1 over the document's tokens
    norms = g.norm(dim=1)

    print(f"\ndocument {doc} ({len(ids)} tokens, {len(g)} loss positions):\n  {text!r}")
    print(f"\nthe {show} tokens with the largest share of the document's gradient:")
    print("   pos  predicted token       |g_t|    share   context")
    for t in share.argsort(descending=True)[:show].tolist():
        predicted = tokenizer.decode([ids[t + 1]])
        context = tokenizer.decode(ids[max(0, t - 5) : t + 1])
        print(f"  {t:4d}  {predicted!r:18s} {norms[t]:8.3f} {share[t]:+8.3f}   ...{context!r}")
    print(
        f"  shares sum to {share.sum():.6f}; |G| = {total.norm():.3f}, "
        f"sum of |g_t| = {norms.sum():.3f} (token gradients partly cancel)"
    )

    # --- the check: token rows add up to the sequence row -----------------------------
    print("\nsum of token rows vs. the per-document row:")
    worst = 0.0
    for i in range(tokens.num_items):
        summed = tokens.item_rows(i).sum(0)
        row = seqs.rows(i)[0]
        err = float((summed - row).abs().max() / row.abs().max().clamp_min(1e-30))
        worst = max(worst, err)
        print(
            f"  doc {i}: {len(tokens.item_rows(i)):3d} token rows, max relative deviation {err:.1e}"
        )
    assert worst < 1e-4, f"token rows do not sum to the sequence rows (deviation {worst:.1e})"
    print(f"OK: token rows sum to the sequence rows (worst deviation {worst:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_docs", type=int, default=6, help="documents train[:N] to store")
    parser.add_argument("--doc", type=int, default=1, help="which of them to look at")
    parser.add_argument("--show", type=int, default=8, help="how many tokens to list")
    parser.add_argument("--out", type=Path, help="where to keep the runs (default: a temp dir)")
    args = parser.parse_args()
    if not 0 <= args.doc < args.num_docs:
        parser.error("--doc must be in [0, --num_docs)")
    t0 = time.perf_counter()
    if args.out:
        run(args.out, args.num_docs, args.doc, args.show)
    else:
        with tempfile.TemporaryDirectory(prefix="bergson_ray_example_") as tmp:
            run(Path(tmp), args.num_docs, args.doc, args.show)
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
