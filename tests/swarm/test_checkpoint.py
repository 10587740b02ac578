"""swarm.checkpoint and swarm.loading: a span reads only its own tensors, sharded folders load,
and every bad name, folder or span is refused with a message that says what was wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from swarm.blocks import SpanInputs
from swarm.checkpoint import NAMED_MODELS, Checkpoint, CheckpointError, config_fingerprint, resolve_checkpoint
from swarm.loading import SpanError, load_client_parts, load_span


def copy_tensors(source: Checkpoint, folder: Path, keep) -> list[str]:
    """Writes a checkpoint folder holding the source's config and only the tensors ``keep`` accepts."""
    folder.mkdir(exist_ok=True)
    shutil.copy(source.folder / "config.json", folder / "config.json")
    with safe_open(source.folder / "model.safetensors", framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys() if keep(key)}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return sorted(tensors)


def block_of(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[2]) if key.startswith("model.layers.") else None


# --- reading only what a span needs ---------------------------------------------------------------


def test_a_span_loads_from_a_checkpoint_holding_only_its_blocks(smollm2, smollm2_spans, tmp_path: Path):
    keys = copy_tensors(smollm2, tmp_path / "blocks-10-19", lambda key: block_of(key) in range(10, 20))
    assert keys and all(block_of(key) in range(10, 20) for key in keys)
    partial = resolve_checkpoint(tmp_path / "blocks-10-19")

    span = load_span(partial, 10, 20)
    hidden = torch.randn(1, 5, 576, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(span(SpanInputs(hidden)), smollm2_spans[1](SpanInputs(hidden)), rtol=0, atol=0)

    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.\d\.[\w.]+' is missing from the checkpoint in "
                                              r".*blocks-10-19"):
        load_span(partial, 0, 10)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.2\d\.[\w.]+' is missing"):
        load_span(partial, 15, 25)
    with pytest.raises(CheckpointError, match=r"'model\.embed_tokens\.weight' is missing"):
        load_client_parts(partial)


def test_load_span_asks_for_its_own_tensors_only(smollm2, monkeypatch):
    requested: list[str] = []
    read = Checkpoint.read_tensors

    def spy(self, keys):
        requested.extend(keys)
        return read(self, keys)

    monkeypatch.setattr(Checkpoint, "read_tensors", spy)
    load_span(smollm2, 28, 30)
    assert requested and {block_of(key) for key in requested} == {28, 29}
    per_block = len(requested) // 2
    assert per_block == 9  # q, k, v, o, gate, up, down, two norms


def test_sharded_checkpoint_loads_span_by_span(tmp_path: Path):
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=4, initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 4, "blocks must be spread over several shards"
    assert not (tmp_path / "model.safetensors").exists()

    checkpoint = resolve_checkpoint(tmp_path)
    spans = [load_span(checkpoint, 0, 1), load_span(checkpoint, 1, 4)]
    parts = load_client_parts(checkpoint)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = parts.embed(ids)
        for span in spans:
            hidden = span(SpanInputs(hidden))
        torch.testing.assert_close(parts.logits(hidden), model(ids).logits, rtol=0, atol=1e-5)

    shard = index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"{shard} is missing from .*its index lists tensor 'model\.layers\.2\."):
        load_span(resolve_checkpoint(tmp_path), 2, 3)


def test_bf16_load_converts_only_the_spans_tensors(smollm2):
    span = load_span(smollm2, 5, 6, dtype=torch.bfloat16)
    assert {p.dtype for p in span.parameters()} == {torch.bfloat16}
    assert span.start == 5 and span.end == 6 and span.length == 1


# --- identities -----------------------------------------------------------------------------------


def test_config_fingerprint_ignores_volatile_fields(smollm2):
    config = smollm2.config
    fingerprint = config_fingerprint(config)
    assert len(fingerprint) == 8 and fingerprint == config_fingerprint(resolve_checkpoint(smollm2.folder).config)
    renamed = type(config).from_dict({**config.to_dict(), "_name_or_path": "elsewhere", "dtype": "bfloat16"})
    assert config_fingerprint(renamed) == fingerprint
    deeper = type(config).from_dict({**config.to_dict(), "num_hidden_layers": 31})
    assert config_fingerprint(deeper) != fingerprint


def test_span_fingerprints_tell_spans_apart(smollm2, smollm2_spans):
    prints = [span.fingerprint for span in smollm2_spans]
    assert len(set(prints)) == 3 and all(len(p) == 16 for p in prints)
    assert load_span(smollm2, 20, 30).fingerprint == prints[2]


# --- bad names, folders and spans -----------------------------------------------------------------


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint("smollm3-1t-instruct")
    message = str(error.value)
    assert "unknown model 'smollm3-1t-instruct'" in message
    assert all(name in message for name in NAMED_MODELS) and "smollm2-135m-instruct" in message
    assert "local Hugging Face folder" in message and ".gguf" in message


def test_missing_gguf_file_is_named(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"GGUF file .*nothing\.gguf does not exist"):
        resolve_checkpoint(tmp_path / "nothing.gguf")


def test_folder_without_config_is_refused(tmp_path: Path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{tmp_path} has no config.json: it is not a Hugging Face model folder"):
        resolve_checkpoint(tmp_path)


def test_folder_without_weights_is_refused(smollm2, tmp_path: Path):
    shutil.copy(smollm2.folder / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=rf"{tmp_path} has no model.safetensors or model.safetensors.index.json"):
        resolve_checkpoint(tmp_path)


@pytest.mark.parametrize("start,end", [(25, 31), (-1, 5), (10, 10), (12, 8), (30, 31)])
def test_span_outside_the_model_is_refused(smollm2, start: int, end: int):
    with pytest.raises(SpanError, match=rf"block span \[{start}, {end}\) is not inside \[0, 30\).*model has 30 blocks"):
        load_span(smollm2, start, end)


def test_truncated_weights_file_is_named(tmp_path: Path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, num_hidden_layers=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path, safe_serialization=True)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cuts into the last tensor: model.norm.weight
    checkpoint = resolve_checkpoint(tmp_path)
    load_span(checkpoint, 0, 2)  # the blocks' bytes are all there
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: tensor 'model\.norm\.weight' ends past"):
        load_client_parts(checkpoint)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        resolve_checkpoint(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_span_weights_live_in_memory_not_in_the_mapped_file(smollm2_spans):
    """Weights mapped from the file would be paged out when idle and re-read at every step."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((low, high))
    for parameter in smollm2_spans[0].parameters():
        assert not any(low <= parameter.data_ptr() < high for low, high in ranges)


def test_gguf_paths_share_a_model_name_but_not_a_cache_folder(tmp_path: Path, monkeypatch):
    """Two machines (here: two paths) holding the same .gguf must announce the same model
    name; each file still gets its own converted cache folder. Conversion itself is covered
    by the named default model; here it only marks the folder done."""
    import swarm.checkpoint as checkpoint_module

    def fake_convert(gguf_path: Path, target: Path) -> None:
        target.mkdir(parents=True)
        (target / ".complete").write_text(str(gguf_path))

    monkeypatch.setenv("SWARMLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint_module, "_convert_gguf", fake_convert)
    first, second = tmp_path / "a" / "tiny-model.gguf", tmp_path / "b" / "tiny-model.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF")
    one, two = resolve_checkpoint(first), resolve_checkpoint(second)
    assert one.name == two.name == "tiny-model"
    assert one.folder != two.folder and one.folder.parent == two.folder.parent == tmp_path / "cache"
