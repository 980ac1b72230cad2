"""Start-up and resident memory of a bundle on the CPU provider, in this (fresh) process.

Opens BUNDLE (hashing its files unless their digests are cached), answers one prompt about a random image,
and prints the open time, the first answer's time and the resident memory from /proc/self/smaps_rollup
(anonymous and file-backed PSS: file pages mapped by several sessions count once, as they use memory).

    .venv/bin/python benchmarks/startup.py BUNDLE                   # sessions pack the weights (default)
    .venv/bin/python benchmarks/startup.py BUNDLE --share-weights   # sessions read the mapped weights
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from PIL import Image

from duet_export.generate import GenerationSettings
from duet_export.runtimes import OnnxVLM, ProviderSettings


def resident_gib() -> dict[str, float]:
    """Anonymous and file-backed proportional set size of this process, GiB (Linux)."""
    out = {}
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            key, *rest = line.split()
            if key in ("Pss_Anon:", "Pss_File:", "Rss:"):
                out[key[:-1]] = round(int(rest[0]) / 2**20, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--share-weights", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=4)
    args = ap.parse_args()
    image = Image.fromarray((np.random.default_rng(0).random((336, 336, 3)) * 255).astype(np.uint8))
    start = time.perf_counter()
    vlm = OnnxVLM(args.bundle, provider="cpu", settings=ProviderSettings(share_weights=args.share_weights))
    opened = time.perf_counter() - start
    start = time.perf_counter()
    vlm.generate([image], ["What is in the image?"], GenerationSettings(max_new_tokens=args.new_tokens))
    answered = time.perf_counter() - start
    weights = sum(e["bytes"] for e in vlm.bundle.manifest["files"] if e["name"].endswith(".data")) / 2**30
    memory = resident_gib()
    resident = memory.get("Pss_Anon", 0) + memory.get("Pss_File", 0)
    print(json.dumps({
        "share_weights": vlm.bundle.settings.share_weights, "open_s": round(opened, 1), "first_answer_s": round(answered, 1),
        "weights_gib": round(weights, 2), **memory, "resident_over_weights": round(resident / weights, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
