"""The haotian-liu LLaVA side of the cross-backend test; run by tests_hf/test_cross_backend.py with the
LLaVA backend's venv (transformers 4.37.2 + llava-torch):

    python tests_hf/llava_side.py OUT_DIR RECIPE_JSON NEW_TOKENS

Builds the tiny haotian-liu checkpoint in OUT_DIR/llava-tiny, runs our LLaVA backend with the recipe
on one prompt and image, and writes OUT_DIR/llava_side.json (ids with LLaVA's image index, dropped
positions per layer, greedy tokens, their scores) and OUT_DIR/image.pt.
"""
import json
import os
import sys

import torch


def main(out_dir: str, recipe_path: str, new_tokens: int) -> None:
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    from llava_fitprune import load_pretrained_model
    from llava_fitprune.adapters.llava.tiny import TinyLlavaSpec, build_tiny_llava

    torch.manual_seed(0)
    spec = TinyLlavaSpec(num_layers=4)
    path = build_tiny_llava(os.path.join(out_dir, "llava-tiny"), spec)
    tok, model, _, _ = load_pretrained_model(path, None, "llava-tiny", device="cpu", attn_implementation="sdpa",
                                             recipe=recipe_path)
    model = model.float().eval()
    text = "A chat between a curious human and an assistant. USER: <image>\nwhat is the colour of the shape? ASSISTANT:"
    ids = tokenizer_image_token(text, tok, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    image = torch.randn(1, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.generate(ids, images=image, max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                             return_dict_in_generate=True, output_scores=True)
    trace = model.last_trace
    dropped = [None if p is None else sorted(int(x) for x in p[0] if x >= 0) for p in trace.dropped_positions]
    torch.save(image, os.path.join(out_dir, "image.pt"))
    result = {"input_ids": ids[0].tolist(), "image_index": IMAGE_TOKEN_INDEX, "vocab_size": len(tok),
              "num_visual_tokens": spec.num_visual_tokens, "dropped": dropped,
              "sequences": out.sequences[0].tolist(), "scores": torch.stack(out.scores, 1)[0].tolist(),
              "vision_dir": os.path.join(path, "vision_tower"), "llava_dir": path}
    with open(os.path.join(out_dir, "llava_side.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
