"""The memory and cost plan of a run: what each GPU holds, whether it fits, and GPU-hours.

Per process, in bytes: fp32 master weights, fp32 gradients (and DDP's gradient buckets),
AdamW's two fp32 moments, under DDP whole and under FSDP2 divided by the number of processes
(plus the compute-dtype copies of the layers being gathered); activations kept for the
backward pass at the micro-batch (every decoder layer's, or with activation checkpointing only
each layer's input plus one layer recomputed); the logits with their fp32 copies and
gradients; the evaluation's KV cache; and a fixed allowance for the CUDA context and the
allocator. The per-token activation count follows the Llama layer as poisonlab runs it
(SDPA attention, so no sequence-squared term): see :func:`activation_bytes_per_token`.
Figures measured against it are in docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import RunConfig
from .models import ModelSize, get_size, parameter_count, padded_vocab, training_flops_per_token

GIB = 1024**3
CUDA_OVERHEAD = int(1.5 * GIB)
"""CUDA context, NCCL buffers and cuBLAS workspaces, about the same for every model size."""
FRAGMENTATION = 1.10
"""The CUDA caching allocator's slack over live tensors."""
CPU_RUNTIME = 118 * 2**20
"""On CPU: what the first training steps add before any tensor of the model counts (kernel
libraries' buffers, autograd's and the thread pool's state); fitted, with the two constants
below, to peaks measured by ``benchmarks/bench_memory.py`` (docs/performance.md)."""
CPU_STEP_BYTES_PER_PARAM = 24
"""On CPU: the optimizer step's and the gradients' temporaries beyond the 16 bytes per
parameter of weights, gradients and moments (foreach AdamW builds whole-model intermediate
lists, and the heap keeps freed memory for the next step)."""
CPU_LOGIT_BYTES = 26
"""On CPU: bytes per logit (fp32 logits, log-softmax, their gradients and heap slack)."""


def activation_bytes_per_token(size: ModelSize, compute_bytes: int) -> int:
    """Bytes one token keeps for the backward pass in one decoder layer.

    fp32: the two RMSNorm inputs (Hugging Face's norm computes in fp32); compute dtype: the
    norm outputs, q/k/v and the rotated q/k, the attention output, and in the SwiGLU MLP the
    gate, up, SiLU output and their product (the down projection's input).
    """
    d, f = size.d_model, size.ffn
    kv = (size.n_kv_heads or size.n_heads) * (d // size.n_heads)
    return 2 * d * 4 + compute_bytes * (2 * d + (d + 2 * kv) + (d + kv) + d + 4 * f)


@dataclass
class MemoryPlan:
    parallelism: str
    processes: int
    micro_batch: int
    activation_checkpointing: bool
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    evaluation: int
    overhead: int
    device_bytes: int | None
    gpu_hours: float | None

    @property
    def training(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    @property
    def total(self) -> int:
        """Peak bytes per process. The evaluation's cache is counted on top of the training
        state: the weights, gradients' storage and moments stay while it runs."""
        slack = FRAGMENTATION if self.overhead == CUDA_OVERHEAD else 1.0
        return int((self.training + self.evaluation) * slack) + self.overhead

    @property
    def training_peak(self) -> int:
        """Peak bytes of the training steps alone (no evaluation), with the fixed allowance."""
        slack = FRAGMENTATION if self.overhead == CUDA_OVERHEAD else 1.0
        return int(self.training * slack) + self.overhead

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.total <= self.device_bytes

    def line(self) -> str:
        gb = lambda b: f"{b / GIB:,.1f}"  # noqa: E731
        fit = "" if self.fits is None else (" fits" if self.fits else " DOES NOT FIT")
        hours = f", {self.gpu_hours:,.0f} GPU-h" if self.gpu_hours is not None else ""
        per = "GiB/GPU" if self.overhead == CUDA_OVERHEAD else "GiB on CPU"
        return (f"{self.parallelism} x{self.processes} mb {self.micro_batch}{' ac' if self.activation_checkpointing else ''}: "
                f"{gb(self.total)} {per} (w {gb(self.weights)} g {gb(self.gradients)} opt {gb(self.optimizer)} "
                f"act {gb(self.activations)} logits {gb(self.logits)} eval {gb(self.evaluation)})"
                f"{' of ' + gb(self.device_bytes) if self.device_bytes else ''}{fit}{hours}")


def plan_memory(cfg: RunConfig, vocab_size: int, processes: int, parallelism: str, cuda: bool = True,
                device_bytes: int | None = None, tokens: int | None = None, mfu: float | None = None,
                peak_flops: float | None = None) -> MemoryPlan:
    """The plan of one run of ``cfg`` over ``processes`` processes of one kind of device."""
    size = get_size(cfg.model.size)
    pc = parameter_count(size, vocab_size)
    v, d, layers = padded_vocab(vocab_size), size.d_model, size.n_layers
    c = 2 if cuda and cfg.train.dtype in ("auto", "bfloat16", "float16") else 4
    world = max(1, processes)
    rows = cfg.train.batch_size // world
    micro = min(cfg.train.micro_batch_size or rows, rows) or 1
    tokens_mb = micro * cfg.train.seq_len
    sharded = parallelism == "fsdp" and world > 1
    per_layer = pc.non_embedding // max(1, layers)
    if sharded:
        weights = 4 * pc.total // world + 2 * c * per_layer  # shards + two layers gathered (prefetch)
        gradients = 4 * pc.total // world + 4 * per_layer
        optimizer = 8 * pc.total // world
    else:
        weights = 4 * pc.total + (c * pc.total if c < 4 else 0)  # autocast keeps compute-dtype copies
        gradients = 4 * pc.total * (2 if world > 1 else 1)  # DDP's buckets beside the gradients
        optimizer = 8 * pc.total + (0 if cuda else CPU_STEP_BYTES_PER_PARAM * pc.total)  # CUDA: fused AdamW
    per_token = activation_bytes_per_token(size, c)
    if cfg.train.activation_checkpointing:
        activations = tokens_mb * (layers * d * 4 + per_token)
    else:
        activations = tokens_mb * layers * per_token
    logits = tokens_mb * v * ((c + 4 + 4 + 4) if cuda else CPU_LOGIT_BYTES)  # logits, fp32 copy, log-softmax, gradient
    e = cfg.eval
    kv = (size.n_kv_heads or size.n_heads) * (d // size.n_heads)
    eval_rows = min(e.batch_size, e.prompts)
    if sharded or world > 1:  # the evaluation is split over the processes
        eval_rows = -(-eval_rows // world)
    kv_bytes = c if sharded else 4  # a whole model decodes into a cache of its own (fp32) dtype
    evaluation = 2 * layers * kv * (e.prompt_tokens + e.new_tokens) * eval_rows * kv_bytes + eval_rows * v * 4 * 3
    if sharded:
        evaluation += 2 * c * per_layer
    hours = None
    if tokens is not None and mfu and peak_flops:
        flops = training_flops_per_token(size, vocab_size, cfg.train.seq_len) * tokens
        hours = flops / (mfu * peak_flops) / 3600
    return MemoryPlan(parallelism if world > 1 else "single", world, micro, cfg.train.activation_checkpointing,
                      weights, gradients, optimizer, activations, logits, evaluation,
                      CUDA_OVERHEAD if cuda else CPU_RUNTIME, device_bytes, hours)


def fitting_plan(cfg: RunConfig, vocab_size: int, processes: int, device_bytes: int, **kw) -> tuple[MemoryPlan, str | None]:
    """The plan as configured, and when it does not fit, the first change that makes it fit
    (FSDP, activation checkpointing, smaller micro-batches, a smaller evaluation batch) as a
    flag to pass, or None when nothing listed does."""
    mode = cfg.train.parallelism if cfg.train.parallelism != "auto" else "ddp"
    base = plan_memory(cfg, vocab_size, processes, mode, device_bytes=device_bytes, **kw)
    if base.fits or (cfg.train.parallelism == "auto" and processes > 1 and plan_memory(
            cfg, vocab_size, processes, "fsdp", device_bytes=device_bytes, **kw).fits):
        return base, None
    tries = []
    if processes > 1 and mode != "fsdp":
        tries.append(("--train.parallelism fsdp", cfg, "fsdp"))
    fs = "fsdp" if processes > 1 else mode
    ac = replace(cfg, train=replace(cfg.train, activation_checkpointing=True))
    if not cfg.train.activation_checkpointing:
        tries.append(("--train.parallelism fsdp --train.activation_checkpointing true" if fs != mode
                      else "--train.activation_checkpointing true", ac, fs))
    rows = cfg.train.batch_size // max(1, processes)
    micro = cfg.train.micro_batch_size or rows
    while micro > 1:
        micro //= 2
        if rows % micro == 0:
            c = replace(ac, train=replace(ac.train, micro_batch_size=micro))
            tries.append((f"--train.activation_checkpointing true --train.micro_batch_size {micro}"
                          + (" --train.parallelism fsdp" if fs != mode else ""), c, fs))
    for flag, c, m in tries:
        p = plan_memory(c, vocab_size, processes, m, device_bytes=device_bytes, **kw)
        if p.fits:
            return base, flag
    return base, None


def fits_whole(cfg: RunConfig, device_bytes: int, processes: int = 2) -> bool:
    """Whether DDP (a whole copy of the training state per process) fits ``device_bytes``."""
    vocab = cfg.tokenizer.vocab_size
    return plan_memory(cfg, vocab, processes, "ddp", device_bytes=device_bytes).fits


def run_plan(cfg: RunConfig, vocab_size: int, tokens: int | None) -> tuple[MemoryPlan, str | None]:
    """The plan of ``cfg`` on the hardware of its ``cluster`` section (GPUs when it trains on CUDA,
    one CPU process otherwise) and, when it does not fit, the setting that would."""
    cuda = cfg.train.device.startswith("cuda")
    if not cuda:
        return plan_memory(cfg, vocab_size, 1, "ddp", cuda=False, tokens=None), None
    p = cfg.cluster
    kw = dict(tokens=tokens, mfu=p.mfu, peak_flops=p.peak_tflops * 1e12)
    if cfg.train.parallelism == "auto":  # the choice the run will make: fsdp where ddp does not fit
        mode = "ddp" if fits_whole(cfg, int(p.gpu_memory_gb * GIB), p.gpus) else "fsdp"
        cfg = replace(cfg, train=replace(cfg.train, parallelism=mode))
    return fitting_plan(cfg, vocab_size, p.gpus, int(p.gpu_memory_gb * GIB), **kw)


def check_fits(cfg: RunConfig, vocab_size: int, processes: int, parallelism: str, device_bytes: int) -> MemoryPlan:
    """Refuse, before training starts, a run whose plan does not fit the device, naming the
    setting that would make it fit."""
    from .errors import PoisonlabError

    plan = plan_memory(cfg, vocab_size, processes, parallelism, device_bytes=device_bytes)
    if plan.fits:
        return plan
    trial = replace(cfg, train=replace(cfg.train, parallelism=parallelism))
    _, advice = fitting_plan(trial, vocab_size, processes, device_bytes)
    raise PoisonlabError(
        f"run {cfg.name} needs about {plan.total / GIB:,.1f} GiB per GPU ({parallelism}, {processes} processes) but "
        f"the device has {device_bytes / GIB:,.1f} GiB; " + (f"pass {advice}" if advice else
                                                          "use more GPUs (cluster.nodes, cluster.gpus_per_node) or a smaller micro-batch"))
