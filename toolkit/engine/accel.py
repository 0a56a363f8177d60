"""The one module that imports accelerate (and DeepSpeed): devices, precision, DDP, collectives."""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, set_seed
from torch import nn

from toolkit.core.errors import UserError
from toolkit.core.schema import DeepSpeedConfig, TrainConfig
from toolkit.engine import devices
from toolkit.engine.sums import LaggedSum

logger = logging.getLogger(__name__)

DS_TAG = "pytorch_model"  # the tag (sub-folder) under which accelerate saves DeepSpeed's state


class _DebugLog(io.TextIOBase):
    """A stdout that sends what is printed to the debug log."""

    def write(self, text: str) -> int:
        if text.strip():
            logger.debug("%s", text.rstrip())
        return len(text)


def deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed config the recipe asks for, every value that matters set explicitly."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        # DeepSpeed clips at 1.0 unless told otherwise; 0 turns clipping off.
        "gradient_clipping": train.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": False},
        **({"communication_data_type": ds.grad_comm_dtype} if ds.grad_comm_dtype else {}),
        # The recipe's AdamW with its param groups is the client optimiser, offloaded or not.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class Engine:
    """What the loop needs from accelerate, behind names that say what they do.

    Without a GPU, accelerate does not detect a distributed launch by itself and fails silently
    (every rank believes it is rank 0 of 1, and reductions return sums), so the CPU path asks
    for `cpu=True` and the gloo backend explicitly. The LR scheduler is stepped once per optimiser
    step by the loop (`step_scheduler_with_optimizer=False`); accelerate would otherwise step it
    once per process.

    With DeepSpeed, accelerate needs `cpu=False` (its CPU path never selects DeepSpeed) and a
    process group even for one process. What is saved, when and where is the Checkpointer's
    (`engine/checkpointer.py`); this class only makes the accelerate and DeepSpeed calls.
    """

    def __init__(
        self, train: TrainConfig, deepspeed: DeepSpeedConfig | None, micro_batch: int
    ) -> None:
        # Set-up writes the rank's environment (ours for a lone DeepSpeed process; accelerate's
        # RANK/LOCAL_WORLD_SIZE/ACCELERATE_USE_DEEPSPEED): `abandon` puts it back, so a run in
        # a process that goes on (the demo, a notebook, the tests) leaks no rank into the next
        # run or into the commands it starts.
        self._environ = dict(os.environ)
        try:
            self.accelerator = self._start(train, deepspeed, micro_batch)
        except BaseException:
            self.abandon()  # a failed set-up leaves no group and no rank environment behind
            raise
        self.deepspeed = deepspeed

    @staticmethod
    def _start(
        train: TrainConfig, deepspeed: DeepSpeedConfig | None, micro_batch: int
    ) -> Accelerator:
        """Bind the device, form the process group and return the accelerator over it."""
        if deepspeed is not None:
            _single_process_env()
        # The process's own GPU (LOCAL_RANK mapped to those it sees), or the CPU where it was
        # given none; given GPUs without a working CUDA, it stops here with the cause.
        cpu = devices.bind() == "cpu"
        expected = int(os.environ.get("WORLD_SIZE", "1"))
        handlers = []
        if expected > 1 or deepspeed is not None:  # for one DDP process, naming a backend fails
            backend = "gloo" if cpu else "nccl"
            handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=30)))
        plugin = None
        if deepspeed is not None:
            plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(train, deepspeed, micro_batch))
        accelerator = Accelerator(
            cpu=cpu and deepspeed is None,
            mixed_precision=train.precision,
            gradient_accumulation_steps=train.grad_accum,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=handlers,
            deepspeed_plugin=plugin,
        )
        if accelerator.num_processes != expected:
            raise RuntimeError(
                f"WORLD_SIZE is {expected} but accelerate formed a group of "
                f"{accelerator.num_processes}"
            )
        return accelerator

    # --- who and where -----------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def fused_optimizer(self) -> bool:
        """AdamW's fused kernel: on CUDA, where DeepSpeed does not keep the state on the CPU."""
        offload = self.deepspeed is not None and self.deepspeed.offload_optimizer != "none"
        return self.device.type == "cuda" and not offload

    def seed(self, seed: int, per_rank: bool) -> None:
        """Seed python, numpy and torch: the same on every rank (model init) or per rank."""
        set_seed(seed + (self.rank if per_rank else 0))

    # --- training ------------------------------------------------------------------------------
    def prepare(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        universal: bool = False,
    ) -> tuple[nn.Module, Any, Any]:
        """Wrap for DDP or initialise DeepSpeed. `universal`: the state will come from a
        universal checkpoint (`load_universal`), which DeepSpeed must know at initialisation."""
        if self.deepspeed is not None and universal:
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            config["checkpoint"] = {"load_universal": True}
        return self.accelerator.prepare(model, optimizer, scheduler)

    def check_groups(self, optimizer: Any, expected: list[tuple[str, float, float, int]]) -> None:
        """Stop unless the live optimiser has exactly the recipe's groups: (rule, lr, weight
        decay, parameter count) in order. DeepSpeed has been seen to merge groups, drop empty
        ones or ignore their learning rates; a run must not go on silently wrong."""
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        groups = inner.param_groups
        params = None
        for attr in ("bit16_groups", "fp16_groups", "bf16_groups"):  # ZeRO-1/2, ZeRO-3, bf16
            if getattr(inner, attr, None) is not None:
                params = getattr(inner, attr)
                break
        if params is None:
            params = [g["params"] for g in groups]
        got = [
            (g.get("initial_lr", g["lr"]), g["weight_decay"],
             sum(getattr(p, "ds_numel", p.numel()) for p in ps))
            for g, ps in zip(groups, params, strict=False)
        ]  # fmt: skip
        want = [(lr, wd, n) for _, lr, wd, n in expected]
        if len(groups) != len(params) or got != want:
            table = "; ".join(f"{rule}: lr {lr:g} wd {wd:g} n {n}" for rule, lr, wd, n in expected)
            raise RuntimeError(
                f"optimiser groups after set-up are {got}, but the recipe gives {table}: "
                "refusing to train with different learning rates or weight decays"
            )

    def accumulate(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return self.accelerator.accumulate(model)

    @property
    def sync_gradients(self) -> bool:
        return self.accelerator.sync_gradients

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor | None:
        """Clip the global gradient norm (no clipping when max_norm is None); the norm as a
        tensor on the device, not read (reading it would wait for the step). DeepSpeed clips
        inside its own step (`gradient_clipping`): None here, `grad_norm` after the step."""
        if self.deepspeed is not None:
            return None
        params = [p for p in model.parameters() if p.grad is not None]
        return self.accelerator.clip_grad_norm_(params, max_norm or float("inf"))

    def grad_norm(self, model: nn.Module, norm: torch.Tensor | None) -> float:
        """The last step's global gradient norm as a number (a read: at log steps only)."""
        if self.deepspeed is not None:
            norm = model.get_global_grad_norm()  # DeepSpeed's, cached until its next step
        return float(norm) if norm is not None else float("nan")

    @property
    def _deepspeed_bf16(self) -> bool:
        return self.deepspeed is not None and self.accelerator.mixed_precision == "bf16"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed precision for a forward outside the prepared model (evaluation)."""
        if self._deepspeed_bf16:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
        elif self.deepspeed is not None:
            yield
        else:
            with self.accelerator.autocast():
                yield

    def train_autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the training forward. accelerate autocasts a DDP model's forward
        itself; DeepSpeed's bf16 mode holds bf16 weights and autocasts nothing, so it runs under
        torch's autocast: matrix products in bf16, while inputs, the residuals added to them
        (SR-MAE's bicubic skip), the losses and the norms stay in fp32."""
        return self.autocast() if self._deepspeed_bf16 else contextlib.nullcontext()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    # --- collectives ---------------------------------------------------------------------------
    def all_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over all ranks (every rank must call it)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def start_sum(self, values: torch.Tensor) -> LaggedSum:
        """Start summing a small tensor of this device over all ranks without waiting for it
        (collective: every rank starts the same sums in the same order)."""
        return LaggedSum(values)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj` on every rank (collective)."""
        if not torch.distributed.is_initialized():
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, decide: Callable[[], Any], share: bool = True) -> Any:
        """`decide()` on the main process, for the whole job (collective): its result (`share`:
        on every rank, else on the main process alone), or the user error it raised, raised on
        every rank with the same line (a hold taken by another writer, inputs that do not fit)."""
        result, refusal = None, None
        if self.is_main:
            try:
                result = decide()
            except UserError as err:
                refusal = (type(err), str(err))
        shared = self.broadcast((result if share else None, refusal))
        if shared[1] is not None:
            kind, line = shared[1]
            raise kind(line)
        return shared[0] if share else result

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on the main process, in rank order; None elsewhere (collective)."""
        if not torch.distributed.is_initialized():
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    # --- state on disk -------------------------------------------------------------------------
    def save_state(self, path: Path) -> None:
        """Model, optimiser, scheduler and every rank's RNG state (all ranks call this)."""
        self.accelerator.save_state(str(path))

    def load_state(self, path: Path) -> None:
        self.accelerator.load_state(str(path))

    def rank_files(self, path: Path) -> list[Path]:
        """The files of the state `save_state` wrote at `path` that this rank wrote alone, named
        as accelerate and DeepSpeed name them when they write them: its RNG state and, under
        DeepSpeed, its shards (optimiser state; ZeRO-3: parameters too). The rest of the state
        is the main process's. Nothing is listed or read: a rank need not see the others'."""
        from accelerate.utils.constants import RNG_STATE_NAME

        files = [path / f"{RNG_STATE_NAME}_{self.rank}.pkl"]
        if self.deepspeed is not None:
            ds = self.accelerator.deepspeed_engine_wrapped.engine
            if ds.save_zero_checkpoint:
                files.append(Path(ds._get_zero_ckpt_name(str(path), DS_TAG)))
            if ds.save_non_zero_checkpoint and ds.zero_optimization_partition_weights():
                files.append(Path(ds._get_ckpt_name(str(path), DS_TAG)))  # one per rank
        return files

    def full_state_dict(self, model: nn.Module, checkpoint: Path) -> dict[str, torch.Tensor]:
        """The whole model's weights in fp32 on the CPU, on the main process (collective: every
        rank calls it; the others may get an empty dict).

        Under ZeRO the fp32 master weights are sharded across ranks (and bf16 parameters are
        only a rounded copy), so they are consolidated from `checkpoint`, the one just saved.
        Frozen parameters may be missing or rounded (ZeRO-1, bf16): the caller keeps them.
        """
        if self.deepspeed is not None and self.deepspeed.zero_stage > 0:
            self.barrier()  # every rank's shard of `checkpoint` is on disk
            return zero_weights(checkpoint) if self.is_main else {}
        state = self.accelerator.get_state_dict(model)
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def to_universal(self, checkpoint: Path, out: Path) -> bool:
        """Convert a ZeRO checkpoint into a universal one under `out` (collective: the main
        process converts, on the shared file system). True when it worked; DeepSpeed's error
        is logged otherwise."""
        ok = 1.0
        if self.is_main:
            try:
                to_universal(checkpoint, out)
            except Exception as err:  # DeepSpeed raises assertions and its own errors
                logger.warning("could not convert %s to universal: %r", checkpoint, err)
                shutil.rmtree(out, ignore_errors=True)
                ok = 0.0
        return self.all_sum([ok])[0] == self.world_size

    def load_universal(self, model: nn.Module, universal: Path) -> bool:
        """Load weights and optimiser state (Adam moments included) from a universal checkpoint,
        each rank taking its share for the current number of processes (collective; the model
        must have been prepared with `universal=True`). True when every rank loaded it."""
        ok = 1.0
        try:
            loaded, _ = model.load_checkpoint(str(universal), tag=DS_TAG,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=False)  # fmt: skip
            if loaded is None:  # DeepSpeed found nothing to load, and says so only in its log
                raise FileNotFoundError(f"no DeepSpeed state under {universal / DS_TAG}")
        except Exception as err:  # DeepSpeed raises assertions and its own errors
            logger.error("rank %d could not load %s: %r", self.rank, universal, err)
            ok = 0.0
        return self.all_sum([ok])[0] == self.world_size

    @property
    def shards_optimizer(self) -> bool:
        """True when optimiser state is partitioned across ranks (it cannot follow a change in
        the number of processes without a universal-checkpoint conversion)."""
        return self.deepspeed is not None and self.deepspeed.zero_stage > 0

    def close(self, *objects: Any) -> None:
        """Free the prepared objects and leave the process group in step with the other ranks,
        so no rank exits while another still talks to it."""
        self.accelerator.free_memory(*objects)
        gc.collect()
        self.barrier()
        self.accelerator.end_training()
        self.abandon()

    def abandon(self) -> None:
        """Leave the process group without waiting for the other ranks: after a failure on this
        one, they may never reach a barrier (the launcher ends the job when this rank exits)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        # DeepSpeed caches the groups it made (a clone of the world group among them): drop
        # them, or a later DeepSpeed run in this process meets the destroyed ones.
        release = getattr(
            sys.modules.get("deepspeed.utils.groups"), "_release_process_group_references", None
        )
        if release is not None:
            release(group=None)
        # accelerate keeps process-wide singletons; reset them so another run in this process
        # (the chain of stages of a demo or a test) starts from a clean slate.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        restore_environ(self._environ)


def is_zero_checkpoint(checkpoint: Path) -> bool:
    return (checkpoint / DS_TAG).is_dir()


def zero_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO checkpoint written by any number of processes, gathered from
    its shards (frozen parameters may be missing: ZeRO-1 leaves them out)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(_DebugLog()), contextlib.redirect_stderr(_DebugLog()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def to_universal(checkpoint: Path, out: Path) -> Path:
    """Convert the DeepSpeed state of a checkpoint (written by any number of processes) into
    DeepSpeed's universal layout under `out`: one file per parameter for its fp32 value and
    each Adam moment. Returns the folder of the converted state."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(checkpoint / DS_TAG),
        output_folder=str(out / DS_TAG),
        num_extract_workers=1,  # in this process: no pool of workers to start
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # accelerate's checkpoints lack the tensor/pipeline-parallel layout info the converter
        # asks for; a model with neither needs none.
        inject_missing_state=True,
    )
    # The converter prints its progress and draws progress bars: into the debug log with them.
    with contextlib.redirect_stdout(_DebugLog()), contextlib.redirect_stderr(_DebugLog()):
        ds_to_universal(args)
    return out / DS_TAG


def restore_environ(saved: dict[str, str]) -> None:
    """Make os.environ equal `saved` again, removing what was added since."""
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _single_process_env() -> None:
    """DeepSpeed always wants a process group: give a lone process (the debug run, or a job
    restarted on one GPU) the environment that torchrun would."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
