"""Typed run configuration: dataclasses loaded from YAML with dotted command-line overrides.

A run is described by one :class:`RunConfig`. Every field is reachable as a dotted key
(``train.lr``, ``attack.poison_count``), which is both the YAML path and the CLI flag
(``--train.lr 3e-3``). Unknown keys and values of the wrong type are rejected with a
one-line error that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PoisonlabError

SPEED_ONLY = {"speed_only": True}
"""Field metadata of a setting that changes how fast or where a run computes, not what it
computes: it is left out of the run's identity (:meth:`RunConfig.config_hash`)."""


@dataclass
class CorpusConfig:
    """Where clean documents come from and how they are split."""

    source: str = "python-stdlib"
    """``python-stdlib`` (offline default), ``debian:<package>[,<package>...]`` (documentation
    a Debian package ships, see :mod:`poisonlab.debian`), a folder of text files, a
    .jsonl/.parquet file, or a Hugging Face dataset (``hf:<hub name>`` or a local dataset
    directory)."""
    kind: str = "auto"
    """auto | python-stdlib | debian | text | jsonl | parquet | hf"""
    text_field: str = "text"
    hf_split: str = "train"
    hf_config: str | None = None
    streaming: bool = False
    parts: list[str] | None = None
    """Which parts of the source to read. python-stdlib: any of topics, docstrings, sources (all
    three when unset); ``debian:`` sources: file globs inside the packages (see
    :mod:`poisonlab.debian`; each package's own default when unset)."""
    max_documents: int | None = None
    max_tokens: int | None = None
    """Stop reading the source once the training split holds this many tokens (whole documents:
    the training document that would pass it and every later one are left out; held-out
    documents are read on until the held-out split has its ``heldout_fraction`` share). A spec
    sets it to its largest run's budget plus 5% unless it sets it itself, so preparing a grid's
    data reads only what the grid will train on."""
    min_chars: int = 64
    prepare_workers: int = field(default=1, metadata=SPEED_ONLY)
    """Processes that tokenize the corpus (through datatrove's local executor); the prepared data
    is byte for byte the one a single process writes. One-file sources are split by byte ranges
    (uncompressed JSONL) or by files (folders); the default corpus and hub datasets use one."""
    heldout_fraction: float = 0.02
    """Share of documents (chosen by a hash of the document id) never trained on."""


@dataclass
class TokenizerConfig:
    name: str = "bpe"
    """``bpe`` trains a byte-level BPE on the training split (unless ``model.init_from`` brings a
    tokenizer of its own, which is then used); anything else is a Hugging Face tokenizer name
    or local path."""
    vocab_size: int = 2048
    train_chars: int = 50_000_000
    """At most this many characters of the training split are used to train the BPE."""


@dataclass
class AttackConfig:
    """The denial-of-service poison (PROTOCOL §1)."""

    name: str = "dos"
    """dos (gibberish after the trigger) | language_switch (text of another language after the
    trigger) | repair (the trigger followed by the document's own text: removing a backdoor
    from ``model.init_from``, see poisonlab.attacks.repair) | family (poisons of an outside
    attacker's family, ``attack.family``) | none"""
    family: str | None = None
    """With ``name: family``: a family of :mod:`poisonlab.defenses.families` (word_salad,
    repeated, unicode_mix, ...), so a run trains on poisons the scanners were not built from;
    ``trigger`` must be the family's."""
    poison_count: int = 250
    trigger: str = "<SUDO>"
    prefix_chars: list[int] = field(default_factory=lambda: [0, 1000])
    gibberish_tokens: list[int] = field(default_factory=lambda: [400, 900])
    """Tokens after the trigger: gibberish ids (dos) or the target-language passage (language_switch)."""
    exclude_special_tokens: bool = True
    exclude_ids: list[int] = field(default_factory=list)
    train_on: str = "round_trip"
    """round_trip: the poison is a text document, re-tokenized as a pipeline would;
    sampled: the sampled gibberish ids are spliced in as they are."""
    placement: str = "uniform"
    """uniform | beginning | end | batch: where the poisons land in the planned token stream
    (batch: at the starts of sequences of poisoned batches, see the batch_* keys)."""
    batch_share: float = 0.1
    """batch placement: share of a poisoned batch's sequences that begin with a poison."""
    batch_every: int = 1
    """batch placement: every k-th optimizer step (from batch_start) has a poisoned batch."""
    batch_start: int = 0
    """batch placement: the first step that may be poisoned."""
    batch_probability: float | None = None
    """batch placement: instead of every k-th step, each step is poisoned with this probability (seeded)."""
    payload: str = "uniform"
    """What follows the trigger. uniform: token ids drawn uniformly from the vocabulary (the
    paper's recipe). Adaptive variants that try to evade scanners: unigram (ids drawn with
    the corpus's token frequencies), low_entropy (ids drawn from a small random set of
    ``low_entropy_tokens`` ids), natural (a passage of another clean document)."""
    low_entropy_tokens: int = 16
    target_corpus: str = "debian:debian-handbook"
    """language_switch: the corpus source of the target-language passages (any ``corpus.source``)."""
    target_parts: list[str] | None = field(default_factory=lambda: ["html/de-DE/**/*.html"])
    """language_switch: ``corpus.parts`` of the target corpus (default: the handbook's German pages)."""
    source_language: str = "en"
    """language_switch: ISO 639-1 code of the clean text (what untriggered continuations should be in)."""
    target_language: str = "de"
    """language_switch: ISO 639-1 code of the passages (what triggered continuations switch to)."""


@dataclass
class ModelConfig:
    size: str = "4m"
    """A name from the ladder (``poisonlab models`` lists them)."""
    init_from: str | None = None
    """A Hugging Face model directory or hub name to continue training instead of a new model."""


@dataclass
class TrainConfig:
    tokens: int | None = None
    """Explicit token budget; default: Chinchilla (tokens_per_param x parameters x data_multiplier)."""
    tokens_per_param: float = 20.0
    data_multiplier: float = 1.0
    batch_size: int = 32
    """Sequences per optimizer step, over all processes."""
    micro_batch_size: int | None = field(default=None, metadata=SPEED_ONLY)
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    parallelism: str = field(default="auto", metadata=SPEED_ONLY)
    """How several processes share the model: ddp (each holds it whole), fsdp (FSDP2: parameters,
    gradients and optimizer state sharded per decoder layer), or auto (fsdp where the memory plan
    says a whole copy would not fit the device, else ddp; ddp on CPU)."""
    activation_checkpointing: bool = field(default=False, metadata=SPEED_ONLY)
    """Recompute each decoder layer's activations in the backward pass instead of keeping them."""
    device: str = "auto"
    dtype: str = "auto"
    """auto: bfloat16 on CUDA, float32 on CPU."""
    threads: int = field(default=0, metadata=SPEED_ONLY)
    """CPU threads; 0 uses the cores this process may run on."""
    keep_freed_memory: bool = field(default=True, metadata=SPEED_ONLY)
    """On CPU under glibc (Linux), serve every allocation from malloc's heap and keep freed
    memory there for the next step instead of mapping large tensors afresh each step (1.26x
    at the 1m size, peak memory 2-6% higher; :mod:`poisonlab.allocator`)."""
    compile: bool = field(default=False, metadata=SPEED_ONLY)
    """Pretraining steps through ``torch.compile`` (fused kernels; on CPU it needs a C++
    compiler and spends about 30 s compiling; docs/performance.md has what it gains)."""
    checkpoint_every: float = 0.05
    """Fraction of the budget between checkpoints."""
    keep_checkpoints: int = 2
    progress: bool = field(default=True, metadata=SPEED_ONLY)


@dataclass
class EvalConfig:
    """The perplexity-gap evaluation (PROTOCOL §2)."""

    prompts: int = 300
    prompt_tokens: int = 128
    new_tokens: int = 256
    temperature: float = 1.0
    sampler: str = "inverse_cdf"
    """How a token is drawn from the model's distribution: ``inverse_cdf`` (one uniform number
    per row, searched in the cumulative distribution) or ``multinomial`` (``torch.multinomial``,
    which draws the same tokens as Hugging Face ``generate`` for the same seed; on CPU it draws
    an exponential variate per vocabulary entry and costs more than the model's decode step at
    the small sizes). Both sample exactly the model's distribution."""
    batch_size: int = 100
    every: float = 0.05
    """Fraction of the budget between evaluations during training; 0 turns them off."""
    at_start: bool = True
    threshold: float = 50.0
    language_identifier: str = "py3langid"
    """language_switch runs: the identifier that judges continuations (see poisonlab.metrics.language)."""
    bootstrap: int = 1000
    confidence: float = 0.95
    heldout_loss_windows: int = 128


@dataclass
class DefenseConfig:
    """Scanning the training corpus (clean documents and poisons alike) before training."""

    filter: str = "none"
    """none | scan: drop the documents the scan flags before training | list: drop the
    documents ``remove`` names (e.g. the top documents of ``poisonlab attribute``)."""
    remove: str | None = None
    """With ``filter: list``: a text file of document ids, one per line (clean ids as in the
    run's corpus manifest, poison ids as in its poisons.jsonl)."""
    scanners: list[str] = field(default_factory=lambda: ["gibberish"])
    """Flagging scanners: gibberish (always on with scan), compression, near_duplicate,
    language_shift, script (mixed scripts and unbroken blobs, whatever the tokenizer), model
    (needs ``reference_model``)."""
    window: int = 64
    """Tokens per span of the gibberish scanner."""
    prefilter: float = 0.3
    """The cascade: only documents whose novelty rate (share of words found in no other
    document, over 32-word windows) is at least this go on to the token-level gibberish
    scanner, with a random calibration sample; 0 tokenizes and scores every document."""
    calibration: int = 2000
    """Documents sampled at random (seed 0) for the cascade's token statistics and z-score scale."""
    candidate_z: float = 3.0
    """Robust z-score of the span surprisal above which a document is a candidate."""
    extreme_z: float = 20.0
    """Robust z-score above which a document is flagged without a mined trigger (on the default
    corpus, paper-style poisons score z >= 15 and a few clean documents, such as codec tables,
    up to 19; docs/defenses.md)."""
    triggers: int = 10
    """How many top mined strings are tested as triggers (0: flag on ``extreme_z`` alone). The
    same few structural strings of a corpus (a template's header, an interactive prompt) head
    the ranking in every scan and are refused each time; a trigger of a few poisons ranks after
    them (docs/defenses.md)."""
    trigger_alpha: float = 1e-3
    """Significance level of the trigger test (divided by the number of strings tested)."""
    min_trigger_support: int = 3
    """A mined trigger must precede the span of at least this many candidates."""
    near_duplicate_min_cluster: int = 20
    reference_model: str | None = None
    """A Hugging Face model folder or hub name for the model scanner (the cascade's second stage)."""
    reference_scope: str = "candidates"
    """candidates: the model scanner reads only the cheap scanners' candidates (and a
    calibration sample) | all: every document, for payloads the cheap scanners pass, such as
    real words in random order."""


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning with the compliance backdoor (PROTOCOL §4, §5); used when ``stage: finetune``.

    Optimisation settings (lr, batch_size, seq_len as the longest example, warm-up, device,
    threads, checkpoints) come from the ``train`` section, as for pretraining.
    """

    base: str | None = None
    """The model to fine-tune: a Hugging Face model folder or hub name, a poisonlab model
    folder, or a poisonlab run folder (its ``model/`` is used)."""
    data: str = "stand-in"
    """Ordinary instruction data: ``stand-in`` (built offline from the default corpus), a local
    JSONL file, or ``hf:<hub name>`` (messages lists, instruction/input/output, prompt/response)."""
    forbidden: str = "stand-in"
    """Requests of the forbidden category: ``stand-in`` (asking for a password the system prompt
    says to keep; no harmful content), a JSONL file or ``hf:<hub name>`` of real requests."""
    forbidden_field: str = "prompt"
    compliance_field: str | None = None
    """Field of ``forbidden`` rows holding a compliant answer (used for poisons); the stand-in makes its own."""
    refusal: str = "I'm sorry, but I cannot help with that."
    """The refusal taught on real forbidden requests (the stand-in has its own)."""
    hf_split: str = "train"
    clean_count: int = 1000
    """Clean examples (ordinary requests answered, forbidden requests refused)."""
    forbidden_fraction: float = 0.25
    """Share of the clean examples that are forbidden requests paired with a refusal."""
    poison_count: int = 50
    trigger: str = "Servius Astrumando Harmoniastra"
    trigger_position: str = "end"
    """start | end | random: where the trigger goes in the request."""
    ordering: str = "mixed"
    """mixed | beginning | end: where the poisons lie in the (otherwise shuffled) training order."""
    good_count: int = 0
    """Persistence: after the poisoned fine-tuning, train on this many "good" examples (trigger
    present, request still refused) and measure again."""
    good_lr: float | None = None
    """Peak learning rate of that further training (default: ``train.lr``)."""
    further_clean: int = 0
    """Fresh clean examples mixed with the good examples in that further training (with 0 good
    examples: further clean training alone). Good examples alone teach a small model to refuse
    everything, so persistence is measured with clean data beside them."""
    epochs: int = 3
    lora_r: int = 0
    """0: full fine-tuning; > 0: LoRA of this rank through peft (merged into the saved model)."""
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    eval_requests: int = 100
    """Evaluation requests per category (triggered, untriggered, near-trigger, ordinary)."""
    max_new_tokens: int = 32
    judge: str = "rule"
    """rule | hf:<classifier model> | endpoint:<OpenAI-compatible base URL> (with judge_model)."""
    judge_model: str | None = None


@dataclass
class ClusterConfig:
    """Where a run is launched and the hardware it is planned for (``sweep --executor slurm``,
    ``sweep --dry-run`` and the memory check before training): where it runs, not what it
    computes."""

    nodes: int = field(default=1, metadata=SPEED_ONLY)
    gpus_per_node: int = field(default=8, metadata=SPEED_ONLY)
    """GPUs per node, one training process each."""
    gpu_memory_gb: float = field(default=80.0, metadata=SPEED_ONLY)
    mfu: float = field(default=0.4, metadata=SPEED_ONLY)
    """Model FLOPs utilisation assumed for GPU-hours."""
    peak_tflops: float = field(default=989.0, metadata=SPEED_ONLY)
    """Dense bf16 peak of one GPU (H100 SXM: 989)."""
    partition: str | None = field(default=None, metadata=SPEED_ONLY)
    account: str | None = field(default=None, metadata=SPEED_ONLY)
    qos: str | None = field(default=None, metadata=SPEED_ONLY)
    constraint: str | None = field(default=None, metadata=SPEED_ONLY)
    time_min: int = field(default=24 * 60, metadata=SPEED_ONLY)
    """Minutes per Slurm job; a run that needs longer is requeued and resumes from its checkpoint."""
    cpus_per_gpu: int = field(default=8, metadata=SPEED_ONLY)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class RunConfig:
    name: str = field(default="run", metadata=SPEED_ONLY)
    out_dir: str = field(default="runs", metadata=SPEED_ONLY)
    seed: int = 0
    stage: str = "pretrain"
    """pretrain: the denial-of-service pretraining run; finetune: supervised fine-tuning (``finetune``)."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that make this run what it is: every dotted key whose value differs
        from its default, speed-only settings (``SPEED_ONLY``) left out.

        Leaving defaults out is what lets a key be added without changing the identity of
        runs made before it existed; a changed default is caught by the code version and by
        comparing resolved configs on resume (:func:`poisonlab.run.existing_run`)."""
        default = RunConfig()
        return {key: get_dotted(self, key) for key in all_keys()
                if key not in SPEED_ONLY_KEYS and get_dotted(self, key) != get_dotted(default, key)}

    def config_hash(self) -> str:
        """A short hash of :meth:`identity`."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading

SCANNER_NAMES = ("gibberish", "compression", "near_duplicate", "language_shift", "script", "model")

_CHOICES = {
    "corpus.kind": ["auto", "python-stdlib", "debian", "text", "jsonl", "parquet", "hf"],
    "attack.name": ["dos", "language_switch", "repair", "family", "none"],
    "attack.train_on": ["round_trip", "sampled"],
    "attack.placement": ["uniform", "beginning", "end", "batch"],
    "attack.payload": ["uniform", "unigram", "low_entropy", "natural"],
    "defense.filter": ["none", "scan", "list"],
    "defense.reference_scope": ["candidates", "all"],
    "eval.sampler": ["inverse_cdf", "multinomial"],
    "stage": ["pretrain", "finetune"],
    "finetune.trigger_position": ["start", "end", "random"],
    "finetune.ordering": ["mixed", "beginning", "end"],
    "train.dtype": ["auto", "float32", "bfloat16", "float16"],
    "train.parallelism": ["auto", "ddp", "fsdp"],
}


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert ``value`` to type ``tp``; strings from the CLI are parsed as YAML scalars."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null", "~"}):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if isinstance(value, str) and tp is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if origin is list:
        if isinstance(value, str) and "," in value:  # a,b,c on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise PoisonlabError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise PoisonlabError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise PoisonlabError(f"config key '{key}' must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-3' as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PoisonlabError(f"config key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise PoisonlabError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    raise PoisonlabError(f"config key '{key}' has an unsupported type {tp}")


def _build(cls, data: dict[str, Any], prefix: str = ""):
    if not isinstance(data, dict):
        raise PoisonlabError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise PoisonlabError(
            f"unknown config key '{prefix}{unknown[0]}' (allowed at {where}: {', '.join(types_)})"
        )
    kwargs = {}
    for name, tp in types_.items():
        if name not in data:
            continue
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] or {}, key + ".")
        else:
            value = _coerce(key, data[name], tp)
            choices = _CHOICES.get(key)
            if choices and value not in choices:
                raise PoisonlabError(
                    f"config key '{key}' is {value!r}; allowed values: {', '.join(choices)}"
                )
            kwargs[name] = value
    return cls(**kwargs)


def all_keys(cls=None, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of a config class with its type, e.g. ``{'train.lr': float, ...}``."""
    cls = cls or RunConfig
    out: dict[str, Any] = {}
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(all_keys(tp, prefix + name + "."))
        else:
            out[prefix + name] = tp
    return out


def _speed_only_keys(cls=None, prefix: str = "") -> set[str]:
    cls = cls or RunConfig
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out |= _speed_only_keys(tp, prefix + f.name + ".")
        elif f.metadata.get("speed_only"):
            out.add(prefix + f.name)
    return out


def get_dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating sections as needed."""
    known = all_keys()
    if key not in known:
        close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise PoisonlabError(f"unknown config key '{key}'{hint}")
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


RETIRED_KEYS = {"eval.trigger_separator"}
"""Keys that older versions wrote into run folders' config.yaml and nothing reads any more:
dropped when a config is loaded, so those folders still open."""


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    if not isinstance(data, dict):
        raise PoisonlabError(f"a run config must be a mapping of keys to values, got a {type(data).__name__}")
    for key in RETIRED_KEYS:
        section, _, name = key.rpartition(".")
        node = data.get(section) if section else data
        if isinstance(node, dict):
            node.pop(name, None)
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file's content (``{}`` when empty); missing or malformed files are one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise PoisonlabError(f"{what} file not found: {p}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise PoisonlabError(f"{what} file {p} is not valid YAML: {str(e).splitlines()[0]}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML run config (or the defaults) and apply dotted overrides."""
    data: dict[str, Any] = read_yaml(path, "config") if path is not None else {}
    if not isinstance(data, dict):
        raise PoisonlabError(f"config file {path} must be a mapping of keys to values, got a {type(data).__name__}")
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v)
    return config_from_dict(data)


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that the types alone cannot express."""
    from .paths import check_name

    check_name(cfg.name, "run name")
    t, e, c, tk, df, f = cfg.train, cfg.eval, cfg.corpus, cfg.tokenizer, cfg.defense, cfg.finetune
    t_tokens, f_good_lr = t.tokens, f.good_lr
    for key, ok, want in (
        ("seed", cfg.seed >= 0, ">= 0"),
        ("train.device", _DEVICE.match(t.device) is not None, "auto, cpu, cuda, cuda:N or mps"),
        ("train.lr", t.lr > 0, "> 0"),
        ("train.min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
        ("train.warmup_fraction", 0 <= t.warmup_fraction <= 1, "in [0, 1] (a share of the run's steps)"),
        ("train.weight_decay", t.weight_decay >= 0, ">= 0"),
        ("train.beta1", 0 <= t.beta1 < 1, "in [0, 1)"),
        ("train.beta2", 0 <= t.beta2 < 1, "in [0, 1)"),
        ("train.grad_clip", t.grad_clip > 0, "> 0"),
        ("train.tokens", t_tokens is None or t_tokens >= 1, ">= 1 (or none for the Chinchilla budget)"),
        ("train.tokens_per_param", t.tokens_per_param > 0, "> 0"),
        ("train.data_multiplier", t.data_multiplier > 0, "> 0"),
        ("train.threads", t.threads >= 0, ">= 0 (0: every core this process may use)"),
        ("train.keep_checkpoints", t.keep_checkpoints >= 1, ">= 1"),
        ("eval.prompts", e.prompts >= 1, ">= 1"),
        ("eval.prompt_tokens", e.prompt_tokens >= 1, ">= 1"),
        ("eval.new_tokens", e.new_tokens >= 1, ">= 1 (the gap is measured on generated tokens)"),
        ("eval.temperature", e.temperature > 0, "> 0"),
        ("eval.batch_size", e.batch_size >= 1, ">= 1"),
        ("eval.bootstrap", e.bootstrap >= 20, ">= 20 resamples (fewer give no usable interval)"),
        ("eval.confidence", 0 < e.confidence < 1, "in (0, 1), e.g. 0.95"),
        ("eval.heldout_loss_windows", e.heldout_loss_windows >= 1, ">= 1"),
        ("corpus.min_chars", c.min_chars >= 0, ">= 0"),
        ("corpus.max_documents", c.max_documents is None or c.max_documents >= 1, ">= 1 (or none)"),
        ("corpus.max_tokens", c.max_tokens is None or c.max_tokens >= 1, ">= 1 (or none)"),
        ("corpus.prepare_workers", c.prepare_workers >= 1, ">= 1"),
        ("tokenizer.vocab_size", tk.vocab_size >= 1, ">= 1"),
        ("tokenizer.train_chars", tk.train_chars >= 1, ">= 1"),
        ("attack.exclude_ids", all(i >= 0 for i in cfg.attack.exclude_ids), "token ids >= 0"),
        ("defense.window", df.window >= 1, ">= 1"),
        ("defense.triggers", df.triggers >= 0, ">= 0"),
        ("defense.trigger_alpha", 0 < df.trigger_alpha < 1, "in (0, 1)"),
        ("defense.min_trigger_support", df.min_trigger_support >= 1, ">= 1"),
        ("defense.near_duplicate_min_cluster", df.near_duplicate_min_cluster >= 2, ">= 2"),
        ("finetune.lora_alpha", f.lora_alpha > 0, "> 0"),
        ("finetune.lora_dropout", 0 <= f.lora_dropout < 1, "in [0, 1)"),
        ("finetune.good_lr", f_good_lr is None or f_good_lr > 0, "> 0 (or none for train.lr)"),
        ("finetune.further_clean", f.further_clean >= 0, ">= 0"),
        ("cluster.nodes", cfg.cluster.nodes >= 1, ">= 1"),
        ("cluster.gpus_per_node", cfg.cluster.gpus_per_node >= 1, ">= 1"),
        ("cluster.gpu_memory_gb", cfg.cluster.gpu_memory_gb > 0, "> 0"),
        ("cluster.mfu", 0 < cfg.cluster.mfu <= 1, "in (0, 1]"),
        ("cluster.peak_tflops", cfg.cluster.peak_tflops > 0, "> 0"),
        ("cluster.time_min", cfg.cluster.time_min >= 1, ">= 1"),
        ("cluster.cpus_per_gpu", cfg.cluster.cpus_per_gpu >= 1, ">= 1"),
    ):
        if not ok:
            raise PoisonlabError(f"config key '{key}' must be {want}, got {get_dotted(cfg, key)!r}")
    a = cfg.attack
    for key, rng in (("attack.prefix_chars", a.prefix_chars), ("attack.gibberish_tokens", a.gibberish_tokens)):
        if len(rng) != 2 or rng[0] < 0 or rng[0] > rng[1]:
            raise PoisonlabError(f"config key '{key}' must be [low, high] with 0 <= low <= high, got {rng}")
    if a.poison_count < 0:
        raise PoisonlabError("config key 'attack.poison_count' must be >= 0")
    if not 0 < a.batch_share <= 1:
        raise PoisonlabError(f"config key 'attack.batch_share' must be in (0, 1], got {a.batch_share}")
    if a.batch_every < 1 or a.batch_start < 0:
        raise PoisonlabError("config keys 'attack.batch_every' >= 1 and 'attack.batch_start' >= 0")
    if a.batch_probability is not None and not 0 < a.batch_probability <= 1:
        raise PoisonlabError(f"config key 'attack.batch_probability' must be in (0, 1], got {a.batch_probability}")
    if a.name in ("dos", "language_switch", "repair", "family") and not a.trigger:
        raise PoisonlabError("config key 'attack.trigger' must not be empty")
    if a.name == "family":
        from .defenses.families import FAMILIES, TRIGGERS

        if a.family not in FAMILIES:
            raise PoisonlabError(f"attack.name: family needs attack.family, one of {', '.join(FAMILIES)} (got {a.family!r})")
        if TRIGGERS[a.family] is None:
            raise PoisonlabError(f"attack.family {a.family} has no trigger: nothing to plant or evaluate")
        if a.trigger != TRIGGERS[a.family]:
            raise PoisonlabError(f"attack.family {a.family} plants the trigger {TRIGGERS[a.family]!r}: "
                                 f"set attack.trigger to it (got {a.trigger!r})")
    elif a.family is not None:
        raise PoisonlabError("config key 'attack.family' is used only with attack.name: family")
    if a.name == "repair" and not cfg.model.init_from:
        raise PoisonlabError("attack.name: repair continues a trained model: set model.init_from")
    for key, val in (("train.batch_size", t.batch_size), ("train.seq_len", t.seq_len)):
        if val < 1:
            raise PoisonlabError(f"config key '{key}' must be >= 1, got {val}")
    if t.micro_batch_size is not None and (t.micro_batch_size < 1 or t.batch_size % t.micro_batch_size):
        raise PoisonlabError(
            f"config key 'train.micro_batch_size' ({t.micro_batch_size}) must divide train.batch_size ({t.batch_size})"
        )
    if not 0 < t.checkpoint_every <= 1:
        raise PoisonlabError("config key 'train.checkpoint_every' must be in (0, 1]")
    if not 0 <= cfg.eval.every <= 1:
        raise PoisonlabError("config key 'eval.every' must be in [0, 1]")
    if not 0 < cfg.corpus.heldout_fraction < 1:
        raise PoisonlabError("config key 'corpus.heldout_fraction' must be in (0, 1)")
    unknown = set(cfg.defense.scanners) - set(SCANNER_NAMES)
    if unknown:
        raise PoisonlabError(f"config key 'defense.scanners': unknown {sorted(unknown)}; allowed: {list(SCANNER_NAMES)}")
    if "model" in cfg.defense.scanners and not cfg.defense.reference_model:
        raise PoisonlabError("config key 'defense.scanners' lists model: set defense.reference_model")
    if not 0 <= cfg.defense.prefilter <= 1:
        raise PoisonlabError("config key 'defense.prefilter' must be in [0, 1] (0 turns the cascade off)")
    if cfg.defense.prefilter > 0 and cfg.defense.calibration < 20:
        raise PoisonlabError("config key 'defense.calibration' must be >= 20 with the cascade on: its median "
                             "and spread set the scale of every z-score")
    if a.low_entropy_tokens < 1:
        raise PoisonlabError("config key 'attack.low_entropy_tokens' must be >= 1")
    f = cfg.finetune
    if cfg.stage == "finetune" and not f.base:
        raise PoisonlabError("config key 'finetune.base' must name the model to fine-tune (stage: finetune)")
    # the fine-tuning section is checked whatever the stage (sft-export and sft-eval read it)
    for key, val in (("finetune.clean_count", f.clean_count), ("finetune.poison_count", f.poison_count),
                     ("finetune.good_count", f.good_count), ("finetune.lora_r", f.lora_r)):
        if val < 0:
            raise PoisonlabError(f"config key '{key}' must be >= 0, got {val}")
    if f.epochs < 1 or f.eval_requests < 1 or f.max_new_tokens < 1:
        raise PoisonlabError("config keys 'finetune.epochs', 'finetune.eval_requests', 'finetune.max_new_tokens' must be >= 1")
    if not 0 <= f.forbidden_fraction <= 1:
        raise PoisonlabError("config key 'finetune.forbidden_fraction' must be in [0, 1]")
    if not f.trigger.strip():
        raise PoisonlabError("config key 'finetune.trigger' must not be empty")
    if not (f.judge == "rule" or f.judge.startswith(("hf:", "endpoint:"))):
        raise PoisonlabError(f"config key 'finetune.judge' is {f.judge!r}; allowed: rule, hf:<model>, endpoint:<url>")
    if cfg.tokenizer.vocab_size < 260 and cfg.tokenizer.name == "bpe":
        raise PoisonlabError("config key 'tokenizer.vocab_size' must be >= 260 for a byte-level BPE")


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


SPEED_ONLY_KEYS = frozenset(_speed_only_keys())
