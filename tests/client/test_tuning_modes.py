"""How a user names tuning methods: from_pretrained's tuning_mode (names, method objects, PEFT
configs, lists of them) and `swarm finetune --mode`, resolved into the client's parameters."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig
from transformers import LlamaConfig

from client.apps.cli_finetune import build_parser, default_lr, run_setup, tuning_modes
from client.messages import tuning_tensors
from client.tuning import ClientTuning, default_ia3, resolve_modes
from swarm.models import get_family
from swarm.tuning import IA3, BottleneckAdapter, ExportTarget, LoRA, PrefixTuning


@pytest.fixture(scope="module")
def family():
    return get_family(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2))


def names(modes) -> list[str]:
    return [m if isinstance(m, str) else m.name for m in modes]


def test_modes_resolve_from_names_objects_and_peft_configs():
    lora = LoRA(rank=2)
    assert names(resolve_modes("ia3")) == ["ia3"]
    assert resolve_modes(None) == []
    modes = resolve_modes(["embeddings", "bottleneck", "lora"], lora=lora)
    assert names(modes) == ["embeddings", "bottleneck", "lora"] and modes[2] is lora
    bottleneck = BottleneckAdapter("houlsby", 8)
    assert resolve_modes(["ptune", bottleneck])[1] is bottleneck
    (prefix,) = resolve_modes(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7, prefix_projection=True,
                                                 encoder_hidden_size=32))
    assert prefix.settings() == {"num_virtual_tokens": 7, "projection": 32}
    (ia3,) = resolve_modes(IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert ia3.settings() == {"targets": ["down_proj", "v_proj"], "feedforward": ["down_proj"]}
    # peft_config replaces the method of its kind (the old LoRA-only argument).
    modes = resolve_modes(["ptune", "lora"], LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"]))
    assert names(modes) == ["ptune", "lora"] and modes[1].rank == 3 and modes[1].targets == ("q_proj",)
    with pytest.raises(ValueError, match="unknown tuning_mode 'adapterz'"):
        resolve_modes(["adapterz"])
    with pytest.raises(ValueError, match=r"names \['ia3'\] more than once"):
        resolve_modes(["ia3", IA3()])
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        resolve_modes(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True))


def test_client_tuning_holds_each_methods_tensors(family):
    torch.manual_seed(0)
    tuning = ClientTuning(family, ["ptune", LoRA(rank=2), IA3(), PrefixTuning(2, projection=16),
                                   BottleneckAdapter(reduction_factor=8)], hidden_size=64, pre_seq_len=3)
    assert tuning.modes == ["ptune", "lora", "ia3", "prefix", "bottleneck"] and not tuning.trains_embeddings
    assert [m.name for m in tuning.methods] == ["lora", "ia3", "prefix", "bottleneck"]
    ia3 = tuning.adapter("ia3").tensors()
    assert ia3["2.mlp.down_proj.ia3_l"].shape == (1, 96) and bool((ia3["2.mlp.down_proj.ia3_l"] == 1).all())
    bottleneck = tuning.adapter("bottleneck").tensors()
    assert bottleneck["1.mlp.adapter_down.weight"].shape == (8, 64) and not bottleneck["1.mlp.adapter_up.weight"].any()
    prefix = tuning.adapter("prefix")
    assert not prefix.params and {n for n, _ in prefix.encoder.named_parameters()} == {
        "embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"}
    keys = prefix.tensors()["0.prefix_keys"]
    assert keys.shape == (2, 2, 16) and keys.requires_grad, "computed by the MLP, differentiable"
    payload = tuning.payload()
    assert [method.name for method, _ in payload.adapters] == ["lora", "ia3", "prefix", "bottleneck"]
    _, messages = tuning_tensors(payload, 1, 2)
    assert all(set(n.split(".")[0] for n in msg.tensors) == {"1"} for msg in messages), "a span gets its blocks only"
    with pytest.raises(KeyError, match="no deep_ptune adapter"):
        tuning.adapter("deep_ptune")


def test_finetune_takes_every_method_and_combinations():
    parser = build_parser()
    base = ["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x", "--data", "d.jsonl", "--out", "o"]
    args = parser.parse_args(base + ["--mode", "embeddings, bottleneck", "--bottleneck-placement", "houlsby",
                                     "--bottleneck-reduction", "8"])
    assert args.mode == "embeddings,bottleneck" and default_lr(args.mode) == 1e-4
    modes = tuning_modes(args)
    assert modes[0] == "embeddings" and modes[1].settings() == BottleneckAdapter("houlsby", 8).settings()
    assert run_setup(args, None)["bottleneck_reduction"] == 8
    args = parser.parse_args(base + ["--mode", "prefix", "--prefix-tokens", "5", "--prefix-projection", "64"])
    assert tuning_modes(args)[0].settings() == {"num_virtual_tokens": 5, "projection": 64}
    for mode in ("ia3", "lora", "ptune,lora", "deep_ptune"):
        assert parser.parse_args(base + ["--mode", mode]).mode == mode
    assert tuning_modes(parser.parse_args(base + ["--mode", "none"])) is None
    for bad in ("ia4", "ia3,ia3", "none,lora"):
        with pytest.raises(SystemExit):
            parser.parse_args(base + ["--mode", bad])


def test_a_combination_round_trips_through_its_saved_folder(family, tmp_path):
    """save_adapter writes each method's files in its own folder next to swarmlm's; reading
    the folder back rebuilds the same setup with the same tensors, and a method's PEFT folder
    alone loads as that method (a prefix trained through its MLP as the keys/values it made)."""
    from types import SimpleNamespace

    from client.export import load_adapter, read_tuning_settings, save_adapter

    def model_with(modes, pre_seq_len=3):
        torch.manual_seed(len(modes))
        return SimpleNamespace(family=family, name_or_path="tiny", train_lm_head=False,
                               parts=family.build_client_parts(),
                               tuning=ClientTuning(family, modes, hidden_size=64, pre_seq_len=pre_seq_len))

    model = model_with(["embeddings", "ptune", LoRA(rank=2), IA3(), PrefixTuning(2, projection=8),
                        BottleneckAdapter("houlsby", 8)])
    with torch.no_grad():
        for param in list(model.tuning.parameters()) + [model.parts.embed_tokens.weight]:
            param.add_(torch.randn_like(param))
    save_adapter(model, tmp_path)
    for method, file in (("lora", "adapter_config.json"), ("ia3", "adapter_config.json"),
                         ("prefix", "adapter_config.json"), ("bottleneck", "bottleneck_adapters.json")):
        assert (tmp_path / method / file).exists(), (method, file)
    assert (tmp_path / "client_parts.safetensors").exists(), "the trained embeddings are saved"

    target = ExportTarget(family.layers_prefix, "tiny")
    settings = read_tuning_settings(tmp_path, target)
    modes = settings["tuning_mode"]
    assert names(modes) == model.tuning.modes and settings["pre_seq_len"] == 3
    assert [m.settings() for m in modes[2:]] == [m.settings() for m in model.tuning.methods]
    again = model_with(modes)
    load_adapter(again, tmp_path)
    for name, tensor in model.tuning.state_dict().items():
        assert torch.equal(again.tuning.state_dict()[name], tensor), name
    assert torch.equal(again.parts.embed_tokens.weight, model.parts.embed_tokens.weight)

    (prefix,) = read_tuning_settings(tmp_path / "prefix", target)["tuning_mode"]
    assert prefix.settings() == {"num_virtual_tokens": 2, "projection": None}
    plain = model_with([prefix])
    load_adapter(plain, tmp_path / "prefix")
    expected = model.tuning.adapter("prefix").tensors()
    for name, tensor in plain.tuning.adapter("prefix").tensors().items():
        torch.testing.assert_close(tensor, expected[name])


FAMILIES = {
    "falcon": ("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "bloom": ("BloomConfig", dict(n_layer=2, n_head=4)),
    "phi3": ("Phi3Config", dict(intermediate_size=96, num_key_value_heads=2)),
    "llama": ("LlamaConfig", dict(intermediate_size=96, num_key_value_heads=2)),
}


def tiny_family(name: str):
    import transformers

    config_class, extra = FAMILIES[name]
    config = getattr(transformers, config_class)(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, **extra)
    return get_family(config)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_finetune_lora_and_ia3_default_to_the_familys_layers(name):
    """`swarm finetune --mode lora` / `--mode ia3` without target flags train layers the model
    has: the family's LoRA targets, and IA3 on the family's own projections."""
    family = tiny_family(name)
    base = ["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x", "--data", "d.jsonl", "--out", "o"]
    setup = run_setup(build_parser().parse_args(base + ["--mode", "lora"]), family)
    assert setup["lora_targets"] == list(family.default_lora_targets)
    explicit = run_setup(build_parser().parse_args(base + ["--mode", "lora", "--lora-targets", "a_proj, b_proj"]), family)
    assert explicit["lora_targets"] == ["a_proj", "b_proj"]
    lora = LoRA(targets=setup["lora_targets"])
    (ia3,) = resolve_modes("ia3", ia3=default_ia3(family))
    ClientTuning(family, [lora, ia3], hidden_size=64)  # every target names a linear of the family's blocks
    if name == "llama":
        assert ia3.settings() == IA3().settings(), "where IA3's defaults fit, they stay"
