"""FitPrune's fit: a per-layer drop schedule that meets a FLOPs budget, from attention statistics.

1. Statistics (one dense pass): for sample s and layer l, from the head-max attention map M,
   W_cross[s, l] = sum_{t in T, j in V} M[t, j] / |T|   (T: text after the image, V: visual)
   W_self[s, l]  = sum_{i in V, j in V} M[i, j] / |V|
2. Simulation for a threshold alpha, layer by layer over all samples (pruned states feed the next
   layer). Per sample, with cross score c_j = sum_{t in T} M[t, j] / |T| and self score
   s_j = sum_{i in V} M[i, j] / |V| over the tokens still alive: the cross deletion set is the
   longest prefix of V sorted ascending by c_j (stable sort: ties in position order) whose removal
   keeps sum_{j kept} c_j >= (1 - alpha) W_cross[s, l]; the self set likewise; the sample drops
   the tokens in both. Schedule: C_l = floor(mean_s(cumulative drops of s up to l) + 0.5) (round
   half up of the cumulative mean, the rule `Recipe.drops_for` scales with), d_l = C_l - C_{l-1}.
   Before each layer the schedule so far, with no further drops, is costed with our FLOPs model
   (spent + forecast); once it meets `(1 - ratio) * dense`, the remaining layers drop nothing.
   The check runs on the rounded schedule itself, so a schedule that stops meets its budget.
3. Bisection over alpha on the grid k * tol (k = 0..ceil(1/tol)) for the least k whose schedule
   meets the budget; k - 1 was then simulated and missed. About 7 simulations for tol 0.01.
4. Trim (deterministic): the last pruning layer's count is lowered to the least that still meets
   the budget (binary search on that integer), so the result is within one token of the budget.

Mixed visual-token counts (LLaVA-NeXT anyres: each image its own count n_s). The recipe is fitted
for the reference count N_ref = max_s n_s (its `num_visual_tokens`). Sample s's simulated cumulative
drops through layer l are taken as a fraction of its own count, averaged over samples, scaled to
N_ref and rounded half up: C_l = floor(N_ref * mean_s(cum_{s,l} / n_s) + 1/2) (exact rationals),
d_l = C_l - C_{l-1}. With one count this is the rule of step 2, to the bit. Applied to a sample with
n tokens the recipe is scaled back by `Recipe.drops_for(n)`; the report gives the reduction it then
achieves for each distinct calibration count (`report['budgets'][ratio]['achieved_reduction_by_count']`).
Samples of different lengths are batched right-padded with masks.

Few stages (`max_pruning_layers=K`): the least alpha whose least-FLOPs schedule of at most K pruning
layers that never runs ahead of the full simulation's cumulative drops meets the budget
(fit_stages.py); the unconstrained recipe when it already prunes in at most K layers.

Budgets are costed for one reference prompt: N_ref visual tokens and the calibration's mean
text token count (round half up). Several budgets share one statistics pass and a cache of
simulations keyed by alpha (a simulation run for a larger budget contains the smaller's).
"""
from __future__ import annotations

import math
import resource
import time
from typing import Optional, Sequence, Union

import torch

from .calibration import CalibrationSample, CalibrationSet
from .fit_runner import Statistics, collect_statistics, meets, schedule_for, schedule_reduction, simulate
from .fit_stages import check_max_pruning_layers, pruning_layers, stage_schedule
from .flops import LMShape, prefill_report, reduction_for
from .recipe import Recipe, RecipeError, check_reduction_ratio


# -- search ---------------------------------------------------------------------------------------------
def alpha_grid(tol: float) -> list[float]:
    if not (0.0 < tol <= 1.0):
        raise ValueError(f"tol must be in (0, 1], got {tol}")
    K = math.ceil(1.0 / tol - 1e-9)
    return [round(min(k * tol, 1.0), 10) for k in range(K + 1)]


class _Search:
    """Bisection for one or more budgets over one statistics pass, simulations cached by grid index."""

    def __init__(self, model, stats: Statistics, convention: str, tol: float):
        self.model, self.stats, self.convention = model, stats, convention
        self.grid = alpha_grid(tol)
        self.cache: dict[int, list[int]] = {}  # grid index -> simulated drops (prefix)
        self.simulations = 0
        self.layers_run = 0  # decoder layers run over all samples, summed over simulations

    def schedule(self, k: int, ratio: float) -> Optional[list[int]]:
        prefix = self.cache.get(k)
        if prefix is not None:
            found = schedule_for(self.stats, prefix, ratio, self.convention)
            if found is not None or len(prefix) == self.stats.shape.num_layers:
                return found
        self.cache[k] = simulate(self.model, self.stats, self.grid[k], ratio, self.convention)
        self.simulations += 1
        self.layers_run += len(self.cache[k])
        return schedule_for(self.stats, self.cache[k], ratio, self.convention)

    def full(self, k: int) -> list[int]:
        """The simulation at grid index k over every layer (no stop), cached."""
        if len(self.cache.get(k, ())) < self.stats.shape.num_layers:
            self.cache[k] = simulate(self.model, self.stats, self.grid[k], None, self.convention)
            self.simulations += 1
            self.layers_run += len(self.cache[k])
        return self.cache[k]

    def staged(self, k: int, ratio: float, max_stages: int) -> Optional[list[int]]:
        """The least-FLOPs schedule of at most `max_stages` pruning layers under the simulation at k
        (fit_stages.py), or None if even that misses `ratio`."""
        s = self.stats
        sched = stage_schedule(s.shape, s.num_text, s.num_visual, self.full(k), max_stages, self.convention)
        return sched if meets(s, sched, ratio, self.convention) else None

    def bisect(self, ratio: float, bar=None, max_stages: Optional[int] = None, lo: int = -1) -> tuple[int, list[int], int]:
        """Least grid index whose schedule (of at most `max_stages` pruning layers, if given) meets `ratio`:
        (k, schedule, rounds). `lo`: a grid index known to miss (-1: none)."""
        test = self.schedule if max_stages is None else (lambda k, r: self.staged(k, r, max_stages))
        hi, best, rounds = len(self.grid) - 1, None, 0  # lo misses (or is below the grid)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            sched, rounds = test(mid, ratio), rounds + 1
            if bar is not None:
                bar.set_postfix(alpha=self.grid[mid], meets=sched is not None)
                bar.update(1)
            if sched is not None:
                hi, best = mid, sched
            else:
                lo = mid
        if best is None:  # hi is the top of the grid and was never simulated
            best, rounds = test(hi, ratio), rounds + 1
            if best is None and max_stages is not None:
                s = self.stats
                top = schedule_reduction(s, stage_schedule(s.shape, s.num_text, s.num_visual, self.full(hi),
                                                           max_stages, self.convention), self.convention)
                raise RecipeError(f"no schedule with at most {max_stages} pruning layers (max_pruning_layers="
                                  f"{max_stages}) meets reduction_ratio {ratio}: the most one removes is {top:.4f} "
                                  f"({self.convention}); raise --max-pruning-layers or lower the ratio")
            if best is None:
                raise RecipeError(f"no alpha meets reduction_ratio {ratio}, though dropping every visual token "
                                  f"at layer 0 would; this is a bug, please report it")
        return hi, best, rounds

    def trim(self, drops: list[int], ratio: float) -> Optional[dict]:
        """Lower the last pruning layer's count to the least that meets `ratio` (in place)."""
        last = max((l for l, d in enumerate(drops) if d > 0), default=None)
        if last is None:
            return None
        lo, hi, orig = 0, drops[last], drops[last]  # lo - 1 misses, hi meets
        while lo < hi:
            mid = (lo + hi) // 2
            drops[last] = mid
            if meets(self.stats, drops, ratio, self.convention):
                hi = mid
            else:
                lo = mid + 1
        drops[last] = hi
        return {"layer": last, "from": orig, "to": hi}


def _reduction_by_count(stats: Statistics, recipe: Recipe, convention: str) -> dict:
    """Reduction the recipe achieves, scaled by `drops_for(n)`, for each distinct calibration count n
    (n visual + the reference text tokens)."""
    return {str(n): round(reduction_for(stats.shape, stats.num_text, n, recipe.drops_for(n), convention), 6)
            for n in sorted(set(stats.visual_counts))}


def max_reduction(stats: Statistics, convention: str) -> float:
    """The most a schedule can remove: every visual token dropped at layer 0."""
    return schedule_reduction(stats, [stats.num_visual], convention)


def _memory_mb(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"cuda_peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    return {"process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


class _Phase:
    """Wall time and peak memory of a phase, into report['phases'][name] (CUDA: peak of this phase;
    CPU: the process's high-water RSS, which never goes down)."""

    def __init__(self, report: dict, name: str, device: torch.device, progress: bool):
        self.report, self.name, self.device, self.progress = report, name, device, progress

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        rec = {"wall_s": round(time.perf_counter() - self.t0, 3), **_memory_mb(self.device)}
        self.report.setdefault("phases", {})[self.name] = rec
        if self.progress:
            print(f"[fit] {self.name}: {rec}")



def _model_identity(model, stats: Statistics, name: Optional[str]) -> dict:
    if name is None:
        path = str(getattr(model.config, "_name_or_path", "") or "").rstrip("/")
        name = path.replace("\\", "/").split("/")[-1] or "unknown"
    return {"name": name, **stats.shape.to_dict()}


def _provenance(stats: Statistics, meta: dict, model, alpha: float, tol: float, rounds: int,
                trim: Optional[dict], drops: list[int], convention: str, stages: Optional[dict] = None) -> dict:
    from .. import __version__

    rep = prefill_report(stats.shape, stats.num_text, stats.num_visual, drops)
    visual_only = convention == "visual_only"
    p = {
        "tool": "llava-fitprune fit", "package_version": __version__,
        "calibration_file": meta.get("question_file"), "calibration_sha256": meta.get("question_file_sha256"),
        "calibration_images_sha256": meta.get("images_sha256"), "calibration_questions": meta.get("num_questions"),
        "num_samples": len(stats.samples), "seed": meta.get("seed"), "conv_mode": meta.get("conv_mode"),
        "sampling": meta.get("sampling"), "question_ids": meta.get("question_ids"),
        "alpha": alpha, "tol": tol, "bisection_rounds": rounds, "trim": trim,
        "reference_text_tokens": stats.num_text, "reference_visual_tokens": stats.num_visual,
        "dense_flops": rep.dense_visual_macs if visual_only else rep.dense_flops,
        "achieved_flops": rep.pruned_visual_macs if visual_only else rep.pruned_flops,
        "flops_unit": "MACs of visual tokens (paper)" if visual_only else "FLOPs of the prefill, all tokens",
        "total_reduction": round(rep.reduction, 6), "visual_only_reduction": round(rep.visual_only_reduction, 6),
        "dtype": str(model.dtype).replace("torch.", ""), "device": model.device.type,
    }
    if stages is not None:  # only with max_pruning_layers: recipes fitted without it are unchanged
        p.update(stages)
    return p


def fit(model, calibration: Union[CalibrationSet, Sequence[CalibrationSample]],
        reduction_ratio: Union[float, Sequence[float]], *, convention: str = "total", tol: float = 0.01,
        progress: bool = True, batch_size: int = 8, model_name: Optional[str] = None,
        report: Optional[dict] = None, max_pruning_layers: Optional[int] = None) -> Union[Recipe, list[Recipe]]:
    """FitPrune recipes for one budget (a float: returns a Recipe) or several (a list: a list).

    `calibration`: a `CalibrationSet` (its provenance goes into the recipes) or a list of samples.
    Samples may have different visual-token counts (anyres): the recipe is fitted for the largest,
    N_ref (`num_visual_tokens`), from the mean over samples of each sample's cumulative drops as a
    fraction of its own count (times N_ref, rounded half up), and its budget is checked at N_ref
    visual + mean text tokens; see the module doc. With one count the result is unchanged.
    `report`: a dict filled with wall time and peak memory per phase and the search counts (not in
    the recipe, so the recipe JSON is byte-identical across runs).
    `max_pruning_layers`: K, at most K layers with a non-zero drop (1..number of layers; None: no cap).
    Where the unconstrained fit already prunes in at most K layers it is returned as is; otherwise the
    least alpha whose best K-stage schedule meets the budget (fit_stages.py). Recorded in the provenance
    with the unconstrained fit's alpha and pruning-layer count.
    """
    from tqdm import tqdm

    single = not isinstance(reduction_ratio, (list, tuple))
    ratios = [check_reduction_ratio(r) for r in ([reduction_ratio] if single else reduction_ratio)]
    if not ratios:
        raise RecipeError("no reduction_ratio given: pass one or more ratios in [0, 1)")
    if convention not in ("total", "visual_only"):
        raise ValueError(f"unknown FLOPs convention {convention!r}: use 'total' or 'visual_only'")
    samples = calibration.samples if isinstance(calibration, CalibrationSet) else list(calibration)
    meta = calibration.meta if isinstance(calibration, CalibrationSet) else {}
    report = {} if report is None else report
    device = next(model.parameters()).device
    max_stages = check_max_pruning_layers(max_pruning_layers, LMShape.from_config(model.config).num_layers)

    with _Phase(report, "statistics", device, progress):
        stats = collect_statistics(model, samples, batch_size, progress)
    top = max_reduction(stats, convention)
    for r in ratios:
        if r > top:
            raise RecipeError(
                f"reduction_ratio {r} is out of reach under the {convention!r} FLOPs convention: dropping all "
                f"{stats.num_visual} visual tokens at layer 0 removes {top:.4f} of this model's FLOPs "
                f"({stats.num_text} text tokens); ask for at most {math.floor(top * 1000) / 1000}"
                + ("" if max_stages is None else f" (max_pruning_layers={max_stages} is not what limits it: one "
                                                 f"pruning layer, layer 0, reaches that most)"))
    search = _Search(model, stats, convention, tol)
    results = {}
    for r in sorted(set(ratios), reverse=True):  # large budgets first: their simulations serve the smaller
        sims0, layers0 = search.simulations, search.layers_run
        with _Phase(report, f"bisection {r}", device, progress):
            bar = tqdm(total=math.ceil(math.log2(len(search.grid) + 1)), desc=f"fit: bisection for {r}",
                       disable=not progress)
            k, drops, rounds = search.bisect(r, bar)
            trim, stages = search.trim(drops, r), None
            if max_stages is not None:
                stages = {"max_pruning_layers": max_stages, "unconstrained_alpha": search.grid[k],
                          "unconstrained_pruning_layers": pruning_layers(drops)}
                if pruning_layers(drops) > max_stages:  # the cap binds: k - 1 missed even unconstrained
                    k, drops, more = search.bisect(r, bar, max_stages=max_stages, lo=k - 1)
                    rounds, trim = rounds + more, search.trim(drops, r)
            bar.close()
        if not meets(stats, drops, r, convention) or pruning_layers(drops) > (max_stages or len(drops)):
            raise RuntimeError(f"fit produced a schedule missing its budget {r} or its cap of pruning layers: this "
                               f"is a bug, please report it")
        alpha = search.grid[k]
        results[r] = Recipe(
            drop_per_layer=drops, num_visual_tokens=stats.num_visual, reduction_ratio=r,
            achieved_reduction=round(schedule_reduction(stats, drops, convention), 6), flops_convention=convention,
            method="fitprune", model=_model_identity(model, stats, model_name),
            provenance=_provenance(stats, meta, model, alpha, tol, rounds, trim, drops, convention, stages))
        report.setdefault("budgets", {})[str(r)] = {
            "alpha": alpha, "bisection_rounds": rounds, "simulations_run": search.simulations - sims0,
            "forward_equivalents": round((search.layers_run - layers0) / stats.shape.num_layers, 3),
            "achieved_reduction": results[r].achieved_reduction, "drop_per_layer": drops, **(stages or {}),
            "achieved_reduction_by_count": _reduction_by_count(stats, results[r], convention)}
    counts = stats.visual_counts
    report.update(num_samples=len(samples), simulations_run=search.simulations, batch_size=batch_size,
                  reference_visual_tokens=stats.num_visual,
                  visual_token_counts={str(n): counts.count(n) for n in sorted(set(counts))},
                  forward_equivalents={"statistics": 1.0,  # one forward of every sample = 1
                                       "bisection": round(search.layers_run / stats.shape.num_layers, 3)})
    recipes = [results[r] for r in ratios]
    return recipes[0] if single else recipes
