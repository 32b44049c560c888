"""The benchmark harness behind `llava-fitprune bench` (the command line itself: `cli/bench.py`).

    models.py   the models a row runs: a pruning-aware LLaVA language model of a named shape with random
                weights, stock LLaVA's for the baseline, the prompt layout and inputs
    measure.py  timing: eager and fast-path runners, prefill / decode / end-to-end, peak memory
    report.py   figures of merit, the markdown table, the CSV and the latency-vs-TFLOPs plot
"""
