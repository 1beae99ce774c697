"""What the conversion refuses, and why; all before any weight is read (no process group).

Each case names its reason in the error: an unsupported architecture names the supported
ones; a config the mapping cannot express (sliding window, unknown RoPE scaling, biases,
router jitter, shared experts, an MoE model without expert layers) says which setting; an
export of a model whose MoE layout or routing no HF family has names the flag; a missing,
mis-shaped or unknown tensor names the tensor; a non-empty output folder asks for --force;
an export names what a folder that is not a (complete) Megatron-LM save directory holds.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dft_megatron.convert.common import prepare_output
from dft_megatron.convert.families import (
    ConversionError,
    check_coverage,
    hf_to_model_config,
    model_config_to_hf,
    tensor_maps,
)
from dft_megatron.convert.hf_to_megatron import plan_import
from dft_megatron.convert.megatron_to_hf import (
    load_flags,
    parse_size,
    resolve_checkpoint,
    shard_plan,
)
from dft_megatron.models import ModelConfig
from tests.convert.hf_models import hf_config


def test_unsupported_architecture_names_the_supported_ones():
    import transformers

    cfg = transformers.GPT2Config(architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConversionError, match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        hf_to_model_config(cfg)


@pytest.mark.parametrize(
    "family, change, reason",
    [
        ("mistral", {"sliding_window": 4096}, r"sliding-window attention \(sliding_window=4096"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 64}, "sliding-window"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            "RoPE scaling type 'yarn'",
        ),
        (
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 5e5,
                    "factor": 8.0,
                    "low_freq_factor": 2.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
            },
            "low_freq_factor=2.0",
        ),
        ("llama", {"attention_bias": True}, r"biases \(attention_bias=True"),
        ("llama", {"mlp_bias": True}, "mlp_bias=True"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ("qwen3", {"attention_bias": True}, r"biases \(attention_bias=True"),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 64}, "sliding-window"),
        ("mixtral", {"sliding_window": 4096}, r"sliding-window attention \(sliding_window=4096"),
        ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise 0.1.*--moe-input-jitter"),
        ("qwen3_moe", {"mlp_only_layers": [0, 1]}, "no layer has experts"),
        ("qwen3_moe", {"decoder_sparse_step": 4}, "no layer has experts"),
        ("qwen3_moe", {"num_experts": 0}, "without experts"),
        ("qwen3_moe", {"shared_expert_intermediate_size": 64}, "shared experts"),
    ],
)
def test_inexpressible_config_is_refused(family, change, reason):
    cfg = hf_config(family)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    for key, value in change.items():
        setattr(cfg, key, value)
    with pytest.raises(ConversionError, match=reason):
        hf_to_model_config(cfg)


def test_supported_configs_map():
    for family in ("llama", "mistral", "qwen2"):
        cfg = hf_config(family)
        cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
        if family == "qwen2":  # as Qwen2.5's hub configs: a window that is switched off
            cfg.sliding_window = 131072
        model = hf_to_model_config(
            cfg, make_vocab_size_divisible_by=32, tensor_model_parallel_size=2
        )
        assert (model.family, model.vocab_size, model.padded_vocab_size) == (family, 96, 128)
        assert model.add_qkv_bias == (family == "qwen2")
        assert model.untie_embeddings_and_output_weights == (family != "qwen2")
        assert model.rope_scaling == (family == "llama") and model.rope_scaling_factor == (
            32.0 if family == "llama" else 8.0
        )
        # ... and back: the same architecture.
        back = model_config_to_hf(model)
        for key in ("vocab_size", "num_key_value_heads", "tie_word_embeddings"):
            assert getattr(back, key) == getattr(cfg, key), key
        assert back.rope_parameters == cfg.rope_parameters


def test_qwen3_and_moe_configs_map():
    """Qwen3's q/k norms and head dimension; Qwen3-MoE's experts, dense layers and routing;
    Mixtral's experts in every layer with renormalized top-k probabilities; and back."""
    qwen3, qwen3_moe, mixtral = (_model(f) for f in ("qwen3", "qwen3_moe", "mixtral"))
    assert qwen3.qk_layernorm and qwen3.kv_channels == 32 and not qwen3.num_experts
    assert not qwen3.untie_embeddings_and_output_weights
    assert qwen3_moe.qk_layernorm and not mixtral.qk_layernorm
    assert (qwen3_moe.num_experts, qwen3_moe.moe_router_topk, qwen3_moe.moe_ffn_hidden_size) == (
        4, 2, 32,
    )  # fmt: skip
    assert qwen3_moe.moe_layer_freq == [0, 1] and qwen3_moe.moe_layers() == [False, True]
    assert qwen3_moe.moe_router_pre_softmax  # norm_topk_prob false
    assert (mixtral.num_experts, mixtral.moe_ffn_hidden_size, mixtral.moe_layer_freq) == (4, 48, 1)
    assert not mixtral.moe_router_pre_softmax
    for family, model in (("qwen3", qwen3), ("qwen3_moe", qwen3_moe), ("mixtral", mixtral)):
        cfg, back = hf_config(family), model_config_to_hf(model)
        assert type(back) is type(cfg)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        assert back.head_dim == head_dim, family  # Mixtral's config may leave it implied
        keys = ["num_key_value_heads", "tie_word_embeddings", "intermediate_size"]
        keys += {
            "qwen3": [],
            "qwen3_moe": ["num_experts", "num_experts_per_tok", "moe_intermediate_size",
                          "norm_topk_prob", "mlp_only_layers", "decoder_sparse_step"],
            "mixtral": ["num_local_experts", "num_experts_per_tok", "sliding_window"],
        }[family]  # fmt: skip
        for key in keys:
            assert getattr(back, key) == getattr(cfg, key), (family, key)
    # A checkpoint's flags carry the MoE layout: the dense layers as a per-layer pattern.
    from dft_megatron.checkpoint import model_flags

    flags = model_flags(qwen3_moe)
    for flag in (
        "--qk-layernorm",
        "--num-experts=4",
        "--moe-router-topk=2",
        "--moe-ffn-hidden-size=32",
        "--moe-layer-freq=[0,1]",
        "--moe-router-pre-softmax",
    ):
        assert flag in flags, flag  # fmt: skip
    assert "--moe-layer-freq=1" in model_flags(mixtral)


def test_export_refuses_moe_layouts_no_hf_family_has():
    """Mixtral has experts in every layer and renormalizes; dense families have no experts;
    a checkpoint trained with routing no HF family has (sigmoid scores, expert bias, shared
    experts) is refused with the flag."""
    import argparse

    from dft_megatron.convert.families import moe_args_problems

    for family, field, value, reason in [
        ("mixtral", "moe_layer_freq", [0, 1], "experts in every layer.*moe-layer-freq"),
        ("mixtral", "moe_router_pre_softmax", True, "renormalizes.*--moe-router-pre-softmax"),
        ("qwen3", "num_experts", 4, "qwen3 model has no experts"),
        ("qwen3_moe", "num_experts", None, "qwen3_moe model needs experts"),
    ]:
        model = _model(family)
        setattr(model, field, value)
        with pytest.raises(ConversionError, match=reason):
            model_config_to_hf(model)

    plain = dict(num_experts=4, moe_router_score_function="softmax")
    assert moe_args_problems(argparse.Namespace(**plain)) == []
    assert (
        moe_args_problems(argparse.Namespace(num_experts=None, moe_router_score_function="x")) == []
    )
    for change, named in [
        ({"moe_router_score_function": "sigmoid"}, "--moe-router-score-function 'sigmoid'"),
        ({"moe_router_enable_expert_bias": True}, "--moe-router-enable-expert-bias True"),
        ({"moe_shared_expert_intermediate_size": 64}, "--moe-shared-expert-intermediate-size 64"),
        ({"moe_router_topk_scaling_factor": 2.5}, "--moe-router-topk-scaling-factor 2.5"),
        ({"moe_apply_probs_on_input": True}, "--moe-apply-probs-on-input True"),
    ]:
        (problem,) = moe_args_problems(argparse.Namespace(**{**plain, **change}))
        assert problem.startswith(named), problem


def test_export_refuses_a_model_without_hf_layout():
    with pytest.raises(ConversionError, match="family 'gpt' has no Hugging Face mapping"):
        model_config_to_hf(ModelConfig())
    llama_with_bias = ModelConfig(
        family="llama",
        position_embedding_type="rope",
        normalization="RMSNorm",
        swiglu=True,
        add_bias_linear=True,
    )
    with pytest.raises(ConversionError, match="needs add_bias_linear=False"):
        model_config_to_hf(llama_with_bias)


def _model(family: str) -> ModelConfig:
    cfg = hf_config(family)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return hf_to_model_config(cfg)


def _write(folder, tensors: dict[str, torch.Tensor]):
    folder.mkdir(exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _full(model: ModelConfig) -> dict[str, torch.Tensor]:
    return {m.hf_name: torch.zeros(m.hf_shape) for m in tensor_maps(model)}


def test_missing_misshaped_and_unknown_tensors_are_named(tmp_path):
    model = _model("qwen2")
    tensors = _full(model)
    _write(tmp_path / "ok", tensors)
    plan = plan_import(model, tmp_path / "ok")
    assert sum(len(v) for v in plan.files.values()) == len(tensors) == 2 + 2 * 12

    del tensors["model.layers.1.self_attn.k_proj.bias"]
    _write(tmp_path / "missing", tensors)
    with pytest.raises(ConversionError, match=r"1 tensor\(s\).*missing: model.layers.1.self_attn"):
        plan_import(model, tmp_path / "missing")

    tensors = _full(model)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(175, 64)
    _write(tmp_path / "shape", tensors)
    with pytest.raises(
        ConversionError,
        match=r"model.layers.0.mlp.up_proj.weight has shape \[175, 64\].*\[176, 64\]",
    ):
        plan_import(model, tmp_path / "shape")

    tensors = _full(model)
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    _write(tmp_path / "bias", tensors)
    with pytest.raises(ConversionError, match="does not know.*o_proj.bias"):
        plan_import(model, tmp_path / "bias")

    # Known leftovers are skipped and reported: a RoPE buffer, lm_head of a tied model.
    tensors = _full(model)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    tensors["lm_head.weight"] = torch.zeros(96, 64)
    _write(tmp_path / "extra", tensors)
    assert set(plan_import(model, tmp_path / "extra").skipped) == {
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "lm_head.weight",
    }


def test_sharded_index_and_pytorch_bin(tmp_path):
    model = _model("llama")
    tensors = _full(model)
    names = sorted(tensors)
    folder = tmp_path / "sharded"
    folder.mkdir()
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    plan = plan_import(model, folder)
    assert len(plan.files) == 2 and sum(len(v) for v in plan.files.values()) == len(names)

    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    torch.save({}, bin_only / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="found pytorch_model.bin: convert them"):
        plan_import(model, bin_only)


def _megatron_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Megatron-Core's parameter shapes at TP1 x PP1 x EP1 (local spec), written out by hand."""
    h, f = m.hidden_size, m.ffn_hidden_size
    d = m.kv_channels or h // m.num_attention_heads
    qkv_rows = (m.num_attention_heads + 2 * m.num_query_groups) * d
    shapes = {"embedding.word_embeddings.weight": (m.padded_vocab_size, h)}
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attention.linear_qkv.weight": (qkv_rows, h),
            p + "self_attention.linear_proj.weight": (h, m.num_attention_heads * d),
            p + "pre_mlp_layernorm.weight": (h,),
        }
        if m.moe_layers()[i]:
            fm = m.moe_ffn_hidden_size
            shapes[p + "mlp.router.weight"] = (m.num_experts, h)
            for j in range(m.num_experts):
                e = f"{p}mlp.experts.local_experts.{j}."
                shapes |= {e + "linear_fc1.weight": (2 * fm, h), e + "linear_fc2.weight": (h, fm)}
        else:
            shapes |= {p + "mlp.linear_fc1.weight": (2 * f, h), p + "mlp.linear_fc2.weight": (h, f)}
        if m.qk_layernorm:
            shapes |= {p + "self_attention.q_layernorm.weight": (d,)}
            shapes |= {p + "self_attention.k_layernorm.weight": (d,)}
        if m.add_qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (qkv_rows,)
    shapes["decoder.final_layernorm.weight"] = (h,)
    if m.untie_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (m.padded_vocab_size, h)
    return shapes


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"])
def test_mapping_covers_every_element_once(family):
    """Each element of each Megatron-Core parameter is in exactly one HF tensor's block or in
    the padded rows (counted element by element), and the runtime guard agrees."""
    from dft_megatron.convert.families import padded_rows

    m = _model(family)
    shapes = _megatron_shapes(m)
    counts = {k: torch.zeros(s, dtype=torch.int32) for k, s in shapes.items()}
    for t in tensor_maps(m):
        t.block(counts[t.megatron_name]).add_(1)
    for name, rows in padded_rows(m).items():
        counts[name][rows] += 1
    for name, c in counts.items():
        assert (c == 1).all(), name
    check_coverage(m, {k: torch.empty(s, device="meta") for k, s in shapes.items()})
    fc1 = next(k for k in shapes if k.endswith("linear_fc1.weight"))
    shapes[fc1] = (shapes[fc1][0] + 2, m.hidden_size)
    with pytest.raises(AssertionError, match="linear_fc1"):
        check_coverage(m, {k: torch.empty(s, device="meta") for k, s in shapes.items()})


def test_qkv_rows_follow_query_groups():
    """Megatron-Core's linear_qkv rows: per query group, its query heads, then k, then v."""
    m = _model("llama")  # 4 heads, 2 query groups, head dim 16
    d = 16
    maps = {t.hf_name: t for t in tensor_maps(m)}
    qkv = torch.zeros(8 * d, 64)
    for kind, value in (("q", 1.0), ("k", 2.0), ("v", 3.0)):
        t = maps[f"model.layers.0.self_attn.{kind}_proj.weight"]
        hf = value + torch.arange(t.hf_shape[0] // d).repeat_interleave(d)[:, None] * 10
        block = t.block(qkv)
        block.copy_(hf.expand(t.hf_shape).reshape(block.shape))
    # HF heads: q 0-3, kv 0-1 (query heads 0, 1 use kv head 0). Rows of d, in order:
    expected = [1, 11, 2, 3, 21, 31, 12, 13]  # group 0: q0 q1 k0 v0; group 1: q2 q3 k1 v1
    assert qkv[::d, 0].tolist() == expected


def test_output_folder_needs_force(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="not empty; pass --force"):
        prepare_output(out, False, source=src)
    assert (out / "keep.txt").exists()
    prepare_output(out, True, source=src)
    assert out.is_dir() and not any(out.iterdir())
    with pytest.raises(ConversionError, match="is \\(or contains\\) the input folder"):
        prepare_output(tmp_path, True, source=src)


def test_shard_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 5 * 10**8
    with pytest.raises(ConversionError, match="expected a size like"):
        parse_size("five")
    maps = tensor_maps(_model("llama"))
    shards = shard_plan(maps, torch.float32, 100_000)
    assert [m for s in shards for m in s] == maps
    sizes = [sum(4 * torch.Size(m.hf_shape).numel() for m in s) for s in shards]
    assert all(size <= 100_000 for size in sizes) and len(shards) > 1


def _save_dir(root, tracker: str, folders: dict[str, bool]):
    """A Megatron-LM save directory: the tracker file and folders (complete: metadata.json)."""
    root.mkdir()
    (root / "latest_checkpointed_iteration.txt").write_text(tracker)
    for name, complete in folders.items():
        (root / name).mkdir()
        if complete:
            (root / name / "metadata.json").write_text("{}")
    return root


def test_export_resolves_megatron_lm_save_directories(tmp_path):
    """What --megatron-dir / --iteration pick (as --load / --ckpt-step do), and the refusals."""
    with pytest.raises(FileNotFoundError, match="not a Megatron-LM save directory"):
        resolve_checkpoint(tmp_path, None)
    release = _save_dir(tmp_path / "release_ckpt", "release", {"release": True})
    assert resolve_checkpoint(release, None) == (release, release / "release")
    assert resolve_checkpoint(release / "release", None) == (release, release / "release")
    assert load_flags(release, release / "release") == [
        f"--load={release}",
        "--use-checkpoint-args",
        "--no-load-optim",
        "--no-load-rng",
    ]

    run = _save_dir(
        tmp_path / "run", "4", {"iter_0000002": True, "iter_0000004": True, "iter_0000006": False}
    )
    assert resolve_checkpoint(run, None) == (run, run / "iter_0000004")
    assert resolve_checkpoint(run, 2) == (run, run / "iter_0000002")
    assert resolve_checkpoint(run / "iter_0000002", None) == (run, run / "iter_0000002")
    assert load_flags(run, run / "iter_0000002")[-1] == "--ckpt-step=2"
    with pytest.raises(FileNotFoundError, match=r"iter_0000003 is not a complete.*iter_0000002"):
        resolve_checkpoint(run, 3)
    with pytest.raises(FileNotFoundError, match="iter_0000006 is not a complete torch_dist"):
        resolve_checkpoint(run, 6)  # an interrupted save: no metadata.json

    bad = _save_dir(tmp_path / "bad", "latest", {})
    with pytest.raises(ValueError, match="neither an iteration number nor 'release'"):
        resolve_checkpoint(bad, None)
