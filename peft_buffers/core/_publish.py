"""Atomic folder writes: a save writes into a staging folder, then each file is moved into place.

Plain ``os``; knows no torch and no PEFT beyond two file names. :func:`stage` makes a staging folder inside the
target folder (the same filesystem, so every move is one ``os.replace``); the save writes there; then
:meth:`StagedFolder.publish` moves the files into the target:

1. every staged file but the model card is flushed to disk (``fsync``);
2. in each adapter folder (one that gets an ``adapter_config.json``), a small record :data:`PENDING_NAME` is
   moved in first, and the folder synced: it names every file the save replaces with the identity (inode,
   size, modification time) of the new file and of the one it replaces;
3. each file is moved into place, one ``os.replace`` each, the config last (README.md and other files first,
   then the weights, then ``adapter_config.json``); the folders are synced;
4. the record is removed.

A file is therefore always either the complete old one or the complete new one. While a record is present,
:func:`check_folder_complete` (run by every load, :func:`peft_buffers.core.check_adapter_path`) accepts the
folder only if all its files are the old ones or all the new ones: a process killed between two moves leaves
a folder that is refused by name (:class:`~peft_buffers.CorruptAdapterFile`), never one that loads new weights
with an old config. Without a record (no save in progress, or a folder written by anything else) nothing is
checked and nothing is read.

A failure while publishing (an exception, not a killed process) moves the previous files back (hard links to
them are kept in the staging folder until the end) and removes the record: the folder is as before. If moving
back fails too, the record stays (loads refuse the folder) and the staging folder is kept with the previous
files; the error says where.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Union

from .._errors import CorruptAdapterFile, escape

__all__ = ["PENDING_NAME", "StagedFolder", "check_folder_complete", "stage"]

PENDING_NAME = "peft_buffers_save_in_progress.json"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_CARD = "README.md"  # replaced like the others, but not part of the adapter: the record leaves it out
_STAGING_PREFIX = ".peft_buffers-save-"
_PREVIOUS = ".previous"  # inside the staging folder: hard links to the files being replaced
_FORMAT = "peft_buffers.save-in-progress/1"
_FIX = (
    "a save into this folder was interrupted between moving two of its files into place, so the folder holds "
    "files of two saves: save the adapter again (or, if you know these files belong together, delete "
    f"{PENDING_NAME})"
)


def _identity(path: str) -> Optional[list[int]]:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return [info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns]


def _fsync_file(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_folder(path: str) -> None:
    if os.name == "nt":  # folders cannot be opened for fsync there; NTFS journals renames itself
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass
class _Move:
    source: str  # in the staging folder
    target: str
    backup: Optional[str] = None  # hard link (or copy) to the file it replaces, None when there was none
    done: bool = False


@dataclass
class StagedFolder:
    """A staging folder inside ``target``: write there, then :meth:`publish` (or :meth:`discard` on failure).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as target:
        ...     staged = stage(target)
        ...     with open(os.path.join(staged.path, "adapter_config.json"), "w") as handle:
        ...         _ = handle.write("{}")
        ...     staged.publish()
        ...     sorted(os.listdir(target))
        ['adapter_config.json']
    """

    target: str
    path: str
    created: list[str] = field(default_factory=list)  # folders made for the save (removed by discard)
    _moves: list[_Move] = field(default_factory=list)
    _records: list[str] = field(default_factory=list)  # pending records moved into place

    def publish(self) -> None:
        """Move every staged file into place (see the module docstring); on failure, put the old files back."""
        plan = self._plan()
        try:
            self._apply(plan)
        except BaseException as error:
            restored = self._roll_back()
            if restored:
                self.discard()
            else:
                _annotate(error, f"peft_buffers: the save into {escape(self.target)} failed and its previous files "
                                 f"could not all be moved back; loads refuse the folder until it is saved again; "
                                 f"the previous files are in {escape(os.path.join(self.path, _PREVIOUS))}")
            raise
        shutil.rmtree(self.path, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging folder, and the folders :func:`stage` made: the target is as before the save."""
        shutil.rmtree(self.path, ignore_errors=True)
        for folder in reversed(self.created):
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty (someone else wrote there) or gone: leave it

    # ------------------------------------------------------------------ publishing

    def _plan(self) -> dict[str, list[str]]:
        """{relative folder: its staged file names, in publishing order}."""
        plan: dict[str, list[str]] = {}
        for folder, dirs, files in os.walk(self.path):
            dirs.sort()
            relative = os.path.relpath(folder, self.path)
            if relative == _PREVIOUS:
                continue
            weights = [name for name in WEIGHTS_NAMES if name in files]
            last = [CONFIG_NAME] if CONFIG_NAME in files else []
            first = sorted(name for name in files if name not in weights and name not in last)
            first.sort(key=lambda name: name != MODEL_CARD)  # documentation first, then the adapter's files
            if files:
                plan["" if relative == "." else relative] = first + weights + last
        return plan

    def _apply(self, plan: dict[str, list[str]]) -> None:
        for relative, names in plan.items():
            for name in names:
                if name != MODEL_CARD:  # documentation: not worth a flush
                    _fsync_file(os.path.join(self.path, relative, name))
        previous = os.path.join(self.path, _PREVIOUS)
        for relative, names in plan.items():
            folder = os.path.join(self.target, relative)
            if not os.path.isdir(folder):
                self._make_folder(folder)
            self._moves.extend(self._move(relative, name, previous) for name in names)
        for index, (relative, names) in enumerate(plan.items()):  # first into every adapter folder: the record
            if CONFIG_NAME in names:
                self._write_record(relative, [name for name in names if name != MODEL_CARD], index)
        for move in self._moves:
            os.replace(move.source, move.target)
            move.done = True
        for relative in plan:
            _fsync_folder(os.path.join(self.target, relative))
        for record in reversed(self._records):
            _remove(record)
        self._records.clear()

    def _make_folder(self, folder: str) -> None:
        missing = []
        probe = folder
        while not os.path.isdir(probe):
            missing.append(probe)
            probe = os.path.dirname(probe)
        os.makedirs(folder)
        self.created.extend(reversed(missing))

    def _move(self, relative: str, name: str, previous: str) -> _Move:
        target = os.path.join(self.target, relative, name)
        move = _Move(os.path.join(self.path, relative, name), target)
        if os.path.lexists(target):
            backup = os.path.join(previous, relative, name)
            os.makedirs(os.path.dirname(backup), exist_ok=True)
            try:
                os.link(target, backup)  # the same file, kept alive: moving it back is one rename
            except OSError:
                shutil.copy2(target, backup)  # a filesystem without hard links
            move.backup = backup
        return move

    def _write_record(self, relative: str, names: list[str], index: int) -> None:
        folder = os.path.join(self.target, relative)
        old_valid = _state(folder) != "mixed"  # a save interrupted before left a mixed folder: not "old"
        files = {}
        for name in names:
            old = _identity(os.path.join(folder, name))
            files[name] = {"new": _identity(os.path.join(self.path, relative, name)), "old": old}
        record = {"format": _FORMAT, "old_is_complete": old_valid, "files": files,
                  "note": "written while a save moves its files into this folder; removed when it is done"}
        staged = os.path.join(self.path, f".record-{index}.json")
        descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(record, indent=1))
            handle.flush()
            os.fsync(handle.fileno())
        final = os.path.join(folder, PENDING_NAME)
        os.replace(staged, final)
        self._records.append(final)
        _fsync_folder(folder)  # the record is on disk before any file of the folder is replaced

    # ------------------------------------------------------------------ rollback

    def _roll_back(self) -> bool:
        """Move the old files back (last moved first), then remove the records; False if anything failed."""
        complete = True
        for move in reversed(self._moves):
            if not move.done:
                continue
            try:
                if move.backup is not None:
                    os.replace(move.backup, move.target)
                else:
                    os.unlink(move.target)
                move.done = False
            except OSError:
                complete = False
        if not complete:
            return False  # the records stay: loads refuse the mixed folders
        for record in reversed(self._records):
            try:
                _remove(record)
            except OSError:
                return False
        self._records.clear()
        return True


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:  # another save into the same folder removed it
        pass


def _annotate(error: BaseException, note: str) -> None:
    notes = getattr(error, "__notes__", None)
    if isinstance(notes, list):
        notes.append(note)
        return
    try:
        error.__notes__ = [note]  # type: ignore[attr-defined]  # what add_note does (Python >= 3.11)
    except AttributeError:
        pass


def stage(target: Union[str, os.PathLike]) -> StagedFolder:
    """Make the staging folder for a save into ``target`` (created if missing, like PEFT does).

    A ``README.md`` already in ``target`` is copied into it, so a model card the save updates keeps its text.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as parent:
        ...     staged = stage(os.path.join(parent, "new"))
        ...     os.path.dirname(staged.path) == staged.target
        ...     staged.discard(); os.path.exists(staged.target)
        True
        False
    """
    target = os.path.abspath(os.fspath(target))
    staged = StagedFolder(target, "")
    if not os.path.isdir(target):
        staged._make_folder(target)
    try:
        staged.path = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=target)
        readme = os.path.join(target, "README.md")
        if os.path.isfile(readme):
            shutil.copy2(readme, os.path.join(staged.path, "README.md"))
    except BaseException:
        staged.discard()
        raise
    return staged


# ---------------------------------------------------------------------- at load


def _read_record(folder: str) -> Optional[dict]:
    path = os.path.join(folder, PENDING_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except ValueError as error:  # JSON or UTF-8; an OSError is raised as it is
        raise CorruptAdapterFile(path, "the record of a save in progress is unreadable",
                                 "the JSON record peft_buffers writes while it saves", f"{type(error).__name__}",
                                 _FIX) from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise CorruptAdapterFile(path, "the record of a save in progress is malformed", "an object with 'files'",
                                 type(record).__name__, _FIX)
    return record


def _state(folder: str) -> str:
    """"none" (no record), "old" or "new" (every file is from one save), or "mixed"."""
    record = _read_record(folder)
    if record is None:
        return "none"
    files = record["files"]
    now = {name: _identity(os.path.join(folder, name)) for name in files}

    def same(side: str) -> bool:
        return all(isinstance(entry, dict) and _same_file(now[name], entry.get(side)) for name, entry in files.items())

    if same("new"):
        return "new"
    if record.get("old_is_complete") and same("old"):
        return "old"
    return "mixed"


def _same_file(now: Optional[list[int]], recorded: object) -> bool:
    if now is None or recorded is None:
        return now is None and recorded is None
    return isinstance(recorded, list) and list(recorded) == now


def check_folder_complete(folder: Union[str, os.PathLike]) -> None:
    """Raise :class:`~peft_buffers.CorruptAdapterFile` if an interrupted save left ``folder`` mixed.

    Reads nothing but one ``stat`` when no save is in progress (no record in the folder).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     check_folder_complete(folder)  # no record: nothing to check
    """
    folder = os.fspath(folder)
    if not os.path.exists(os.path.join(folder, PENDING_NAME)):
        return
    if _state(folder) != "mixed":
        return
    record = _read_record(folder) or {"files": {}}
    new = sorted(name for name, entry in record["files"].items()
                 if isinstance(entry, dict) and _same_file(_identity(os.path.join(folder, name)), entry.get("new")))
    old = sorted(set(record["files"]) - set(new))
    raise CorruptAdapterFile(
        os.path.join(folder, PENDING_NAME), "an interrupted save left files of two saves in this folder",
        "every file from the same save", f"new: {', '.join(map(escape, new)) or 'none'}; previous (or another "
        f"file): {', '.join(map(escape, old)) or 'none'}", _FIX,
    )
