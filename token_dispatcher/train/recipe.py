"""Recipes: the YAML schema of a training run, loading it, and checking it.

A recipe is read into plain dataclasses (``Recipe`` with its ``model:``, ``train:`` and
``data:`` sections); every key is type-checked and range-checked here, before any rank
starts, so a typo fails once with the key's name instead of on every rank.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import yaml

from ..model import ModelConfig

DISPATCHERS = ("alltoall", "allgather", "deepep", "hybridep", "uccl", "nvshmem", "auto")
# The recipe's ``wire_dtype`` names -> ``MoETokenDispatcher(wire_dtype=...)``.
WIRE_DTYPES = {None: None, "fp8": torch.float8_e4m3fn}


class RecipeError(ValueError):
    """A recipe (or a command-line override) is invalid; the message names the key."""


@dataclass
class TrainConfig:
    """The ``train:`` section.

    steps:            optimizer steps.
    batch_size:       sequences per step over all ranks (divisible by the world size).
    lr:               peak learning rate (AdamW).
    min_lr_ratio:     cosine decay floor as a fraction of ``lr``.
    warmup_steps:     linear warmup steps.
    weight_decay:     AdamW weight decay on matrices (norm gains are not decayed).
    beta1, beta2, eps: AdamW.
    grad_clip:        max global gradient norm (0 = off).
    precision:        "fp32" or "bf16" (autocast; experts run grouped GEMMs in bf16 on GPUs).
    log_every:        write a metrics line every this many steps (and at the first/last).
    checkpoint_every: save a resumable checkpoint every this many steps (0 = only at the end).
    plot:             write DIR/plot.png at the end (needs matplotlib).
    cuda_graph:       capture every MoE layer's forward + backward as CUDA graphs before the
                      first step (and again after the budget grows) and replay them (needs
                      CUDA, bf16 and ``max_rows_per_rank``: only the budget mode is sync-free).
                      The backward graphs add the MoE parameters' gradients into their
                      ``.grad`` (``layer_graph``); the loop zeroes those in place.
    cuda_graph_scope: what ``cuda_graph`` captures: "layers" (each MoE layer's forward +
                      backward; the rest of the model runs eagerly) or "step" (the whole
                      forward, loss and backward as one graph, ``train/step_graph.py``: one
                      replay per step; the optimizer stays eager).
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "fp32"
    log_every: int = 10
    checkpoint_every: int = 0
    plot: bool = True
    cuda_graph: bool = False
    cuda_graph_scope: str = "layers"


@dataclass
class DataConfig:
    """The ``data:`` section. path: UTF-8 text file; None = ``pydoc_data.topics``."""

    path: Optional[str] = None


@dataclass
class ModelSection(ModelConfig):
    """The ``model:`` section: ``ModelConfig``'s keys, and optionally a transformers MoE
    architecture to train instead of our ``MoETransformer`` (``train/hf_model.py``).

    hf:        None, or qwen3_moe | mixtral | olmoe | deepseek_v3 (needs the ``hf`` extra).
               The size keys above set its config; routing is the architecture's own.
    hf_config: other fields of that transformers config (e.g. ``n_group: 2``).
    """

    hf: Optional[str] = None
    hf_config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A training recipe (YAML). Top-level keys:

    name:            label for logs (default: the file name).
    seed:            init + data order seed.
    device:          "auto" | "cpu" | "cuda".
    nproc:           ranks to spawn when not started by torchrun.
    dispatcher:      alltoall | allgather | deepep | hybridep | uccl | nvshmem | auto.
    ep:              expert-parallel size (divides the world size and num_experts);
                     None = the whole world.
    capacity_factor: per-rank expert capacity factor (None = dropless).
    capacity_policy: which overflow slots to drop: "probs" (lowest probs) or "position"
                     (latest tokens).
    pad_multiple:    pad each expert's rows to a multiple of this (None = no padding).
    backend_options: dict passed to the dispatcher backend.
    max_rows_per_rank: the sync-free budget mode (``MoETokenDispatcher(max_rows_per_rank=)``):
                     None = exact mode. The statuses of every layer are read once per step.
    overflow:        what a step whose rows overflowed the budget does: "rerun" (default:
                     rerun it in the exact mode, grow the budget to fit, log it) or "drop"
                     (keep the step with the rows dropped; logged).
    wire_dtype:      null (rows travel in the activations' dtype) or fp8: dispatch moves e4m3
                     rows with one float32 scale per 128 channels
                     (``MoETokenDispatcher(wire_dtype=torch.float8_e4m3fn)``; alltoall and
                     allgather; model.hidden a multiple of 128). Combine stays BF16/FP32.
    out:             output directory (default runs/<recipe name>).
    model / train / data: sections, see ``ModelConfig``, ``TrainConfig``, ``DataConfig``.
    """

    name: str = ""
    seed: int = 0
    device: str = "auto"
    nproc: int = 2
    dispatcher: str = "alltoall"
    ep: Optional[int] = None
    capacity_factor: Optional[float] = None
    capacity_policy: str = "probs"
    pad_multiple: Optional[int] = None
    backend_options: Dict[str, Any] = field(default_factory=dict)
    max_rows_per_rank: Optional[int] = None
    overflow: str = "rerun"
    wire_dtype: Optional[str] = None
    out: Optional[str] = None
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


_SECTIONS = {"model": ModelSection, "train": TrainConfig, "data": DataConfig}


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """``value`` as the field type ``tp``, or ``RecipeError`` naming ``where``.

    Strict on purpose (true is not 1, 1 is not true, "ten" is not a number): a silent
    conversion would train with a value the recipe's author did not mean.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(where, value, inner)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise RecipeError(f"{where} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where} must be a string, got {value!r}")
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise RecipeError(f"{where} must be a mapping, got {value!r}")
    return value


def _fill(cls, data: Any, where: str, source: str):
    """Build dataclass ``cls`` from the mapping ``data`` (section ``where`` of ``source``);
    unknown keys are errors that list the known ones."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {where or 'the recipe'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise RecipeError(f"{source}: unknown recipe key {full!r} (known keys"
                              f"{' in ' + where if where else ''}: {', '.join(names)})")
        if key in _SECTIONS and not where:
            kwargs[key] = _fill(_SECTIONS[key], value if value is not None else {}, key, source)
        else:
            kwargs[key] = _coerce(f"{source}: recipe key {full!r}", value, hints[key])
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``dotted`` = "a.b" (a ``--set`` override)."""
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}: {p!r} is not a section")
    node[parts[-1]] = value


def load_recipe(path: str, overrides: Optional[Dict[str, Any]] = None) -> Recipe:
    """Read and validate a recipe file.

    path:      YAML file.
    overrides: {"dotted.key": value} applied on top (command-line flags); validated the same.
    Raises ``RecipeError`` naming the offending key.
    """
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the recipe must be a mapping of keys, got {type(raw).__name__}")
    for k, v in (overrides or {}).items():
        _set_path(raw, k, v)
    r = _fill(Recipe, raw, "", path)
    if not r.name:
        r.name = os.path.splitext(os.path.basename(path))[0]
    validate_recipe(r, path)
    return r


def validate_recipe(r: Recipe, source: str = "recipe") -> None:
    """Range checks that types alone cannot express; raises ``RecipeError`` naming the key.

    Checks that need the world size (``ep`` dividing it, the batch splitting over it) run
    in ``train`` once the ranks exist.
    """
    def bad(key, msg):
        raise RecipeError(f"{source}: recipe key {key!r} {msg}")
    if r.dispatcher not in DISPATCHERS:
        bad("dispatcher", f"must be one of {', '.join(DISPATCHERS)}, got {r.dispatcher!r}")
    if r.device not in ("auto", "cpu", "cuda"):
        bad("device", f"must be auto, cpu or cuda, got {r.device!r}")
    if r.nproc < 1:
        bad("nproc", "must be >= 1")
    if r.ep is not None and r.ep < 1:
        bad("ep", "must be >= 1")
    if r.ep is not None and r.model.num_experts % r.ep:
        bad("ep", f"({r.ep}) must divide model.num_experts ({r.model.num_experts})")
    if r.capacity_factor is not None and r.capacity_factor <= 0:
        bad("capacity_factor", "must be > 0")
    if r.overflow not in ("rerun", "drop"):
        bad("overflow", f"must be rerun or drop, got {r.overflow!r}")
    if r.max_rows_per_rank is not None and r.max_rows_per_rank < 1:
        bad("max_rows_per_rank", "must be >= 1")
    if r.max_rows_per_rank is not None and r.pad_multiple and \
            r.max_rows_per_rank % r.pad_multiple:
        bad("max_rows_per_rank", f"must be a multiple of pad_multiple ({r.pad_multiple})")
    if r.train.cuda_graph and r.max_rows_per_rank is None:
        bad("train.cuda_graph", "needs max_rows_per_rank (the sync-free budget mode): the "
            "exact mode syncs the host in every dispatch, which a CUDA graph cannot hold")
    if r.train.cuda_graph and r.model.activation_checkpointing:
        bad("train.cuda_graph", "cannot be combined with model.activation_checkpointing")
    if r.train.cuda_graph and r.train.precision != "bf16":
        bad("train.cuda_graph", "needs train.precision: bf16 (fp32 rows run the per-expert "
            "loop, which reads the counts on the host)")
    if r.train.cuda_graph_scope not in ("layers", "step"):
        bad("train.cuda_graph_scope", f"must be layers or step, got {r.train.cuda_graph_scope!r}")
    if r.wire_dtype not in WIRE_DTYPES:
        bad("wire_dtype", f"must be null or fp8, got {r.wire_dtype!r}")
    if r.wire_dtype is not None and r.model.hidden % 128:
        bad("wire_dtype", f"fp8 needs model.hidden to be a multiple of 128 (one scale per "
            f"128 channels), got {r.model.hidden}")
    if r.capacity_policy not in ("probs", "position"):
        bad("capacity_policy", f"must be probs or position, got {r.capacity_policy!r}")
    if r.train.precision not in ("fp32", "bf16"):
        bad("train.precision", f"must be fp32 or bf16, got {r.train.precision!r}")
    if r.train.steps < 1:
        bad("train.steps", "must be >= 1")
    if r.train.log_every < 1:
        bad("train.log_every", "must be >= 1")
    if r.model.score_func not in ("softmax", "sigmoid"):
        bad("model.score_func", f"must be softmax or sigmoid, got {r.model.score_func!r}")
    if r.model.expert_impl not in ("auto", "grouped_mm", "loop"):
        bad("model.expert_impl", f"must be auto, grouped_mm or loop, got {r.model.expert_impl!r}")
    try:
        r.model.validate()
    except ValueError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    if getattr(r.model, "hf", None) is not None:
        from .hf_model import check_recipe
        try:
            check_recipe(r)
        except (ValueError, ImportError) as exc:
            raise RecipeError(f"{source}: {exc}") from None
