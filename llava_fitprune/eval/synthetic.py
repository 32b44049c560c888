"""Tiny synthetic benchmarks in LLaVA's `playground/data/eval/` layout, for smoke tests on CPU.

    python -m llava_fitprune.eval.synthetic playground/data/eval     # then run scripts/v1_5/eval/*.sh

Every file the scripts read exists with LLaVA's names and formats (a handful of questions, small
solid-colour images), so the whole workflow runs without downloading anything. Scores on it mean
nothing; the answer formats, converters and evaluators are exercised for real.
"""
from __future__ import annotations

import base64
import io
import json
import os
import sys

from PIL import Image

IMAGE_SIZE = (32, 24)  # width, height: not square, so padding to square is exercised
COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20),
       "white": (250, 250, 250), "black": (5, 5, 5)}
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
POPE_SPLITS = ("adversarial", "popular", "random")


def colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


def save_image(path: str, i: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", IMAGE_SIZE, RGB[colour(i)]).save(path)


def b64_image(i: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", IMAGE_SIZE, RGB[colour(i)]).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)


def textvqa(root: str, n: int) -> None:
    d = os.path.join(root, "textvqa")
    rows, data = [], []
    for i in range(n):  # two questions per image: LLaVA's question_id is the image id, so it repeats
        image_id = f"img{i // 2}"
        save_image(os.path.join(d, "train_images", f"{image_id}.jpg"), i // 2)
        q = f"what colour is sign {i}?"
        rows.append({"question_id": image_id, "image": f"{image_id}.jpg",
                     "text": f"{q}\nReference OCR token: {colour(i)}, {i}\n{SHORT}"})
        data.append({"image_id": image_id, "question": q.capitalize(), "question_id": i,
                     "answers": [colour(i)] * 7 + ["sign"] * 3})
    write_jsonl(os.path.join(d, "llava_textvqa_val_v051_ocr.jsonl"), rows)
    write_json(os.path.join(d, "TextVQA_0.5.1_val.json"), {"dataset_name": "textvqa", "data": data})


def gqa(root: str, n: int) -> None:
    d = os.path.join(root, "gqa")
    rows, questions = [], {}
    for i in range(n):
        qid = str(20000 + i)
        save_image(os.path.join(d, "data", "images", f"n{i}.jpg"), i)
        q = f"Is the picture {colour(i)}?"
        rows.append({"question_id": qid, "image": f"n{i}.jpg", "text": f"{q}\n{SHORT}"})
        questions[qid] = {"imageId": f"n{i}", "question": q, "answer": "yes" if i % 2 == 0 else "no",
                          "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}}
    write_jsonl(os.path.join(d, "llava_gqa_testdev_balanced.jsonl"), rows)
    write_json(os.path.join(d, "data", "testdev_balanced_questions.json"), questions)


def simple_vqa(root: str, n: int, folder: str, question_file: str, image_dir: str, image_name: str,
               suffix: str = SHORT) -> list[dict]:
    d = os.path.join(root, folder)
    rows = []
    for i in range(n):
        name = image_name.format(i=i)
        save_image(os.path.join(d, image_dir, name), i)
        rows.append({"question_id": i, "image": name, "text": f"What colour is this?\n{suffix}"})
    write_jsonl(os.path.join(d, question_file), rows)
    return rows


def vqav2(root: str, n: int) -> None:
    rows = simple_vqa(root, n, "vqav2", "llava_vqav2_mscoco_test-dev2015.jsonl", "test2015",
                      "COCO_test2015_{i:012d}.jpg")
    extra = {"question_id": n, "image": rows[0]["image"], "text": rows[0]["text"]}  # test-std only: answered ''
    write_jsonl(os.path.join(root, "vqav2", "llava_vqav2_mscoco_test2015.jsonl"), rows + [extra])


def vizwiz(root: str, n: int) -> None:
    simple_vqa(root, n, "vizwiz", "llava_test.jsonl", "test", "VizWiz_test_{i:08d}.jpg",
               suffix="When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT)


def pope(root: str, per_split: int) -> None:
    d = os.path.join(root, "pope")
    rows, qid = [], 0
    for split in POPE_SPLITS:
        labels = []
        for j in range(per_split):
            image = f"COCO_val2014_{qid:012d}.jpg"
            save_image(os.path.join(d, "val2014", image), qid)
            text = f"Is there a {colour(qid)} square in the image?"
            rows.append({"question_id": qid, "image": image, "text": text, "category": split})
            labels.append({"question_id": j, "image": image, "text": text, "label": "yes" if j % 2 == 0 else "no"})
            qid += 1
        write_jsonl(os.path.join(d, "coco", f"coco_pope_{split}.json"), labels)
    write_jsonl(os.path.join(d, "llava_pope_test.jsonl"), rows)


def mme(root: str, n_images: int) -> None:
    d = os.path.join(root, "MME")
    bench = os.path.join(d, "MME_Benchmark_release_version")
    rows = []
    for category, nested in (("existence", False), ("artwork", True)):
        for i in range(n_images):
            image_rel = f"{category}/images/{i}.jpg" if nested else f"{category}/{i}.jpg"
            qa_dir = os.path.join(bench, category, "questions_answers_YN") if nested else os.path.join(bench, category)
            save_image(os.path.join(bench, image_rel), i)
            os.makedirs(qa_dir, exist_ok=True)
            qs = [(f"Is the image {colour(i)}?", "Yes"), (f"Is the image {colour(i + 1)}?", "No")]
            with open(os.path.join(qa_dir, f"{i}.txt"), "w") as f:
                f.writelines(f"{q} Please answer yes or no.\t{a}\n" for q, a in qs)
            rows += [{"question_id": image_rel, "image": image_rel, "text": f"{q}\n{SHORT}", "category": category}
                     for q, _ in qs]
    write_jsonl(os.path.join(d, "llava_mme.jsonl"), rows)


def mmbench(root: str, n: int, folder: str, split: str, cn: bool = False) -> None:
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
            "l2-category", "comment", "split"]
    lines = ["\t".join(cols)]
    for i in range(n):
        q = "图片是什么颜色?" if cn else "What colour is the image?"
        opts = COLOURS[:3] if i % 2 else COLOURS[:4]  # a three-option row leaves D empty
        hint = "" if i % 2 else ("看图。" if cn else "Look at the picture.")
        cells = [str(1000 + i), q, hint, *opts, *([""] * (4 - len(opts))), "A", "attribute", b64_image(i),
                 "synthetic", "perception", "nan", "dev"]
        lines.append("\t".join(cells))
    path = os.path.join(root, folder, f"{split}.tsv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def scienceqa(root: str, n: int) -> None:
    d = os.path.join(root, "scienceqa")
    questions, problems = [], {}
    for i in range(n):
        pid = str(i + 1)
        choices = [colour(i), colour(i + 1)]
        value = f"Context: a picture.\nQuestion: Which colour is it?\nOptions: (A) {choices[0]} (B) {choices[1]}\n"
        q = {"id": pid, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "A"}]}
        if i != n - 1:  # the last question is text-only, as some ScienceQA questions are
            save_image(os.path.join(d, "images", "test", pid, "image.png"), i)
            q["image"] = f"{pid}/image.png"
            q["conversations"][0]["value"] = "<image>\n" + value
        questions.append(q)
        problems[pid] = {"question": "Which colour is it?", "choices": choices, "answer": i % 2,
                         "image": "image.png" if "image" in q else None, "split": "test"}
    write_json(os.path.join(d, "llava_test_CQM-A.json"), questions)
    write_json(os.path.join(d, "problems.json"), problems)
    write_json(os.path.join(d, "pid_splits.json"), {"test": sorted(problems), "train": [], "val": []})


def seed(root: str, n: int) -> None:
    d = os.path.join(root, "seed_bench")
    rows, questions = [], []
    types = {"Scene Understanding": 1, "Instance Attributes": 2}
    for i in range(n):
        qid = str(100 + i)
        video = i == n - 1  # one video question (LLaVA answers it from its middle frame)
        image = f"SEED-Bench-video-image/{qid}.png" if video else f"SEED-Bench-image/{qid}.jpg"
        save_image(os.path.join(d, image), i)
        opts = "\n".join(f"{c}. {colour(i + k)}" for k, c in enumerate("ABCD"))
        rows.append({"image": image, "text": f"What colour is it?\n{opts}\n{LETTER}",
                     "category": "Scene Understanding", "question_id": qid})
        questions.append({"question_id": qid, "answer": "ABCD"[i % 4], "question_type_id": 1 + i % 2,
                          "data_type": "video" if video else "image"})
    write_jsonl(os.path.join(d, "llava-seed-bench.jsonl"), rows)
    write_json(os.path.join(d, "SEED-Bench.json"), {"question_type": types, "questions": questions})


def mmvet(root: str, n: int) -> None:
    simple_vqa(root, n, "mm-vet", "llava-mm-vet.jsonl", "images", "v1_{i}.png", suffix="")


def llavabench(root: str, n: int) -> None:
    d = os.path.join(root, "llava-bench-in-the-wild")
    rows = simple_vqa(root, n, "llava-bench-in-the-wild", "questions.jsonl", "images", "{i:03d}.jpg", suffix="")
    for r in rows:
        r["category"] = "conv"
    write_jsonl(os.path.join(d, "questions.jsonl"), rows)
    write_jsonl(os.path.join(d, "context.jsonl"), [{"id": f"{i:03d}", "image": r["image"], "caption": "a colour"}
                                                   for i, r in enumerate(rows)])
    write_jsonl(os.path.join(d, "answers_gpt4.jsonl"), [{"question_id": r["question_id"], "text": "A colour."}
                                                        for r in rows])


BENCHMARKS = {
    "textvqa": textvqa, "gqa": gqa, "vqav2": vqav2, "vizwiz": vizwiz, "pope": pope, "mme": mme,
    "mmbench": lambda root, n: mmbench(root, n, "mmbench", "mmbench_dev_20230712"),
    "mmbench_cn": lambda root, n: mmbench(root, n, "mmbench_cn", "mmbench_dev_cn_20231003", cn=True),
    "sqa": scienceqa, "seed": seed, "mmvet": mmvet, "llavabench": llavabench,
}
DEFAULT_QUESTIONS = 4


def build(root: str, n: int = DEFAULT_QUESTIONS, only: list[str] | None = None) -> str:
    """Write the synthetic benchmarks under `root` (e.g. playground/data/eval)."""
    names = only or list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:  # before anything is written
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}")
    if n < 1:
        raise ValueError(f"the number of questions must be >= 1, got {n}")
    for name in names:
        BENCHMARKS[name](root, n if name not in ("pope", "mme") else max(1, n // 2))
    return root


def writable_folder_problem(root: str) -> str | None:
    """Why nothing can be written under `root` (made if missing), or None."""
    import tempfile

    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        return f"cannot write there ({e.strerror or e}): pass a folder you can write to"
    return None


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default="playground/data/eval")
    p.add_argument("--num-questions", type=int, default=DEFAULT_QUESTIONS)
    p.add_argument("--only", nargs="*", default=None, help=f"some of {sorted(BENCHMARKS)}")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or []) - set(BENCHMARKS))
    problem = (f"--only {' '.join(unknown)}: unknown benchmark(s): choose from {', '.join(sorted(BENCHMARKS))}"
               if unknown else f"--num-questions {args.num_questions}: must be >= 1" if args.num_questions < 1
               else None)
    folder = None if problem else writable_folder_problem(args.root)
    if problem or folder:
        print(f"error: {problem or f'{args.root}: {folder}'}", file=sys.stderr)
        return 2
    try:
        build(args.root, args.num_questions, args.only)
    except OSError as e:  # e.g. the disk filled up half-way
        print(f"error: {args.root}: writing the benchmarks failed ({e}): free space or pick another folder, then "
              f"rerun (the files are rewritten)", file=sys.stderr)
        return 2
    print(f"wrote synthetic benchmarks under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
