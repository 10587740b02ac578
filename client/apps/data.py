"""Fine-tuning data: a JSONL file read into examples, tokenized, and served as padded batches.

Each line is one example, in one of two shapes:

- ``{"text": "..."}``: plain language modelling; the loss covers every token.
- ``{"prompt": "...", "completion": "..."}``: the loss covers the completion only, so the
  model learns to answer rather than to repeat questions.

Every example ends with the tokenizer's EOS token (and it is a label), so a tuned model learns
where an answer stops. A file with bad lines is refused as a whole, with every bad line named:
a typo that silently dropped half the data would look like a training problem, not a data one.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100  # what transformers' loss skips
_MAX_LISTED = 20  # bad lines named in one error; the count still covers them all


class DataError(ValueError):
    """A data file that cannot be trained on; the message names the file and every bad line."""

    def __init__(self, path: str | Path, problems: list[tuple[int, str]]):
        self.path, self.problems = str(path), problems
        listed = "; ".join(f"line {number}: {why}" for number, why in problems[:_MAX_LISTED])
        more = f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        noun = "bad line" if len(problems) == 1 else "bad lines"
        super().__init__(f"{self.path}: {len(problems)} {noun}: {listed}{more}")


@dataclass(frozen=True)
class Record:
    """One line of the file. ``prompt`` is None for a ``text`` line (loss on all of ``target``)."""

    line: int
    prompt: str | None
    target: str


@dataclass(frozen=True)
class Example:
    """One tokenized record: ``labels`` is ``input_ids`` with IGNORE_INDEX where no loss is taken."""

    line: int
    input_ids: list[int]
    labels: list[int]


def parse_line(text: str) -> Record | str:
    """A Record, or the reason the line is bad (the caller adds the line number)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if "text" in obj:
        extra = {"prompt", "completion"} & obj.keys()
        if extra:
            return f"has both 'text' and {sorted(extra)}; use one shape"
        value = obj["text"]
        if not isinstance(value, str):
            return f"'text' must be a string, got {type(value).__name__}"
        if not value.strip():
            return "'text' is empty"
        return Record(0, None, value)
    if "prompt" in obj and "completion" in obj:
        prompt, completion = obj["prompt"], obj["completion"]
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                return f"'{key}' must be a string, got {type(value).__name__}"
        if not completion.strip():
            return "'completion' is empty"
        return Record(0, prompt, completion)
    return f"needs 'text' or 'prompt'+'completion', got keys {sorted(obj)}"


def read_jsonl(path: str | Path) -> list[Record]:
    """All records of a JSONL file (blank lines are skipped). Raises DataError listing every bad line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(path, [(0, "file not found")]) from None
    except UnicodeDecodeError as e:
        raise DataError(path, [(0, f"not UTF-8 text ({e.reason} at byte {e.start})")]) from None
    records, problems = [], []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        parsed = parse_line(text)
        if isinstance(parsed, str):
            problems.append((number, parsed))
        else:
            records.append(Record(number, parsed.prompt, parsed.target))
    if problems:
        raise DataError(path, problems)
    if not records:
        raise DataError(path, [(0, "no examples (the file is empty)")])
    return records


def tokenize(records: list[Record], tokenizer, max_length: int | None = None,
             path: str | Path = "data") -> list[Example]:
    """Token ids and labels for each record, truncated to ``max_length`` tokens.

    Prompt and completion are tokenized apart and joined, so the label mask falls exactly on
    the completion's first token. A record left with nothing to learn after truncation (its
    prompt fills ``max_length``) is a DataError: it would only add a NaN loss.
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a token and the one it predicts), got {max_length}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples, problems = [], []
    for record in records:
        if record.prompt is None:  # special tokens (a BOS, for tokenizers that add one) lead the text
            prompt = []
            target = tokenizer(record.target, add_special_tokens=True)["input_ids"] + eos
        else:
            prompt = tokenizer(record.prompt, add_special_tokens=True)["input_ids"]
            target = tokenizer(record.target, add_special_tokens=False)["input_ids"] + eos
        labels_from = len(prompt)
        input_ids = (prompt + target)[:max_length] if max_length else prompt + target
        labels = [IGNORE_INDEX] * min(labels_from, len(input_ids)) + input_ids[labels_from:]
        # A causal LM predicts token t from tokens < t: the first position never carries loss.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            problems.append((record.line, f"no completion tokens left within --max-length {max_length} "
                                          f"(the prompt has {len(prompt)} tokens)"))
            continue
        examples.append(Example(record.line, input_ids, labels))
    if problems:
        raise DataError(path, problems)
    return examples


def pad_id_of(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else EOS (never seen: masked and ignored)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE_INDEX on padding)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchStream:
    """Endless batches over the examples: each epoch in its own seeded order, batches running on
    across epoch ends. ``position`` (examples handed out so far) is all a resumed run needs to
    carry on with exactly the batches an uninterrupted run would have seen."""

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int, seed: int = 0, position: int = 0):
        if not examples:
            raise ValueError("no examples to batch")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.position = position
        self._epoch, self._order = -1, []

    def order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = list(range(len(self.examples)))
            random.Random(f"{self.seed}:{epoch}").shuffle(self._order)  # str seeds hash the same on every run
            self._epoch = epoch
        return self._order

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked = []
        for _ in range(self.batch_size):
            epoch, index = divmod(self.position, len(self.examples))
            picked.append(self.examples[self.order(epoch)[index]])
            self.position += 1
        return collate(picked, self.pad_id)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, so a resumed run can tell that its data changed."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
