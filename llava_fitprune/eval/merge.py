"""Join chunk answer files into one, as LLaVA's scripts do with `cat`, but only complete chunks.

    python -m llava_fitprune.eval.merge --out answers/merge.jsonl --benchmark gqa answers/2_0.jsonl answers/2_1.jsonl

Each chunk's `.meta.json` must say `complete: true`; otherwise the merge stops and names the chunk.
The merged file gets its own sidecar: the chunks' settings, summed answers, prefill statistics
recomputed over all answers, and `complete: true` last.

`--partial` also takes chunks that stopped at `--limit` (and only those): the merged sidecar then says
`complete: false, partial: true` (the report skips it, nothing should score it) and the exit status is
PARTIAL_STATUS (3), so a script can tell a partial merge from a whole one.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..core.flops import LMShape
from .answers import META_FORMAT, META_VERSION, RESUME_KEYS, converted_images, read_answers, read_meta
from .io import EvalInputError, atomic_open, meta_path, require_answers, write_json
from .prefill import summarize

PARTIAL_STATUS = 3
PER_CHUNK_KEYS = ("chunk_idx", "num_questions", "num_answers", "wall_time_s", "sessions", "started_at",
                  "updated_at", "finished_at", "prefill", "model_load_s", "device", "images_converted_to_rgb",
                  "stopped_at_limit")


def check_chunks(chunks: list[str], partial: bool = False) -> list[dict]:
    metas = []
    for path in chunks:
        if not os.path.exists(path):
            raise EvalInputError(f"chunk {path} does not exist: its generation did not start or failed")
        meta = read_meta(path)
        if meta is None:
            raise EvalInputError(f"chunk {path} has no {os.path.basename(meta_path(path))}: it was not written by "
                                 f"llava_fitprune, so its completeness is unknown")
        if not meta.get("complete") and not (partial and meta.get("stopped_at_limit") is not None):
            raise EvalInputError(
                f"chunk {path} is incomplete ({meta.get('num_answers')} of {meta.get('num_questions')} answers): "
                f"its run was interrupted or failed; rerun the same command to resume it (after fixing the input, "
                f"if its error named bad input), then merge")
        metas.append(meta)
    first = metas[0]
    order = [m.get("chunk_idx") for m in metas]
    if first.get("num_chunks") != len(chunks) or order != list(range(len(chunks))):
        raise EvalInputError(f"the run was split into {first.get('num_chunks')} chunks but chunks {order} were "
                             f"given: pass every chunk, in order")
    for path, meta in zip(chunks[1:], metas[1:]):
        diffs = [k for k in RESUME_KEYS if k != "chunk_idx" and meta.get(k) != first.get(k)]
        if diffs:
            raise EvalInputError(f"chunk {path} was run with other settings than {chunks[0]} ({diffs}); "
                                 f"refusing to merge them")
    return metas


def concatenate(chunks: list[str], out: str) -> None:
    """The chunks' lines as they are (LLaVA's scripts `cat` them), via a temporary file."""
    with atomic_open(out, "wb") as f:
        for path in chunks:
            with open(path, "rb") as c:
                data = c.read()
            f.write(data if not data or data.endswith(b"\n") else data + b"\n")


def merge(chunks: list[str], out: str, benchmark: str | None = None, run_name: str | None = None,
          partial: bool = False) -> dict:
    """`partial`: chunks that stopped at --limit may be merged too; the result then says `partial: true`."""
    if not chunks:
        raise EvalInputError("no chunk files given to merge")
    t0 = time.time()
    metas = check_chunks(chunks, partial)
    rows = [r for path in chunks for r in read_answers(path)]  # every line parses
    require_answers(rows, f"the chunks of {out}")
    if os.path.exists(meta_path(out)):
        os.remove(meta_path(out))  # the old merge is gone from here on
    concatenate(chunks, out)
    first = metas[0]
    shape = LMShape(**first["lm_shape"])
    meta = {k: v for k, v in first.items() if k not in PER_CHUNK_KEYS}
    meta.update(
        format=META_FORMAT, version=META_VERSION, kind="merged", complete=False, benchmark=benchmark, run_name=run_name,
        chunks=[os.path.relpath(c, os.path.dirname(os.path.abspath(out))) for c in chunks],
        num_questions=sum(m["num_questions"] for m in metas), num_answers=len(rows),
        wall_time_s=max(m.get("wall_time_s") or 0.0 for m in metas),  # chunks run side by side
        device_time_s=sum(m.get("wall_time_s") or 0.0 for m in metas),
        model_load_s=max(m.get("model_load_s") or 0.0 for m in metas),
        prefill=summarize(rows, shape), images_converted_to_rgb=converted_images(rows),
        merged_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        merge_s=time.time() - t0,
    )
    write_json(meta_path(out), meta)
    if any(not m.get("complete") for m in metas):  # stopped at --limit: stays incomplete
        meta["partial"] = True
        write_json(meta_path(out), meta)
        return meta
    meta["complete"] = True  # written last: the merged file is whole
    write_json(meta_path(out), meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("chunks", nargs="+", help="chunk answer files, in chunk order")
    p.add_argument("--out", required=True, help="the merged answers file")
    p.add_argument("--benchmark", default=None, help="benchmark name recorded for the report")
    p.add_argument("--run-name", default=None, help="the run's name (the scripts' CKPT), one report row per run")
    p.add_argument("--partial", action="store_true",
                   help=f"also merge chunks that stopped at --limit: the result is marked partial "
                        f"(exit {PARTIAL_STATUS})")
    args = p.parse_args(argv)
    try:
        meta = merge(args.chunks, args.out, args.benchmark, args.run_name, args.partial)
    except EvalInputError as e:
        print(f"merge: {e}", file=sys.stderr)
        return 1
    if meta.get("partial"):
        print(f"merged {len(args.chunks)} chunk(s) into {args.out}: {meta['num_answers']} of {meta['num_questions']} "
              f"answers (partial: --limit)")
        return PARTIAL_STATUS
    print(f"merged {len(args.chunks)} chunk(s) into {args.out}: {meta['num_answers']} answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
