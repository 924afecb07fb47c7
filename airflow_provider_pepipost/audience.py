"""Where the recipients come from: a list (XCom, templated field) or a CSV / JSON Lines file, read as a stream.

An ``Audience`` can be iterated more than once: once to validate every row, once to send.
"""

from __future__ import annotations

import ast
import csv
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from airflow_provider_pepipost.errors import MessageValidationError, PepipostConfigError, RowProblem

FILE_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}


class Audience:
    """The operator's ``recipients``, as rows: phone-number strings or row dicts.

    ``number_columns``: the columns a CSV file must have one of (the operator's number field).
    While a file is read, ``line`` is the line the current row ends on, for errors that name it.
    """

    def __init__(self, value: Any, number_columns: tuple[str, ...] = ("recipient_whatsapp",)) -> None:
        self._rows: Any = None
        self._path: Any = None
        self._format = ""
        self.number_columns = number_columns
        self.line: int | None = None
        if isinstance(value, (str, os.PathLike)) or _is_object_storage_path(value):
            self._from_text_or_path(value)
        elif isinstance(value, Mapping):
            raise PepipostConfigError(
                "recipients: got one dict; give a list of rows (dicts or phone numbers), or a path to a file"
            )
        elif value is None:
            raise PepipostConfigError("recipients: is required (a list, an XCom of a list, or a file path)")
        else:
            try:
                iter(value)
            except TypeError:
                raise PepipostConfigError(f"recipients: cannot read rows from a {type(value).__name__}") from None
            # Lists and XCom sequences can be read twice; a one-shot iterator is kept in memory.
            self._rows = value if hasattr(value, "__len__") else list(value)

    def _from_text_or_path(self, value: Any) -> None:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                self._rows = _parse_list_literal(text)
                return
            if not text:
                raise PepipostConfigError("recipients: is empty")
            value = text
        name = str(value)
        suffix = Path(name.split("?")[0]).suffix.lower()
        if suffix not in FILE_SUFFIXES:
            raise PepipostConfigError(
                f"recipients: {name[:80]!r} is neither a list nor a path to a {'/'.join(FILE_SUFFIXES)} file"
            )
        self._format = FILE_SUFFIXES[suffix]
        self._path = value

    @property
    def source_description(self) -> str:
        if self._path is not None:
            return f"{self._format} file {self._path}"
        return f"list of {len(self._rows)} rows"

    def __iter__(self) -> Iterator[Any]:
        if self._path is None:
            yield from self._rows
            return
        with self._opened() as handle:
            if self._format == "csv":
                reader = csv.DictReader(handle)
                self._check_columns(reader.fieldnames or [])
                for row in reader:
                    self.line = reader.line_num
                    yield {key: val for key, val in row.items() if key is not None}
            elif self._format == "json":
                rows = json.load(handle)
                if not isinstance(rows, list):
                    raise PepipostConfigError(f"recipients: {self._path} must hold a JSON list")
                yield from rows
            else:
                index = 0
                for line_number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    self.line = line_number
                    try:
                        row = json.loads(line)
                    except ValueError as err:
                        problem = RowProblem(index, "line", repr(line[:40]), f"is not JSON: {err}", line=line_number)
                        raise MessageValidationError([problem]) from None
                    if index == 0 and isinstance(row, dict):
                        self._check_keys(row, line_number)
                    yield row
                    index += 1
        self.line = None

    def _opened(self) -> IO[str]:
        """The file, or an error that names it and what to check."""
        try:
            return _open(self._path)
        except FileNotFoundError:
            raise PepipostConfigError(
                f"recipients: there is no file {self._path}. The path is read on the worker that runs the task: "
                "check it exists there (with Celery or Kubernetes, every worker needs it: use an object storage "
                "URL such as s3://bucket/audience.csv, or pass the rows through XCom)"
            ) from None
        except (PermissionError, IsADirectoryError) as err:
            raise PepipostConfigError(f"recipients: {self._path} cannot be read: {err.strerror}") from None

    def _check_columns(self, columns: Sequence[str]) -> None:
        """One error for a file without a number column, not one per row."""
        if any(name in columns for name in self.number_columns):
            return
        near = [c for c in columns if c.strip().lower() in self.number_columns]
        hint = f" ({near[0]!r} is close: column names are case- and space-sensitive)" if near else ""
        raise PepipostConfigError(
            f"recipients: the CSV file {self._path} has no {' or '.join(map(repr, self.number_columns))} column"
            f"{hint}; its columns are {columns[:20]}"
        )

    def _check_keys(self, row: dict[str, Any], line_number: int) -> None:
        """One error for a JSON Lines file whose first row has no number key, not one per row."""
        if any(name in row for name in self.number_columns):
            return
        keys = [str(key) for key in list(row)[:20]]
        near = [key for key in keys if key.strip().lower() in self.number_columns]
        hint = f" ({near[0]!r} is close: keys are case- and space-sensitive)" if near else ""
        raise PepipostConfigError(
            f"recipients: the first row of the JSON Lines file {self._path} (line {line_number}) has no "
            f"{' or '.join(map(repr, self.number_columns))} key{hint}; its keys are {keys}"
        )


def _parse_list_literal(text: str) -> list[Any]:
    """A list rendered to text, as Jinja does without native rendering: JSON or a Python literal."""
    try:
        rows = json.loads(text)
    except ValueError:
        try:
            rows = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise PepipostConfigError(
                "recipients: the text starts with '[' but is neither a JSON nor a Python list; "
                "with templates, set render_template_as_native_obj=True on the DAG or pass an XComArg"
            ) from None
    if not isinstance(rows, list):
        raise PepipostConfigError("recipients: must be a list")
    return rows


def _is_object_storage_path(value: Any) -> bool:
    return type(value).__name__ == "ObjectStoragePath"


# UTF-8, with or without the byte-order mark spreadsheets write ("CSV UTF-8" in Excel).
_ENCODING = "utf-8-sig"


def _open(path: Any) -> IO[str]:
    if _is_object_storage_path(path):
        return path.open("r", encoding=_ENCODING, newline="")
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        from airflow.sdk import ObjectStoragePath

        return ObjectStoragePath(text).open("r", encoding=_ENCODING, newline="")
    text = text.removeprefix("file://")
    return open(text, encoding=_ENCODING, newline="")
