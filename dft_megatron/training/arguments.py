"""Megatron-LM's command line plus dft_megatron's own flags.

`parse_megatron_args(argv)` is Megatron-LM's `parse_and_validate_args` with DFT plugged in:
Megatron-LM's parser (every one of its flags, with its meaning and default) extended by
`add_dft_arguments` (the loss, the SFT data, the metrics file, --eval-only), then the few
things a DFT user's run needs before Megatron-LM validates it:

- a tokenizer: `--tokenizer-model` defaults to the tokenizer stored with the `--load`
  checkpoint (SAVE/tokenizer, written by the converters and by training), `--tokenizer-type`
  to HuggingFaceTokenizer when there is a tokenizer folder and to NullTokenizer for
  `--mock-data` with `--vocab-size`;
- `--use-checkpoint-args` is implied by a `--load` checkpoint when no model flag was given
  (a converted model needs no model flags: its args are stored in it);
- `--eval-only`: Megatron-LM's `--skip-train` with `--full-validation` (every validation
  sample once);
- refusals of what cannot run here, each one line naming the flag and the fix
  (`refusals`), before Megatron-LM's asserts would give a traceback.

On a machine without a GPU the defaults of the CUDA-only features change (`cpu_defaults`):
gloo, the local layer spec, no persistent layer norm, no gradient-accumulation, RoPE,
bias-activation or masked-softmax fusion, no data-loader worker processes. A flag given on
the command line still wins (and is refused with a reason if it cannot work on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from dft_megatron.checkpoint.paths import has_checkpoint, stored_tokenizer
from dft_megatron.data.config import DATA_FORMATS, TRUNCATION, DataConfig
from dft_megatron.loss.output_layer import DEFAULT_CHUNK_TOKENS
from dft_megatron.loss.weights import LOSS_TYPES, SftMixSchedule, TokenWeighting
from dft_megatron.models.config import FAMILIES
from dft_megatron.utils.flags import add_fields

# DataConfig fields that are Megatron-LM flags already (same meaning): not added again.
_MEGATRON_DATA_FLAGS = {
    "mock_data": "mock_data",
    "data_path": "data_path",
    "split": "split",
    "eod_mask_loss": "eod_mask_loss",
    "tokenizer_model": "tokenizer_model",
    "tokenizer_type": "tokenizer_type",
    "chat_template": "chat_template",
    "data_cache_dir": "data_cache_path",
}

# Model flags whose presence means "the user describes the architecture" (no implied
# --use-checkpoint-args).
_MODEL_FLAGS = ("--num-layers", "--hidden-size", "--num-attention-heads")


STORED_MODEL_ARGS = {
    "layernorm_epsilon": "--norm-epsilon",
    "use_rope_scaling": "--use-rope-scaling",
    "rope_scaling_factor": "--rope-scaling-factor",
    "qk_layernorm": "--qk-layernorm",
    "vocab_size": "--vocab-size",
    "model_family": "--model-family",
}
"""Architecture args a checkpoint stores that Megatron-LM's --use-checkpoint-args does not
restore, with their flags."""

IMPLEMENTATION_ARGS = ("moe_grouped_gemm",)
"""Args Megatron-LM's --use-checkpoint-args forces to the checkpoint's value although they do
not change the weights: grouped GEMM holds the same experts in one module (TEGroupedMLP),
whose checkpoint keys are SequentialMLP's. The command line's value is kept, so a checkpoint
converted on CPU trains with --moe-grouped-gemm on GPUs, and one trained with it loads on CPU."""

NEVER = 1 << 62
"""--eval-interval when none is given: no validation during or after training."""


class ArgumentError(ValueError):
    """A flag or combination that cannot run; the message names the flag and the fix."""


def add_dft_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM `extra_args_provider`: dft_megatron's flags."""
    g = parser.add_argument_group("DFT loss (dft_megatron)")
    g.add_argument(
        "--loss-type",
        choices=LOSS_TYPES,
        default="dft",
        help="dft: cross-entropy weighted by the stop-gradient of the target probability "
        "(Wu et al., 2025); sft: plain cross-entropy, identical to Megatron-LM's; asft: dft plus "
        "--asft-kl-coeff x KL(reference || policy) to a frozen --ref-load model; chord: weight "
        "p(1 - p); eaft: weight (top-k entropy / ln k)^alpha; prob-power: 1 - p^k "
        "(see the README's objectives table)",
    )
    for name, kind, doc in (
        ("dft_min_prob", float, "dft/asft: weight floor c, w = max(p ** alpha, c), in [0, 1]"),
        ("dft_alpha", float, "dft/asft: power on the target probability in the weight, >= 0"),
        ("sft_mix", float, "blend with SFT: L = mix CE + (1 - mix) L_objective, in [0, 1]"),
        ("prob_threshold", float, "tokens with target probability below it get no loss (the "
         "thresholded objectives of Beyond Log Likelihood), in [0, 1)"),
        ("prob_power_k", float, "prob-power: the k of 1 - p^k (1: -p; 10: -p^10), > 0"),
        ("eaft_topk", int, "eaft: the largest logits whose softmax gives the entropy, >= 2"),
        ("eaft_alpha", float, "eaft: power on the normalized top-k entropy, >= 0"),
    ):  # fmt: skip
        default = getattr(TokenWeighting(), name)
        g.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=default,
            help=f"{doc} (default: {default})",
        )
    g.add_argument(
        "--asft-kl-coeff",
        type=float,
        default=None,
        metavar="LAMBDA",
        help=f"asft: the weight of KL(reference || policy) per target token (default: "
        f"{ASFT_KL_COEFF})",
    )
    g.add_argument(
        "--ref-load",
        metavar="DIR",
        default=None,
        help="asft: the frozen reference model's checkpoint (same architecture; it is loaded in "
        "the training layout). Default: the reference the --load checkpoint's run used when it "
        "is an asft run's, else the --load checkpoint itself",
    )
    g.add_argument(
        "--token-weights",
        metavar="FILE",
        default=None,
        help="a JSON table of per-token weights multiplying the objective: by token id, token "
        "string or token class (number, stopword, punctuation, whitespace, special, word); the "
        "general form of the semantic-aware DFT (see the README)",
    )
    g.add_argument(
        "--sft-mix-decay-iters",
        type=int,
        default=None,
        metavar="N",
        help="the SFT -> objective schedule: --sft-mix decays from its value to 0 over the first "
        "N iterations (a weak base learns from SFT first, then the objective takes over)",
    )
    g.add_argument(
        "--sft-mix-decay-style",
        choices=("linear", "cosine"),
        default="linear",
        help="the shape of the --sft-mix-decay-iters schedule (default: linear)",
    )

    g.add_argument(
        "--dft-chunked-output-layer",
        action="store_true",
        help="compute the output layer and the loss together over chunks of "
        "--dft-output-chunk-tokens tokens, forward and backward, so that the [tokens, vocab/TP] "
        "logits never exist whole (one more output-layer GEMM in backward); for large "
        "vocabularies and long sequences, where the logits are the largest activation",
    )
    g.add_argument(
        "--dft-output-chunk-tokens",
        type=int,
        default=DEFAULT_CHUNK_TOKENS,
        metavar="TOKENS",
        help="tokens per chunk of --dft-chunked-output-layer; a chunk holds [TOKENS, vocab/TP] "
        f"logits in the model's dtype (default: {DEFAULT_CHUNK_TOKENS})",
    )
    g.add_argument(
        "--model-family",
        choices=FAMILIES,
        default=None,
        help="the Hugging Face layout of the model (set by the converter and stored in the "
        "checkpoint's args; export infers it from the layout when absent)",
    )

    g = parser.add_argument_group("DFT logging and evaluation (dft_megatron)")
    g.add_argument(
        "--log-metrics-jsonl",
        metavar="PATH",
        default=None,
        help="append one JSON object per logged iteration and per validation to PATH: "
        "loss, CE, mean target p, entropy, p-regime fractions, the p histogram, lr, grad norm",
    )
    g.add_argument(
        "--eval-only",
        action="store_true",
        help="no training: evaluate the --load checkpoint (Megatron-LM's --skip-train); with "
        "SFT data one pass over every validation sample (or every --sft-data sample when no "
        "validation data is given), logged at the checkpoint's iteration",
    )

    g = parser.add_argument_group(
        "SFT data (dft_megatron; with Megatron-LM's --tokenizer-model, --chat-template, "
        "--data-cache-path, --seq-length)"
    )
    add_fields(
        g,
        DataConfig,
        only={f for f in DataConfig.__dataclass_fields__ if f not in _MEGATRON_DATA_FLAGS},
        choices={"data_format": DATA_FORMATS, "truncation": TRUNCATION},
        renamed={"num_workers": "preprocess-workers"},
    )
    g.add_argument(
        "--allow-data-change",
        action="store_true",
        help="resume from a checkpoint although an --sft-data / --valid-data file changed since "
        "it was saved (by default refused, naming the file: the sample order it continues "
        "would be another one)",
    )
    g.add_argument(
        "--train-epochs",
        type=float,
        default=None,
        help="with --sft-data: train this many passes over the training sequences instead "
        "of --train-iters (set to ceil(epochs x sequences / global batch size))",
    )
    return parser


def data_config(args: argparse.Namespace) -> DataConfig:
    """The DataConfig of a parsed command line."""
    values = {f: getattr(args, f) for f in DataConfig.__dataclass_fields__ if hasattr(args, f)}
    for field, dest in _MEGATRON_DATA_FLAGS.items():
        values[field] = getattr(args, dest)
    values["num_workers"] = args.preprocess_workers
    values["tokenizer_type"] = values["tokenizer_type"] or "HuggingFaceTokenizer"
    return DataConfig(**values)


ASFT_KL_COEFF = 0.1
"""--asft-kl-coeff when not given with --loss-type asft."""

_WEIGHTING_FLAGS = (
    "dft_min_prob",
    "dft_alpha",
    "sft_mix",
    "prob_threshold",
    "prob_power_k",
    "eaft_topk",
    "eaft_alpha",
)

_FLAG_OF_FIELD = {name: "--" + name.replace("_", "-") for name in _WEIGHTING_FLAGS}
_FLAG_OF_FIELD["kl_coeff"] = "--asft-kl-coeff"


def token_weighting(args: argparse.Namespace) -> TokenWeighting:
    """The objective the flags describe (`ArgumentError` naming the flag when it cannot be)."""
    kl = args.asft_kl_coeff
    if kl is None:
        kl = ASFT_KL_COEFF if args.loss_type == "asft" else 0.0
    values = {name: getattr(args, name) for name in _WEIGHTING_FLAGS}
    try:
        return TokenWeighting(args.loss_type, **values, kl_coeff=kl)
    except ValueError as e:
        # The field the message names (TokenWeighting's messages name theirs), as its flag.
        flag = next((f for name, f in _FLAG_OF_FIELD.items() if name in str(e)), "--loss-type")
        raise ArgumentError(f"--loss-type {args.loss_type} / {flag}: {e}") from None


def sft_mix_schedule(args: argparse.Namespace) -> SftMixSchedule | None:
    """The --sft-mix-decay-iters schedule, or None."""
    if args.sft_mix_decay_iters is None:
        return None
    try:
        return SftMixSchedule(args.sft_mix, args.sft_mix_decay_iters, args.sft_mix_decay_style)
    except ValueError as e:
        raise ArgumentError(f"--sft-mix-decay-iters: {e}") from None


def on_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("DFT_MEGATRON_CPU") == "1"


def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that cannot load its CUDA libraries
        return False
    return True


def cpu_defaults() -> dict:
    """Defaults that differ from Megatron-LM's on a machine without a GPU."""
    return dict(
        distributed_backend="gloo",
        transformer_impl="local",
        no_persist_layer_norm=True,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_gelu_fusion=False,
        bias_swiglu_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        num_workers=0,
    )


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def refusals(args: argparse.Namespace, training: bool = True) -> list[str]:
    """What cannot run with these flags here, one line each (flag, reason, what to do).
    `training=False` (a conversion session) leaves out the checks of the training data."""
    out = []
    cpu = on_cpu()
    if cpu:
        if args.fp8 is not None:
            out.append(
                f"--fp8-format {args.fp8}: FP8 needs Transformer Engine on a GPU with FP8 tensor "
                "cores (Ada, Hopper, Blackwell); drop it on CPU (FP8 never falls back to bf16)"
            )
        if args.transformer_impl == "transformer_engine":
            out.append(
                "--transformer-impl transformer_engine needs a CUDA GPU; use the default "
                "(local) on CPU"
            )
        if args.distributed_backend == "nccl":
            out.append("--distributed-backend nccl needs GPUs; use gloo on CPU (the default)")
        if args.context_parallel_size > 1:
            out.append(
                f"--context-parallel-size {args.context_parallel_size} needs Transformer "
                "Engine attention on a GPU; Megatron-Core's local attention (CPU) takes 1"
            )
        for flag, on in (
            ("--overlap-grad-reduce", args.overlap_grad_reduce),
            ("--overlap-param-gather", args.overlap_param_gather),
            ("--tp-comm-overlap", args.tp_comm_overlap),
        ):
            if on:
                out.append(f"{flag} overlaps communication on CUDA streams; drop it on CPU")
        if args.profile and not args.use_pytorch_profiler:
            out.append(
                "--profile drives Nsight Systems (CUDA); on CPU add --use-pytorch-profiler "
                "(a torch.profiler trace in --tensorboard-dir) or drop --profile"
            )
        if args.layernorm_zero_centered_gamma:
            out.append(
                "--apply-layernorm-1p (zero-centered gamma) needs Transformer Engine or apex "
                "norms; the local spec's torch norms refuse it: drop it on CPU"
            )
        if getattr(args, "cuda_graph_impl", "none") != "none":
            out.append(f"--cuda-graph-impl {args.cuda_graph_impl} needs CUDA; drop it on CPU")
        backend = getattr(args.attention_backend, "name", str(args.attention_backend))
        if backend in ("flash", "fused", "unfused"):
            out.append(
                f"--attention-backend {backend} is Transformer Engine's (GPU); on CPU use auto "
                "or local (Megatron-Core's attention)"
            )
        if args.moe_grouped_gemm:
            out.append("--moe-grouped-gemm needs Transformer Engine's grouped GEMM; drop it on CPU")
    elif args.fp8 is not None and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        out.append(
            f"--fp8-format {args.fp8} needs a GPU with FP8 tensor cores (compute capability "
            f">= 8.9: Ada, Hopper, Blackwell); this one is {major}.{minor}"
        )
    te_spec = not cpu and args.transformer_impl == "transformer_engine"
    if te_spec and transformer_engine_available():
        out += _te_version_refusals(args)
    elif te_spec:
        out.append(
            "--transformer-impl transformer_engine (Megatron-LM's default) needs Transformer "
            "Engine, which is not importable here: run in the NGC PyTorch container or pass "
            "--transformer-impl local"
        )
    out += _loss_path_refusals(args)
    if args.dist_ckpt_optim_fully_reshardable and args.use_distributed_optimizer:
        out.append(
            "--dist-ckpt-optim-fully-reshardable: Megatron-Core 0.19.2 saves the optimizer state "
            "of parameters past the first end-padded grad bucket from wrong offsets (resumes "
            "corrupt the weights; fixed upstream after 0.19.2, Megatron-LM PR #5077); drop it "
            "(the default dp_reshardable format is exact and reloads at the same TP x PP)"
        )
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        out.append(
            "--overlap-param-gather needs --overlap-grad-reduce (Megatron-LM's rule); add it"
        )
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        out.append("--overlap-param-gather needs --use-distributed-optimizer; add it")
    if not training:
        return out
    if args.lr is None and not args.eval_only:
        out.append("--lr is required (Megatron-LM has no default learning rate); e.g. --lr 1e-5")
    if args.micro_batch_size is None:
        out.append("--micro-batch-size is required (sequences per micro-batch per DP rank)")
    sources = [
        f
        for f, on in (
            ("--sft-data", args.sft_data),
            ("--data-path", args.data_path),
            ("--mock-data", args.mock_data),
        )
        if on
    ]
    if len(sources) > 1:
        out.append(f"{' and '.join(sources)} exclude each other; give one")
    if not sources and not args.eval_only:
        out.append(
            "no training data: give --sft-data FILE (SFT rows), --data-path PREFIX (Megatron "
            "indexed data) or --mock-data (synthetic tokens)"
        )
    if args.sft_data and args.context_parallel_size > 1 and args.packing:
        out.append(
            f"packed SFT sequences are not split over context-parallel ranks "
            f"(--context-parallel-size {args.context_parallel_size}); pass --no-packing"
        )
    if args.train_epochs is not None and not args.sft_data:
        out.append(
            "--train-epochs needs --sft-data (for --data-path and --mock-data give "
            "--train-iters or --train-samples)"
        )
    if args.eval_only and not args.load:
        out.append("--eval-only evaluates a checkpoint: give --load DIR")
    validates = args.eval_interval not in (None, NEVER)
    if args.sft_data and validates and not (args.valid_data or args.valid_fraction):
        out.append(
            "--eval-interval needs validation data: give --valid-data FILE or --valid-fraction F"
        )
    try:
        data_config(args).validate()
    except ValueError as e:
        out.append(str(e))
    try:
        token_weighting(args)
        sft_mix_schedule(args)
    except ArgumentError as e:
        out.append(str(e))
    out += objective_refusals(args)
    return out


def objective_refusals(args: argparse.Namespace) -> list[str]:
    """Combinations of the objective's flags with others that cannot run."""
    out = []
    if args.sft_mix_decay_iters is not None and (args.loss_type == "sft" or args.sft_mix == 0.0):
        out.append(
            "--sft-mix-decay-iters anneals --sft-mix to 0: give --sft-mix > 0 (the start value) "
            "and a --loss-type other than sft"
        )
    if args.token_weights and not Path(args.token_weights).is_file():
        out.append(f"--token-weights {args.token_weights}: no such file")
    if args.loss_type != "asft":
        for flag, value in (("--ref-load", args.ref_load), ("--asft-kl-coeff", args.asft_kl_coeff)):
            if value is not None:
                out.append(f"{flag} applies to --loss-type asft only (here: {args.loss_type})")
        return out
    for flag, on, why in (
        ("--cross-entropy-loss-fusion", args.cross_entropy_loss_fusion, "unfused loss"),
        ("--dft-chunked-output-layer", args.dft_chunked_output_layer, "full logits"),
        ("--mtp-num-layers", bool(getattr(args, "mtp_num_layers", None)), "main head only"),
        (
            "--num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank",
            bool(
                getattr(args, "num_layers_per_virtual_pipeline_stage", None)
                or getattr(args, "num_virtual_stages_per_pipeline_rank", None)
            ),
            "one model chunk per pipeline rank",
        ),
    ):
        if on:
            out.append(
                f"--loss-type asft with {flag}: the reference's KL term runs with the {why} "
                f"(see the README's ASFT section); drop {flag.split(' /')[0]}"
            )
    return out


def _te_version_refusals(args: argparse.Namespace) -> list[str]:
    """What the installed Transformer Engine cannot do with these flags (GPU only; these checks
    have not run here: no GPU with TE was available)."""
    from megatron.core.utils import get_te_version, is_te_min_version

    out = []
    packed = bool(args.sft_data) and args.packing
    if packed and not (args.bf16 or args.fp16) and not is_te_min_version("2.10"):
        out.append(
            f"packed SFT sequences (THD) in fp32: Transformer Engine {get_te_version()} (<= 2.9) "
            "has no fp32 attention backend for them; add --bf16, or --no-packing"
        )
    unsafe = os.environ.get("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE") == "1"
    fp8_delayed = args.fp8 and args.fp8_recipe == "delayed"
    if fp8_delayed and args.load and is_te_min_version("2.18") and not unsafe:
        out.append(
            f"--load with --fp8-recipe delayed: Transformer Engine {get_te_version()} refuses "
            "to unpickle the FP8 scaling state its checkpoints hold; set "
            "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 for checkpoints you trust"
        )
    return out


def _loss_path_refusals(args: argparse.Namespace) -> list[str]:
    out = []
    if args.cross_entropy_loss_fusion and args.cross_entropy_fusion_impl == "te":
        out.append(
            "--cross-entropy-fusion-impl te: Transformer Engine's fused kernel computes plain "
            "cross-entropy only; dft_megatron's fused DFT loss is the native one (torch.compile, "
            "as Megatron-Core's): drop --cross-entropy-fusion-impl or pass native"
        )
    if args.dft_output_chunk_tokens < 1:
        out.append(f"--dft-output-chunk-tokens {args.dft_output_chunk_tokens}: must be >= 1")
    if args.dft_chunked_output_layer:
        for flag, on in (
            ("--mtp-num-layers", bool(getattr(args, "mtp_num_layers", None))),
            ("--use-mup", bool(getattr(args, "use_mup", False))),
        ):
            if on:
                out.append(
                    f"--dft-chunked-output-layer with {flag}: the chunked output layer covers "
                    f"the main head's plain logits only; drop one of the two"
                )
    return out


def layout_refusals(args: argparse.Namespace) -> list[str]:
    """What the model (its flags, or the --load checkpoint's args) and the layout cannot do
    together, checked once the architecture is known; Megatron-Core would fail on every rank
    while building the model, with a traceback."""
    out = []
    tp = args.tensor_model_parallel_size
    heads = args.num_attention_heads
    groups = args.num_query_groups if args.group_query_attention else heads
    if heads and heads % tp:
        out.append(
            f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads ({heads})"
        )
    if groups and groups % tp and tp % groups:
        out.append(
            f"--num-query-groups ({groups}) must be a multiple or a divisor of "
            f"--tensor-model-parallel-size ({tp})"
        )
    if args.num_experts and tp > 1 and not args.sequence_parallel and not args.eval_only:
        # Megatron-Core's MoELayer.forward raises at the first training step on every rank.
        out.append(
            f"a mixture-of-experts model (--num-experts {args.num_experts}) at "
            f"--tensor-model-parallel-size {tp} trains with --sequence-parallel only "
            "(Megatron-Core's rule); add it"
        )
    return out


def _fill_tokenizer(args: argparse.Namespace) -> None:
    if args.tokenizer_model is None:
        stored = stored_tokenizer(args.load)
        if stored is not None:
            args.tokenizer_model = str(stored)
    if args.tokenizer_type is None:
        if args.tokenizer_model is not None:
            args.tokenizer_type = "HuggingFaceTokenizer"
        elif args.vocab_size is not None:
            args.tokenizer_type = "NullTokenizer"


def _read_chat_template(args: argparse.Namespace) -> None:
    """Megatron-LM's --chat-template is the template itself; a path to a file is read too."""
    value = args.chat_template
    if value and "{" not in value and Path(value).is_file():
        args.chat_template = Path(value).read_text(encoding="utf-8")


def _escape_percent_in_help(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM 0.19.2 has help texts with a bare "%" (e.g. "10%)"), which argparse's
    --help formatting rejects (ValueError): escaped, so that --help prints."""
    for action in parser._actions:  # argparse keeps no public list of them
        if action.help and "%" in action.help and "%(" not in action.help:
            action.help = action.help.replace("%", "%%")


def parse_only(argv: list[str], **overrides) -> argparse.Namespace:
    """Megatron-LM's parser with DFT's flags and this machine's defaults, and what the run
    implies before validation (--eval-only, no validation without --eval-interval, implied
    --use-checkpoint-args). No global state is touched."""
    from megatron.training.arguments import parse_args

    def provider(parser):
        _escape_percent_in_help(parser)
        add_dft_arguments(parser)
        # DFT's objective is the global token mean over loss tokens (see training/step.py).
        parser.set_defaults(calculate_per_token_loss=True)
        if on_cpu():
            parser.set_defaults(**cpu_defaults())
        elif not transformer_engine_available():
            parser.set_defaults(transformer_impl="local")
        return parser

    saved = sys.argv
    sys.argv = [saved[0], *argv]  # Megatron-LM's parser reads sys.argv
    try:
        args = parse_args(provider)
    finally:
        sys.argv = saved
    for key, value in overrides.items():
        setattr(args, key, value)
    _read_chat_template(args)
    if args.eval_only:
        # Not Megatron-LM's --full-validation (0.19.2 crashes on a single validation set):
        # the entry sizes --eval-iters to one pass and pads the last batch with no-loss samples.
        args.skip_train = True
        if args.train_iters is None and args.train_samples is None:
            args.train_iters = 0
    elif args.eval_interval is None:
        # Megatron-LM needs an interval to size the validation data; without one there is no
        # validation at all (not even Megatron-LM's --eval-iters batches at the end).
        args.eval_interval, args.eval_iters = NEVER, 0
    if (
        has_checkpoint(args.load)
        and not args.use_checkpoint_args
        and not any(_given(argv, f) for f in _MODEL_FLAGS)
    ):
        args.use_checkpoint_args = True
    return args


def parse_megatron_args(
    argv: list[str] | None = None, training: bool = True, **overrides
) -> argparse.Namespace:
    """Megatron-LM's parse + validate with DFT's flags; sets Megatron-LM's global args.

    `overrides` are set on the args after parsing (before the checkpoint's args and
    validation). Exits with status 2 and one line per problem when the flags cannot run here.
    """
    from megatron.training.arguments import validate_args
    from megatron.training.global_vars import set_global_variables

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_only(argv, **overrides)
    problems = refusals(args, training)
    if problems:
        fail(problems)
    from dft_megatron.training.safeguards import (
        architecture_problems,
        checkpoint_problems,
        resolve_reference,
    )

    problems = checkpoint_problems(args)  # before Megatron-LM reads any of it
    if problems:
        fail(problems)
    if args.use_checkpoint_args:
        from megatron.training.checkpointing import load_args_from_checkpoint

        if not has_checkpoint(args.load):
            fail([f"--use-checkpoint-args: --load {args.load} holds no checkpoint"])
        given = {key: getattr(args, key) for key in IMPLEMENTATION_ARGS}
        loaded = load_args_from_checkpoint(args)
        stored = loaded[1] if isinstance(loaded, tuple) else None
        for key, value in given.items():
            setattr(args, key, value)
        # Megatron-LM's load_args_from_checkpoint leaves these at the command line's values
        # (defaults): a Llama-3.2 or Qwen checkpoint would lose its RoPE scaling and norm
        # epsilon. Restored unless given, with the model's own vocabulary (rows a converted
        # model has beyond its tokenizer's are real) and its Hugging Face family.
        for key, flag in STORED_MODEL_ARGS.items():
            if stored is not None and hasattr(stored, key) and not _given(argv, flag):
                setattr(args, key, getattr(stored, key))
        if not _given(argv, "--tokenizer-model") and stored_tokenizer(args.load) is not None:
            args.tokenizer_model = str(stored_tokenizer(args.load))  # where it is now
    _fill_tokenizer(args)
    problems = layout_refusals(args)
    if problems:
        fail(problems)
    if args.tokenizer_type is None:
        fail(
            [
                "no tokenizer: give --tokenizer-model DIR (a Hugging Face tokenizer folder), "
                "--load a checkpoint that carries one, or --vocab-size N with --mock-data"
            ]
        )
    try:
        validate_args(args, {})
    except AssertionError as e:
        fail([f"Megatron-LM's argument check failed: {_assertion(e)}"])
    set_global_variables(args)  # builds the tokenizer: --padded-vocab-size is known from here
    problems = architecture_problems(args) + resolve_reference(args)
    if problems:
        fail(problems)
    return args


def _assertion(e: AssertionError) -> str:
    """An assert's message, or (Megatron-LM has bare ones) the asserting line itself."""
    import traceback

    frame = traceback.extract_tb(e.__traceback__)[-1]
    where = f"{Path(frame.filename).name}:{frame.lineno}: {frame.line}"
    return f"{e} ({where})" if str(e) else where


def fail(problems: list[str]) -> None:
    """Print every problem on one line (rank 0) and exit with status 2."""
    if int(os.environ.get("RANK", "0")) == 0:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)  # noqa: T201
    raise SystemExit(2)
