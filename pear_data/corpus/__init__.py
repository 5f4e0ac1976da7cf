"""Input corpus: read rows in input order and normalize row shapes (docs/design.md section 2).

    files.py         opening files (gzip, byte-order marks, JSON arrays), errors that name them
    records.py       a row as read (`CorpusRow`) and the checks that make a row undecodable
    readers.py       `open_corpus` -> `Corpus`: rows, row ranges, row count, fingerprint, column types
    columns.py       one Arrow type per input column (`InputColumns`), the rows' own columns as a table
    conversation.py  row shapes (`detect_shape`) and `to_conversation`

Sources (auto-detected from `source`):

- JSONL file (`.jsonl`, `.ndjson`, `.json` with one object per line, or any of
  them `.gz`-compressed), or a directory of JSONL files: read line by line.
  A `.json` file holding one top-level array of objects is also accepted (it
  is parsed whole: not streamed).
- Parquet file or directory of `.parquet` files (searched recursively, read in
  sorted path order): read record batch by record batch.
- A `datasets` directory written by `Dataset.save_to_disk` or
  `DatasetDict.save_to_disk` (pick the split with `split=`): memory-mapped.
- A Hub dataset id (`owner/name`): `datasets.load_dataset(id, split=split)`.
  With `HF_HUB_OFFLINE=1` only the local cache is used, and a dataset that is
  not cached is a `CorpusError` that says so.

Nothing loads the whole corpus into memory: JSONL and Parquet are streamed,
`datasets` tables are memory-mapped Arrow.

Every row comes out as a `CorpusRow` with its 0-based `index` in input order.
A JSONL line that cannot be decoded is not an exception: it is a row with
`record=None` and `error="line 17: invalid JSON (...)"`, so the caller can send
it to rejects with its index (every input row ends up in data/ or rejects).
Blank lines are not rows. A UTF-8 byte-order mark starting a file is the
encoding marker, not data; a UTF-16 JSONL file is a `CorpusError`. A row
holding a lone UTF-16 surrogate (JSON `"\ud83d"`, half an emoji: not Unicode
text) or nested more than `MAX_NESTING` levels is an undecodable row whose
reason names the field.

The output type of every input column (`InputColumns`) is decided once for the
whole corpus by `Corpus.columns()`, before any row is scored (design 2.2):
Parquet keeps its file types, `datasets` its Arrow schema, JSONL columns get
the type of all their values together (`InputColumns.infer`), and a column
whose values share no type is JSON text in every row. It also refuses an
input column with a name pear-data writes itself (`schema.RESERVED_NAMES`).

Row shapes (`RowShape`, auto-detected by `detect_shape`, overridable by flags):

- conversational: `messages` = list of `{role, content}`; every `assistant`
  turn is completion, everything else is prompt/environment;
- prompt-completion (TRL convention): `prompt` and `completion`, each a str or
  a list of messages;
- field mapping, e.g. `--prompt-field question --completion-field answer`
  (GSM8K), optionally `--system-field`: a prompt-completion shape whose fields
  have other names.

`to_conversation(record, shape)` turns any of them into one normalized form, a
`Conversation`: a list of `{"role": str, "content": str}` messages in which
the completion tokens are exactly those of the `assistant` turns (but for an
assistant turn inside a prompt-completion *prompt*, marked `"train": False`).
"""

from __future__ import annotations

from .columns import InputColumnError, InputColumns, input_column, json_text, records_table
from .conversation import Conversation, Message, RowShape, detect_shape, is_completion_turn, to_conversation
from .readers import Corpus, RowRange, open_corpus
from .records import MAX_NESTING, CorpusRow, batch_records, column_values, lone_surrogate

__all__ = [
    "MAX_NESTING", "Conversation", "Corpus", "CorpusRow", "InputColumnError", "InputColumns", "Message", "RowRange",
    "RowShape", "batch_records", "column_values", "detect_shape", "input_column", "is_completion_turn",
    "json_text", "lone_surrogate", "open_corpus", "records_table", "to_conversation",
]
