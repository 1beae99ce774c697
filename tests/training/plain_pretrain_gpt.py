"""Megatron-LM's pretrain_gpt.py in miniature: plain Megatron-Core GPTModel, Megatron-LM's own
loss and per-token reporting, random-token data; nothing of dft_megatron but the CPU bridge
(without which megatron.training does not run on CPU). Its checkpoints are what a plain
Megatron-LM run writes, for tests/training/test_megatron_lm_checkpoint.py.

    torchrun --nproc-per-node 2 tests/training/plain_pretrain_gpt.py [Megatron-LM flags]
"""

from __future__ import annotations

from functools import partial

import torch

# What plain Megatron-LM needs on CPU on its command line (shared/MEGATRON_TRAINING_ON_CPU.md).
CPU_FLAGS = [
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--no-bias-gelu-fusion",
    "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion",
    "--num-workers", "0",
]  # fmt: skip


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_length: int, vocab_size: int, seed: int):
        self.n, self.seq_length, self.vocab_size, self.seed = n, seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + i)
        text = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=gen)
        return {
            "tokens": text[:-1],
            "labels": text[1:],
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
        }


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None):  # fmt: skip
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    config = config or core_transformer_config_from_args(args)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization=args.normalization),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def datasets_provider(num_samples, vp_stage=None):
    from megatron.training import get_args, get_tokenizer

    args = get_args()
    vocab = get_tokenizer().vocab_size
    return RandomTokens(num_samples[0], args.seq_length, vocab, args.seed), None, None


datasets_provider.is_distributed = True


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.float()
    loss = torch.sum(losses.view(-1) * loss_mask.view(-1))
    num_tokens = loss_mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"].float())


def main() -> None:
    from dft_megatron.compat.megatron_training import install_megatron_training_cpu_bridge

    install_megatron_training_cpu_bridge()
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args()  # CPU: pass --distributed-backend gloo etc. (CPU_FLAGS)
    pretrain(
        pretrain_cfg_container_from_args(args),
        datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )


if __name__ == "__main__":
    main()
