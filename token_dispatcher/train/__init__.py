"""End-to-end MoE language-model training with expert parallelism.

    moe-train RECIPE [--steps N] [--dispatcher NAME] [--ep N] [--seed N] [--out DIR]
                     [--data PATH] [--nproc N] [--resume] [--set KEY=VALUE ...]
    python -m token_dispatcher.train RECIPE ...
    torchrun --nproc-per-node 4 -m token_dispatcher.train recipes/gpu_small.yaml

Outputs in ``--out DIR``: ``metrics.jsonl`` (one JSON object per logged step),
``plot.png`` (loss and expert load), ``checkpoint/`` (resume with ``--resume``).

The modules, in the order a run meets them:

    launch.py      the command: flags, checks before any rank starts, starting the ranks.
    recipe.py      the recipe (YAML) schema, loading and checking it.
    loop.py        ``train(recipe, opts)`` on every rank: parallel layout, the step, logging.
    budget.py      the budget mode: one status read per step, the overflow policy.
    hf_model.py    ``model.hf`` recipes: a transformers MoE model made expert-parallel.
    checkpoint.py  resumable per-rank checkpoints.
    metrics.py     ``metrics.jsonl``, the progress bar, memory use, the plot.
"""
from ..model import ModelConfig
from .launch import main
from .loop import RunOptions, train
from .metrics import Progress, plot_metrics, rss_mb
from .recipe import (DISPATCHERS, DataConfig, Recipe, RecipeError, TrainConfig, load_recipe,
                     validate_recipe)

__all__ = [
    "main", "train", "RunOptions",
    "Recipe", "TrainConfig", "DataConfig", "ModelConfig", "RecipeError", "DISPATCHERS",
    "load_recipe", "validate_recipe",
    "Progress", "plot_metrics", "rss_mb",
]
