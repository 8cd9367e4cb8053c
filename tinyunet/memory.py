"""Will a training fit in memory? Estimated before anything big is allocated, from the model's own
activations, so that ``--depth 12 --size 4096`` is a one-line error with a setting that fits
instead of a process the kernel kills at 23 GB.

The estimate adds up what a training holds at once:

- the weights, their gradients and Adam's two moments: 16 bytes a parameter (float32);
- the activations the layers keep from forward for backward (what ``tinyunet summary`` measures),
  measured on a small copy of the model (depth at most 3, base at most 16 channels, 32 pixels a
  level's side at the deepest) and scaled: they grow with the batch, the square of the image side,
  the channels, and each level deeper adds half the one above (a quarter of the pixels, twice the
  channels), so a U-Net's total is (2 - 2**-depth) times its first level's;
- the decoded data: 4 bytes a pixel (RGB + class id).

It leaves out what is small beside these (the gradients in flight, the program itself), so it is a
little below the real peak: refused settings cannot fit, allowed ones may still be tight.
"""
from __future__ import annotations

import functools
import resource
from dataclasses import dataclass, replace
from typing import Any, List, Optional, Tuple

from tinyunet.errors import TinyUNetError

__all__ = ["MemoryEstimate", "estimate_training_memory", "available_memory", "check_training_fits"]

_PROXY_DEPTH, _PROXY_BASE, _PROXY_DEEPEST_SIDE = 3, 16, 4
_NO_LIMIT = 1 << 60  # cgroup and rlimit values at least this large mean "unlimited"
_SUGGESTION_SHARE = 0.8  # a suggested setting leaves a fifth of the memory for what the estimate leaves out


@dataclass
class MemoryEstimate:
    parameters: int
    weights: int      # bytes: weights, gradients, Adam's moments
    activations: int  # bytes kept from forward for backward, at the batch size
    data: int         # bytes of decoded images and labels

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.data


def _levels(depth: int) -> float:
    return 2.0 - 2.0 ** -depth


@functools.lru_cache(maxsize=None)
def _proxy(arch: str, batchnorm: bool, depth: int, base: int) -> Tuple[int, int]:
    """(parameters, saved bytes for one image of side 2**depth * 4) of a small copy of the model."""
    from tinyunet.classes import NUM_CLASSES
    from tinyunet.models import create_model
    from tinyunet.summary import summarize

    model = create_model(arch, in_channels=3, num_classes=NUM_CLASSES, base_channels=base, depth=depth,
                         batchnorm=batchnorm)
    side = 2 ** depth * _PROXY_DEEPEST_SIDE
    saved = sum(row.saved_bytes for row in summarize(model, (1, 3, side, side)))
    return model.num_parameters(), saved


def estimate_training_memory(config: Any, num_images: int) -> MemoryEstimate:
    """The estimate above for a TrainConfig and ``num_images`` decoded images (training and validation)."""
    depth = min(config.depth, _PROXY_DEPTH)
    base = min(config.base_channels, _PROXY_BASE)
    params, saved = _proxy(config.arch, config.batchnorm, depth, base)
    if config.depth > depth:  # each level deeper: about 4x the parameters of the one above
        params_above = _proxy(config.arch, config.batchnorm, depth - 1, base)[0]
        step = params - params_above
        params += sum(step * 4 ** k for k in range(1, config.depth - depth + 1))
    params = int(params * (config.base_channels / base) ** 2)
    side = 2 ** depth * _PROXY_DEEPEST_SIDE
    activations = (saved * config.batch_size * (config.size / side) ** 2 * (config.base_channels / base)
                   * _levels(config.depth) / _levels(depth))
    return MemoryEstimate(params, 16 * params, int(activations), num_images * config.size ** 2 * 4)


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def available_memory() -> Optional[int]:
    """Bytes this process may still allocate: the least of the free memory (MemAvailable + free
    swap), the control group's limit less its use, and the address-space limit (``ulimit -v``) less
    what the process maps. None where none of them can be read (not Linux)."""
    found: List[int] = []
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        if "MemAvailable" in info:
            found.append(info["MemAvailable"] + info.get("SwapFree", 0))
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < _NO_LIMIT:
            found.append(max(limit - usage, 0))
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft not in (resource.RLIM_INFINITY, -1) and soft < _NO_LIMIT:
        mapped = 0
        try:
            with open("/proc/self/status") as f:
                mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        except (OSError, StopIteration, ValueError):
            pass
        found.append(max(soft - mapped, 0))
    return min(found) if found else None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _fits(config: Any, num_images: int, budget: int) -> bool:
    return estimate_training_memory(config, num_images).total <= budget


def _smaller_setting(config: Any, num_images: int, budget: int) -> Optional[str]:
    """The least change of the settings that fits in 80% of ``budget``: a smaller batch, else a
    smaller image side (a multiple of 2**depth), else fewer levels (at the largest side up to 256
    that fits); None if nothing does."""
    budget = int(budget * _SUGGESTION_SHARE)
    for batch in range(config.batch_size - 1, 0, -1):
        if _fits(replace(config, batch_size=batch), num_images, budget):
            return f"--batch-size {batch}"
    factor = 2 ** config.depth
    for size in range(config.size - factor, factor - 1, -factor):
        if _fits(replace(config, size=size), num_images, budget):
            return f"--size {size}"
    for depth in range(config.depth - 1, 0, -1):
        step = 2 ** depth
        for size in range(min(config.size, 256) // step * step, step - 1, -step):
            if _fits(replace(config, depth=depth, size=size), num_images, budget):
                return f"--depth {depth} --size {size}"
    return None


def check_training_fits(config: Any, num_images: int, budget: Optional[int] = None) -> Optional[MemoryEstimate]:
    """Raise TinyUNetError if the estimate for ``config`` exceeds ``budget`` (default: the memory
    available now), naming the settings and a change that fits; else return the estimate (None
    where the available memory is unknown)."""
    budget = available_memory() if budget is None else budget
    if budget is None:
        return None
    estimate = estimate_training_memory(config, num_images)
    if estimate.total <= budget:
        return estimate
    fix = _smaller_setting(config, num_images, budget)
    advice = (f"use {fix} (about {_gb(estimate_training_memory(_apply(config, fix), num_images).total)})"
              if fix else "use a smaller model and image size, or free memory")
    raise TinyUNetError(
        f"--arch {config.arch} --base-channels {config.base_channels} --depth {config.depth} --size {config.size} "
        f"--batch-size {config.batch_size} needs about {_gb(estimate.total)} of memory ({_gb(estimate.weights)} for "
        f"{estimate.parameters:,} parameters with their gradients and Adam's moments, {_gb(estimate.activations)} "
        f"of activations kept for backward, {_gb(estimate.data)} of data), but {_gb(budget)} is available: {advice}")


def _apply(config: Any, fix: str) -> Any:
    words = fix.split()
    return replace(config, **{words[i][2:].replace("-", "_"): int(words[i + 1]) for i in range(0, len(words), 2)})
