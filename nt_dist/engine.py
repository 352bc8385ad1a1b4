"""The engine under the loop: accelerate (processes, devices, precision), DeepSpeed's config,
dtypes and memory layout of inputs, the model without its wrappers.

The training loop (:mod:`nt_dist.train`) calls these and never branches on the backend itself.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from nt_dist.config import Recipe
from nt_dist.errors import UserError, warn


def build_accelerator(recipe: Recipe, source: str = "<recipe>") -> Any:
    """Accelerate decides the process layout (from ``accelerate launch``); the recipe decides
    the precision. Without CUDA, processes talk over gloo: through accelerate's MULTI_CPU
    path (``cpu=True``), or, under DeepSpeed (which ``cpu=True`` would switch off), by naming
    the backend."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    # accelerate keeps one process-wide state: forget the previous run's precision when several
    # recipes train in one process (the quickstart; library use). The process group stays.
    AcceleratorState._reset_state()
    precision = recipe.run.precision
    cuda = torch.cuda.is_available()
    check_local_devices(source)
    if precision == "fp16" and not cuda:
        raise UserError(f"{source}: run.precision: fp16 needs a GPU; use bf16 or no on CPU")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise UserError("accelerate config: distributed_type FSDP is not supported: under FSDP each rank keeps "
                        "its own BatchNorm running statistics (DDP and ZeRO broadcast them) and accelerate runs "
                        "FSDP on GPUs only; shard with cluster/deepspeed_zero3.yaml instead")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not cuda:  # DeepSpeed finds the CPU itself, but says so on stdout ("Setting accelerator to CPU")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = {"backend": "gloo"} if deepspeed and not cuda else {}
    handlers = [InitProcessGroupKwargs(timeout=timedelta(minutes=10), **backend)]
    accelerator = Accelerator(cpu=not cuda and not deepspeed, mixed_precision=precision,
                              kwargs_handlers=handlers, step_scheduler_with_optimizer=False)
    warn_emulated_bf16(accelerator, precision, source)
    set_determinism(accelerator.device, recipe.run.deterministic)
    return accelerator


def check_local_devices(source: str) -> None:
    """More processes on a machine than it has GPUs: accelerate would place a process on a GPU
    that does not exist (``invalid device ordinal``, deep in a traceback)."""
    if not torch.cuda.is_available():
        return
    local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= visible:
        local_world = os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1))
        raise UserError(f"{source}: {local_world} processes on this machine but {visible} GPU(s) visible; launch "
                        f"with --num_processes {visible} (or hide the GPUs, CUDA_VISIBLE_DEVICES='', to run on the CPU)")


def set_determinism(device: torch.device, deterministic: bool) -> None:
    """``run.deterministic``: on CUDA, deterministic cuDNN and cuBLAS kernels (a rerun or a resumed
    run gives the same weights bit for bit); otherwise ``cudnn.benchmark`` picks the fastest conv
    kernels once for the fixed input shapes. Set on every run: the flags are process-wide."""
    cuda = device.type == "cuda"
    if cuda and deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    if cuda or torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(cuda and deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = cuda and deterministic
    torch.backends.cudnn.benchmark = cuda and not deterministic


def warn_emulated_bf16(accelerator: Any, precision: str, source: str) -> None:
    """bf16 on a device that only emulates it trains, but tens of times slower than fp32 and with
    nothing said (a CPU without AVX512-BF16/AMX: one step of a Tiny-ImageNet ResNet-18 takes
    minutes): one line, from the main process, with the fix."""
    from nt_dist.frozen_network import native_bf16

    if precision == "bf16" and accelerator.is_main_process and not native_bf16(accelerator.device):
        warn(f"{source}: run.precision: bf16 is emulated on this {accelerator.device.type} (no native bf16), "
             "often 10-60x slower than fp32; for a try on this machine add --set run.precision=no")


def fill_deepspeed_config(accelerator: Any, recipe: Recipe) -> None:
    """Under DeepSpeed, "auto" entries of the JSON come from the recipe (we feed data
    ourselves, so accelerate cannot read the micro-batch size off a DataLoader)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = recipe.data.batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = recipe.optim.grad_clip
    if config.get("train_batch_size") == "auto":
        config["train_batch_size"] = recipe.data.batch_size * accelerator.num_processes


def input_dtype(accelerator: Any) -> torch.dtype | None:
    """DeepSpeed's bf16/fp16 engines hold low-precision weights and do not autocast: their
    inputs (and the frozen network beside them) must be cast. None: leave inputs as they are."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    config = plugin.deepspeed_config
    if config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return None


def under_deepspeed(accelerator: Any) -> bool:
    """The model goes to a DeepSpeed engine. Its parameters then stay contiguous (NCHW) under
    ``model.channels_last``: the engine's _broadcast_model views each parameter as bytes, which
    fails on channels-last weights ("self.stride(-1) must be 1 to view BFloat16 as Byte"), and
    ZeRO-1/2 re-point parameters into a flat NCHW buffer anyway. Inputs stay channels-last
    (:func:`prepare_inputs`): cuDNN and oneDNN pick the NHWC kernel when the input or the weight
    is channels-last, so activations stay NHWC."""
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def place_model(model: nn.Module, recipe: Recipe, accelerator: Any) -> nn.Module:
    """SyncBatchNorm across processes and channels-last memory, as the recipe asks."""
    if recipe.model.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if recipe.model.channels_last and not under_deepspeed(accelerator):
        model = model.to(memory_format=torch.channels_last)
    return model


def unwrapped(accelerator: Any, model: nn.Module) -> nn.Module:
    """The model without its DDP wrapper. ``accelerator.unwrap_model`` would import DeepSpeed
    (1.2 s, and a warning on stdout) whenever it is installed, used or not; it is called only
    under DeepSpeed."""
    if under_deepspeed(accelerator):
        return accelerator.unwrap_model(model)
    from torch.nn.parallel import DistributedDataParallel

    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return inner.module if isinstance(inner, DistributedDataParallel) else model


def model_state(accelerator: Any, model: nn.Module) -> dict[str, Tensor] | None:
    """The trained weights under their plain names; under DeepSpeed a collective (ZeRO-3 gathers
    the shards) that gives None off the main rank."""
    state = accelerator.get_state_dict(model) if under_deepspeed(accelerator) else unwrapped(accelerator, model).state_dict()
    if state is None:
        return None
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}  # torch.compile's wrapper


def prepare_inputs(images: Tensor, dtype: torch.dtype | None, channels_last: bool) -> Tensor:
    if dtype is not None:
        images = images.to(dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """``peak_memory_mb``: the most device memory tensors held during the epoch (CUDA; the
    counter is reset as each epoch starts). Nothing on CPU: there the process's memory is
    in MLflow's system metrics (``system/system_memory_usage_megabytes``)."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
