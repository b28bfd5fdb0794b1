"""The training loop: one CPU process or N ranks under `torchrun` (FSDP2), the same code and command.

- AdamW (decoupled weight decay on Linear weights only: none on biases, LayerNorms, embeddings),
  linear warm-up then cosine decay, gradient accumulation, clipping, bf16 autocast, optional
  activation checkpointing.
- Windows of the packed token file are a pure function of (seed, step) and the global batch is split
  over ranks, so 1 process and N processes see the same data, and a resumed run continues exactly.
- Checkpoints (torch.distributed.checkpoint, sharded per rank) go to out/checkpoints/step-N; the file
  out/checkpoints/latest is replaced atomically only once a checkpoint is complete, so a crash at any
  moment leaves the last good one.
- out/metrics.jsonl has one line per step and per validation; at the end the model is exported in
  Hugging Face format (loads in neolm and transformers) and the loss curves are drawn to out/loss.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neolm import checkpoint
from neolm.errors import NeolmError
from neolm.model import GPT
from neolm.tokenizer import Tokenizer
from neolm.train.data import TokenData
from neolm.train.presets import preset

log = logging.getLogger(__name__)


@dataclass
class TrainArgs:
    data: str  # a folder written by `neolm prepare-data`
    out: str  # run folder: checkpoints, metrics, export
    preset: str | None = None  # fresh weights of this architecture...
    init: str | None = None  # ...or fine-tune this model (folder or hub id)
    seq_len: int = 256
    micro_batch_size: int = 8  # windows per rank per forward
    grad_accum: int = 1  # global batch = micro_batch_size * grad_accum * world size
    max_steps: int = 1000
    lr: float = 6e-4
    min_lr: float | None = None  # default lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0  # 0 disables
    precision: str = "bf16"  # bf16 autocast, or fp32
    activation_checkpointing: bool = False
    eval_every: int = 100
    eval_windows: int = 64
    save_every: int = 200
    keep: int = 2  # checkpoints kept
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    export: str | None = None  # default out/final
    export_dtype: str = "float32"
    plot: bool = True
    device: str | None = None
    progress: bool = True
    # LoRA (neolm.train.lora): with lora_r > 0 the model's weights stay frozen and each block's lora_targets learn
    # a rank-r update scaled by lora_alpha / lora_r; the export merges it into the weights
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "qkv,proj,fc,out"
    quantize: str | None = None  # QLoRA: the frozen weights held as int8 or int4 (codes: whole on every rank)

    def validate(self) -> None:
        if (self.preset is None) == (self.init is None):
            raise NeolmError("give exactly one of --preset (train from scratch) or --init (fine-tune a model)")
        for name in ("seq_len", "micro_batch_size", "grad_accum", "max_steps", "eval_windows", "save_every", "keep"):
            if getattr(self, name) < 1:
                raise NeolmError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup < 0 or self.weight_decay < 0 or self.clip < 0:
            raise NeolmError("lr must be > 0; warmup, weight decay and clip must be >= 0")
        if self.precision not in ("bf16", "fp32"):
            raise NeolmError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.export_dtype not in ("float32", "bfloat16", "float16"):
            raise NeolmError(f"export dtype must be float32, bfloat16 or float16, got {self.export_dtype!r}")
        if self.lora_r:
            from neolm.train.lora import parse_targets

            if self.lora_r < 0 or self.preset is not None:
                raise NeolmError("LoRA (--lora-r > 0) fine-tunes a model: give --init, not --preset")
            if self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
                raise NeolmError("--lora-alpha must be > 0 and --lora-dropout in [0, 1)")
            parse_targets(self.lora_targets)
        if self.quantize is not None and not self.lora_r:
            raise NeolmError("--quantize trains LoRA updates over quantized frozen weights (QLoRA): give --lora-r too")
        if self.quantize is not None:
            from neolm.quant.linear import parse_quantize

            parse_quantize(self.quantize)


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warm-up to lr over `warmup` steps, then cosine decay to min_lr at max_steps (step from 0)."""
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    return min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weights of Linear layers only; biases, LayerNorms and embeddings are not decayed."""
    decay, seen = [], set()
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            decay.append(module.weight)
    decay_ids = {id(p) for p in decay}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = [p for p in decay if id(p) not in embeddings]  # a tied lm_head is the embedding
    no_decay = []
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) not in decay_ids or id(p) in embeddings:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # (LoRA: no Linear weight trains; an empty group would not resume)


def init_fresh(model: GPT, seed: int, std: float = 0.02) -> None:
    """GPT-2 style initialisation; residual output projections scaled by 1/sqrt(2 * layers)."""
    torch.manual_seed(seed)
    model.init_weights(std)
    for block in model.blocks:
        for proj in (block.attn.proj, block.mlp.proj):
            nn.init.normal_(proj.weight, std=std / math.sqrt(2 * model.config.n_layer))


class Run:
    """One training run: its process group, model, optimizer, data and files."""

    def __init__(self, args: TrainArgs):
        args.validate()
        self.args = args
        self.out = Path(args.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.rank, self.world, self.device = _setup_distributed(args.device)
        self.data = TokenData(args.data)
        self.model, self.tokenizer = self._build_model()
        self.config = self.model.config
        if args.seq_len > self.config.n_positions:
            raise NeolmError(f"--seq-len {args.seq_len} exceeds the model's context of {self.config.n_positions}")
        self.data.check(args.seq_len, self.config.vocab_size)
        self._check_out_dir()
        self.model.gradient_checkpointing = args.activation_checkpointing
        self._shard()
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, args.weight_decay), lr=args.lr, betas=args.betas, eps=1e-8
        )
        self.step = 0
        self.tokens_seen = 0
        if args.resume:
            self._load_latest()

    # ---- set-up -------------------------------------------------------------------------------
    def _build_model(self) -> tuple[GPT, Tokenizer]:
        args = self.args
        if args.preset:
            config = preset(args.preset)
            model = GPT(config)
            init_fresh(model, args.seed)
            tokenizer = Tokenizer.builtin(config.tokenizer)
        else:
            import neolm

            # native=False: training runs in torch, and a native decode step would keep the weights it points
            # into alive after the copy below (a second copy of the model in memory)
            lm = neolm.load(args.init, dtype="float32", device="cpu", quantize=args.quantize, native=False)
            model, tokenizer = lm.model, lm.tokenizer
            if args.quantize is None:  # (quantized codes are the process's own already)
                model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)  # own memory
                model.tie_weights()
        model.requires_grad_(True).train()
        if args.lora_r:
            from neolm.train.lora import add_lora

            torch.manual_seed(args.seed)  # the updates' initial A
            trainable = add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
            log.info("LoRA rank %d on %s: %s trainable parameters of %s", args.lora_r, args.lora_targets,
                     f"{trainable:,}", f"{model.config.n_params():,}")  # fmt: skip
        return model.to(self.device), tokenizer

    def _check_out_dir(self) -> None:
        latest = self.ckpt_dir / "latest"
        if self.args.resume:
            if not latest.exists():
                raise NeolmError(f"nothing to resume: {latest} does not exist")
            saved = json.loads((self.out / "config.json").read_text())
            mine = self.config.to_hf()
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            if diff:
                raise NeolmError(
                    f"{self.out} holds a run of another architecture (differs in {', '.join(diff)}); "
                    "resume it with its own preset, or start a new run in another folder"
                )
            before = json.loads((self.out / "train_args.json").read_text())
            lora = [k for k in ("lora_r", "lora_alpha", "lora_targets") if before.get(k) != getattr(self.args, k)]
            if before.get("lora_r", 0) == self.args.lora_r == 0:
                lora = []
            if lora:
                raise NeolmError(f"{self.out} holds a run with other LoRA settings ({', '.join(lora)}: "
                                 f"{', '.join(str(before.get(k)) for k in lora)}); resume it with them")  # fmt: skip
        elif latest.exists() and not self.args.overwrite:
            raise NeolmError(f"{self.out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self.args.resume:
                shutil.rmtree(self.ckpt_dir, ignore_errors=True)
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            _atomic_write(self.out / "config.json", json.dumps(self.config.to_hf(), indent=2))
            _atomic_write(self.out / "train_args.json", json.dumps(dataclasses.asdict(self.args), indent=2))
        _barrier()

    def _shard(self) -> None:
        if self.world == 1:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        for block in self.model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(self.model, mp_policy=policy)

    # ---- training -----------------------------------------------------------------------------
    def autocast(self):
        if self.args.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of windows (B, T + 1)."""
        windows = windows.to(self.device)
        with self.autocast():
            logits = self.model(windows[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns its mean loss (same on every rank)."""
        args = self.args
        per_rank = args.micro_batch_size * args.grad_accum
        batch = self.data.train_batch(args.seed, self.step, per_rank * self.world, args.seq_len)
        batch = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        lr = lr_at(self.step, args)
        torch.manual_seed(args.seed * 1_000_003 + self.step * self.world + self.rank)  # dropout: the same on resume
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in batch.split(args.micro_batch_size):
            loss = self.loss(micro) / args.grad_accum
            loss.backward()
            total += loss.detach()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += per_rank * self.world * args.seq_len
        return _mean_over_ranks(total, self.world)

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean loss over fixed validation windows (None when the data has no validation split)."""
        args = self.args
        windows = self.data.val_windows(args.seq_len, args.eval_windows)
        usable = len(windows) // self.world * self.world  # every rank runs the same number of forwards
        if usable == 0:
            return None
        mine = windows[:usable][self.rank :: self.world]
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for chunk in mine.split(args.micro_batch_size):
            total += self.loss(chunk) * len(chunk)
        self.model.train()
        return _mean_over_ranks(total, self.world) / len(mine)

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        target = self.ckpt_dir / f"step-{self.step:08d}"
        if self.rank == 0 and target.exists():
            shutil.rmtree(target)
        _barrier()
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        with warnings.catch_warnings():  # "assuming ... a single process" when not under torchrun
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=target)
        if self.rank == 0:
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world}
            _atomic_write(target / "trainer.json", json.dumps(state))
            _atomic_write(self.ckpt_dir / "latest", target.name)  # the checkpoint counts from here on
            steps = sorted(p for p in self.ckpt_dir.glob("step-*") if p.is_dir() and p != target)
            for old in steps[: max(0, len(steps) - (self.args.keep - 1))]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return target

    def _load_latest(self) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        source = self.ckpt_dir / (self.ckpt_dir / "latest").read_text().strip()
        trainer = json.loads((source / "trainer.json").read_text())
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=source)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.step, self.tokens_seen = trainer["step"], trainer["tokens_seen"]
        if self.rank == 0:  # drop metrics written after the checkpoint, so the log reads as one run
            metrics = self.out / "metrics.jsonl"
            if metrics.exists():
                kept = [line for line in metrics.read_text().splitlines() if _step_of(line) <= self.step]
                _atomic_write(metrics, "".join(line + "\n" for line in kept))
        log.info("resumed from %s at step %d", source, self.step)

    def export(self, folder: Path) -> Path:
        """The model in Hugging Face format, with its tokenizer (rank 0 writes)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            plain = self._plain_model({k: v.detach().cpu() for k, v in full.items()}, folder)
            checkpoint.save_checkpoint(plain, folder, dtype=getattr(torch, self.args.export_dtype))
            self.tokenizer.save(folder)
        _barrier()
        return folder

    def _plain_model(self, full: dict[str, torch.Tensor], folder: Path) -> GPT:
        """The model to export from its full state dict: as trained; with LoRA, the updates are first written on
        their own for PEFT (folder-adapter), then merged into the weights (for QLoRA: into the float weights the
        codes were made from, not into the codes)."""
        args = self.args
        if not args.lora_r:
            return checkpoint.build_model(self.config, full)
        from neolm.adapter import write_lora_adapter
        from neolm.train.lora import merged_state_dict

        adapter = write_lora_adapter(full, self.config, folder.parent / (folder.name + "-adapter"), args.lora_r,
                                     args.lora_alpha, args.lora_dropout, args.init)  # fmt: skip
        if args.quantize is not None:
            import neolm

            return neolm.load(args.init, dtype="float32", device="cpu", adapter=adapter, native=False).model
        return checkpoint.build_model(self.config, merged_state_dict(full, args.lora_alpha / args.lora_r))


# ---- the loop ---------------------------------------------------------------------------------
def train(args: TrainArgs) -> dict:
    """Run (or resume) training; returns a summary (final losses, export folder)."""
    from tqdm.auto import tqdm

    run = Run(args)
    main = run.rank == 0
    metrics = open(run.out / "metrics.jsonl", "a") if main else None
    tokens_per_step = args.micro_batch_size * args.grad_accum * run.world * args.seq_len
    bar = tqdm(total=args.max_steps, initial=run.step, disable=not (main and args.progress), unit="step",
               dynamic_ncols=True)  # fmt: skip
    last_loss = val_loss = None
    try:
        while run.step < args.max_steps:
            started = time.perf_counter()
            try:
                last_loss = run.train_step()
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
                if "memory" not in str(e).lower() and not isinstance(e, (torch.OutOfMemoryError, MemoryError)):
                    raise
                raise NeolmError(
                    "the batch does not fit in memory: lower --micro-batch-size or --seq-len "
                    "(raise --grad-accum to keep the global batch), or use --activation-checkpointing"
                ) from None
            seconds = time.perf_counter() - started
            record = {"step": run.step, "loss": round(last_loss, 6), "lr": lr_at(run.step - 1, args),
                      "tokens": run.tokens_seen, "tokens_per_second": round(tokens_per_step / seconds)}  # fmt: skip
            if run.step % args.eval_every == 0 or run.step == args.max_steps:
                val_loss = run.validate()
                if val_loss is not None:
                    record |= {"val_loss": round(val_loss, 6), "val_ppl": round(math.exp(min(val_loss, 50)), 3)}
            if main:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{record['lr']:.2e}", tok_s=record["tokens_per_second"],
                                **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))  # fmt: skip
                bar.update(1)
            if run.step % args.save_every == 0 or run.step == args.max_steps:
                run.save()
    finally:
        bar.close()
        if metrics:
            metrics.close()
    export = run.export(Path(args.export) if args.export else run.out / "final")
    summary = {"step": run.step, "loss": last_loss, "val_loss": val_loss, "export": str(export)}
    if args.lora_r:
        summary["adapter"] = str(export.parent / (export.name + "-adapter"))  # (written by Run._plain_model)
    if main and args.plot:
        from neolm.train.plot import plot_metrics

        summary["plot"] = plot_metrics(run.out / "metrics.jsonl", run.out / "loss.png")
    _teardown_distributed()
    return summary


# ---- helpers ----------------------------------------------------------------------------------
def _setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device): torchrun's environment when present, else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if use_cuda else "cpu")


def _teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line cut short (a crash while writing it), so that a
    resume drops it."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
