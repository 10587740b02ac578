"""client/apps/data.py: JSONL parsing, label masking, padding and resumable batch order."""

from __future__ import annotations

import json

import pytest
import torch

from client.apps.data import (IGNORE_INDEX, BatchStream, DataError, Record, collate, pad_id_of, parse_line, read_jsonl,
                         tokenize)


class CharTokenizer:
    """One token per character (id = code point), EOS 1, no pad token: exact lengths to assert on."""

    eos_token_id = 1
    pad_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def write(tmp_path, lines: list) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def read_records(lines: list[dict]) -> list[Record]:
    """Records as read_jsonl makes them, numbered from 1, without a file."""
    records = []
    for number, obj in enumerate(lines, start=1):
        parsed = parse_line(json.dumps(obj))
        assert isinstance(parsed, Record), parsed
        records.append(Record(number, parsed.prompt, parsed.target))
    return records


def test_reads_both_shapes_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, [{"text": "hello"}, "", {"prompt": "Q: ", "completion": "A"}])
    records = read_jsonl(path)
    assert [(r.line, r.prompt, r.target) for r in records] == [(1, None, "hello"), (3, "Q: ", "A")]


def test_text_lines_take_loss_on_every_token():
    (example,) = tokenize(read_records([{"text": "abc"}]), CharTokenizer())
    assert example.input_ids == [97, 98, 99, 1]  # EOS ends every example
    assert example.labels == example.input_ids


def test_prompt_completion_masks_the_prompt():
    (example,) = tokenize(read_records([{"prompt": "ab", "completion": "cd"}]), CharTokenizer())
    assert example.input_ids == [97, 98, 99, 100, 1]
    assert example.labels == [IGNORE_INDEX, IGNORE_INDEX, 99, 100, 1]


def test_truncation_keeps_the_start_and_refuses_examples_left_without_targets():
    tokenizer = CharTokenizer()
    (example,) = tokenize(read_records([{"prompt": "ab", "completion": "cdef"}]), tokenizer, max_length=4)
    assert example.input_ids == [97, 98, 99, 100] and example.labels == [IGNORE_INDEX, IGNORE_INDEX, 99, 100]
    with pytest.raises(DataError, match=r"1 bad line: line 2: no completion tokens left within --max-length 3"):
        tokenize(read_records([{"text": "ok"}, {"prompt": "abcdef", "completion": "x"}]), tokenizer, max_length=3)


def test_bad_lines_are_all_reported_with_their_numbers(tmp_path):
    path = write(tmp_path, [
        {"text": "fine"},
        "{not json",
        {"prompt": "only a prompt"},
        {"text": 3},
        {"text": "   "},
        [1, 2],
        {"prompt": "q", "completion": ""},
        {"text": "also fine"},
    ])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 6 bad lines: line 2: not JSON")
    for expected in ("line 3: needs 'text' or 'prompt'+'completion'", "line 4: 'text' must be a string, got int",
                     "line 5: 'text' is empty", "line 6: expected a JSON object, got list",
                     "line 7: 'completion' is empty"):
        assert expected in message
    assert "line 1" not in message and "line 8" not in message
    assert [n for n, _ in info.value.problems] == [2, 3, 4, 5, 6, 7]


def test_missing_and_empty_files_are_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(write(tmp_path, [""]))


def test_collate_pads_on_the_right_and_masks_padding():
    tokenizer = CharTokenizer()
    examples = tokenize(read_records([{"text": "abc"}, {"prompt": "x", "completion": "y"}]), tokenizer)
    batch = collate(examples, pad_id_of(tokenizer))
    assert pad_id_of(tokenizer) == 1  # no pad token: EOS stands in
    assert batch["input_ids"].tolist() == [[97, 98, 99, 1], [120, 121, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[97, 98, 99, 1], [IGNORE_INDEX, 121, 1, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_batches_cycle_through_every_example_in_a_seeded_order():
    examples = tokenize(read_records([{"text": c} for c in "abcde"]), CharTokenizer())

    def firsts(stream: BatchStream, steps: int) -> list[int]:
        return [row[0] for _ in range(steps) for row in stream.next_batch()["input_ids"].tolist()]

    seen = firsts(BatchStream(examples, batch_size=2, pad_id=1, seed=7), steps=5)  # 10 examples: 2 epochs
    assert sorted(seen[:5]) == sorted(seen[5:]) == [97, 98, 99, 100, 101]
    assert seen == firsts(BatchStream(examples, batch_size=2, pad_id=1, seed=7), steps=5)
    assert seen != firsts(BatchStream(examples, batch_size=2, pad_id=1, seed=8), steps=5)
    # Resuming from a position gives exactly the batches an uninterrupted stream would have.
    assert firsts(BatchStream(examples, batch_size=2, pad_id=1, seed=7, position=4), steps=3) == seen[4:]



def test_the_default_models_tokenizer_masks_exactly_the_prompt():
    from transformers import AutoTokenizer

    from swarm.checkpoint import DEFAULT_MODEL, resolve_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(DEFAULT_MODEL).folder)
    prompt, completion = "What is 2 plus 2? ", "4"
    (example,) = tokenize(read_records([{"prompt": prompt, "completion": completion}]), tokenizer)
    n = len(tokenizer(prompt)["input_ids"])
    assert example.labels[:n] == [IGNORE_INDEX] * n
    assert tokenizer.decode(example.labels[n:]) == completion + tokenizer.eos_token
    assert example.input_ids[n:] == example.labels[n:]
