"""Sample a FitPrune calibration question list from LLaVA-1.5's 665K instruction mix.

    python scripts/build_calibration_set.py --mix /data/llava_v1_5_mix665k.json \\
        --out eval_data/calibration/mix665k_s0_n66.jsonl [--seed 0] [--num-samples 66] \\
        [--image-folder /data/llava_images]

The FitPrune authors calibrate on 0.01% of the mix (about 66 samples). Exact procedure, so that
the same file, seed and count give the same list anywhere:

1. Load the JSON list; keep, in file order, the entries that have an `image` field (the fit needs
   visual tokens; the text-only ShareGPT entries are skipped).
2. indices = sorted(random.Random(seed).sample(range(len(kept)), num_samples))
3. For each picked entry write one line in LLaVA's eval question format:
   question_id = entry id, image = entry image path (relative to the mix's image root, e.g.
   `coco/train2017/....jpg`), text = the first human turn with every `<image>` token and the
   newline next to it removed, category = the first path component of the image (coco, gqa,
   ocr_vqa, textvqa, vg), mix_index = the entry's index in the full file.
The script prints the input file's sha256, which `llava-fitprune fit` records (through the
question file's sha256) in every recipe it fits from this list.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys


def first_human_turn(entry: dict) -> str:
    for turn in entry.get("conversations", []):
        if turn.get("from") == "human":
            text = turn["value"]
            for token in ("<image>\n", "\n<image>", "<image>"):
                text = text.replace(token, "")
            return text.strip()
    raise ValueError(f"entry {entry.get('id')!r} has no human turn")


def sample_mix(mix: list, num_samples: int, seed: int) -> list[dict]:
    kept = [(i, e) for i, e in enumerate(mix) if e.get("image")]
    if num_samples < 1 or num_samples > len(kept):
        raise ValueError(f"--num-samples must be in [1, {len(kept)}] (entries with an image), got {num_samples}")
    picked = sorted(random.Random(seed).sample(range(len(kept)), num_samples))
    lines = []
    for j in picked:
        index, entry = kept[j]
        lines.append({"question_id": entry.get("id", str(index)), "image": entry["image"],
                      "text": first_human_turn(entry), "category": entry["image"].split("/")[0],
                      "mix_index": index})
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mix", required=True, help="local copy of llava_v1_5_mix665k.json")
    p.add_argument("--out", required=True, help="question jsonl to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=66, help="default 66, about 0.01%% of the mix")
    p.add_argument("--image-folder", default=None, help="if given, check that every sampled image exists there")
    args = p.parse_args(argv)

    if not os.path.isfile(args.mix):
        print(f"error: {args.mix} does not exist (download llava_v1_5_mix665k.json from the LLaVA-1.5 data)",
              file=sys.stderr)
        return 2
    with open(args.mix, "rb") as f:
        raw = f.read()
    mix = json.loads(raw)
    if not isinstance(mix, list):
        print(f"error: {args.mix} is not a JSON list of conversations", file=sys.stderr)
        return 2
    try:
        lines = sample_mix(mix, args.num_samples, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.image_folder:
        missing = [l["image"] for l in lines if not os.path.isfile(os.path.join(args.image_folder, l["image"]))]
        if missing:
            print(f"error: {len(missing)} sampled images are missing under {args.image_folder}, e.g. {missing[0]}",
                  file=sys.stderr)
            return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    print(f"mix {args.mix}: sha256 {hashlib.sha256(raw).hexdigest()}, {len(mix)} entries, "
          f"{sum(1 for e in mix if e.get('image'))} with an image")
    print(f"wrote {len(lines)} questions (seed {args.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
