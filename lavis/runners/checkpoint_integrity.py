"""Checks of a checkpoint file before and after ``torch.load``: zip CRCs, pickled code, the content hash.

- ``torch.load`` does not verify the zip's CRC-32 of each record, so ``check_archive`` does.
- ``find_code_globals`` reads the pickle's opcodes (never executing them) and returns every global it
  would import that the weights-only loader does not allow: a file naming ``posix.system``, ``builtins.eval``
  or any class is refused by our own error class (``PickledCodeError``), whatever words torch uses.
- ``content_digest`` is the sha256 of every value of a state (tensor bytes with dtype and shape, and the
  ``repr`` of every plain value, in order); ``save_checkpoint`` stores it under ``integrity`` and
  ``load_checkpoint`` recomputes it, so flipped bytes inside a tensor are found even when the CRCs agree.
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import pickletools
import zipfile
from pathlib import Path

import torch

from lavis.common.errors import CheckpointError

INTEGRITY_KEY = "integrity"


class PickledCodeError(CheckpointError):
    """A checkpoint that names code to import and run (a pickled global outside the weights-only allowlist)."""


def _allowed_globals() -> set[str]:
    # torch's own weights-only allowlist (a private helper: torch has no public listing), plus any
    # class a user registered with torch.serialization.add_safe_globals.
    from torch import _weights_only_unpickler

    allowed = {_python3_name(*name.rsplit(".", 1)) for name in _weights_only_unpickler._get_allowed_globals()}
    for item in torch.serialization.get_safe_globals():
        obj = item[0] if isinstance(item, tuple) else item
        allowed.add(f"{obj.__module__}.{obj.__qualname__}")
    return allowed


def _python3_name(module: str, name: str) -> str:
    # Protocol-2 pickles name Python 2 modules (``__builtin__.eval``); the unpickler maps them as pickle does.
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _pickle_record(archive: zipfile.ZipFile) -> str | None:
    names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    return names[0] if len(names) == 1 else None


def check_archive(path: Path) -> zipfile.ZipFile:
    """The open zip archive of a torch checkpoint; a CheckpointError for a truncated, foreign or CRC-corrupt file."""
    try:
        archive = zipfile.ZipFile(path)
        bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated, or not a torch zip file: {type(err).__name__}: {err})"
        ) from None
    except Exception as err:  # noqa: BLE001 - zlib and struct errors of damaged archives
        raise CheckpointError(f"{path}: not a readable checkpoint (damaged archive: {type(err).__name__})") from None
    if bad is not None:
        raise CheckpointError(
            f"{path}: corrupt checkpoint: the CRC of its record {bad!r} does not match (the file "
            f"was damaged after it was written)"
        )
    if _pickle_record(archive) is None:
        raise CheckpointError(f"{path}: not a readable checkpoint (no data.pkl record: not written by torch.save)")
    return archive


def find_code_globals(archive: zipfile.ZipFile) -> list[str]:
    """The globals (``module.name``) the archive's pickle would import that are not weights-only safe."""
    data = archive.read(_pickle_record(archive))
    allowed = _allowed_globals()
    found: list[str] = []
    recent: list = []  # values pushed lately (strings matter: STACK_GLOBAL pops module and name)
    memo: dict = {}
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                recent.append(_python3_name(module, attr))
                found.append(recent[-1])
            elif name == "STACK_GLOBAL":
                module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else ("?", "?")
                del recent[-2:]
                recent.append(_python3_name(str(module), str(attr)))
                found.append(recent[-1])
            elif "UNICODE" in name or name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
                recent.append(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = recent[-1] if recent else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(int(arg)))
            elif name not in ("PROTO", "FRAME", "STOP"):
                recent.append(None)
            del recent[:-8]
    except Exception:  # noqa: BLE001 - a damaged pickle: torch.load reports it
        pass
    return [g for g in dict.fromkeys(found) if g not in allowed]


def refuse_code(path: Path, archive: zipfile.ZipFile) -> None:
    """A PickledCodeError when the file names code (nothing is executed: the opcodes are only read)."""
    code = find_code_globals(archive)
    if code:
        raise PickledCodeError(
            f"{path}: refused: this file carries pickled code (GLOBAL {', '.join(code[:3])}); it was not executed. "
            f"Checkpoints of this framework hold only tensors and plain values; do not load this file with "
            f"weights_only=False unless you trust whoever wrote it"
        )


def _feed(digest, value, where: str) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"{where}:{t.dtype}:{tuple(t.shape)}:".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"{where}:dict{len(value)}:".encode())
        for key, sub in value.items():
            _feed(digest, sub, f"{where}/{key!r}")
    elif isinstance(value, (list, tuple)):
        digest.update(f"{where}:{type(value).__name__}{len(value)}:".encode())
        for i, sub in enumerate(value):
            _feed(digest, sub, f"{where}/{i}")
    else:
        digest.update(f"{where}={value!r};".encode())


def content_digest(state: dict) -> str:
    """sha256 (hex) of every value of ``state`` except its ``integrity`` entry."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != INTEGRITY_KEY}, "")
    return digest.hexdigest()


def check_digest(path: Path, state: dict) -> None:
    """A CheckpointError unless the state's stored content hash matches its content."""
    record = state.get(INTEGRITY_KEY)
    if record is None:
        version = state.get("format_version", 1)
        if isinstance(version, int) and version >= 2:
            raise CheckpointError(f"{path}: corrupt checkpoint: its content hash is missing")
        return  # written before checkpoints carried a hash
    if not isinstance(record, dict) or record.get("sha256") != content_digest(state):
        raise CheckpointError(
            f"{path}: corrupt checkpoint: its content does not match the sha256 stored in it "
            f"(the file was damaged after it was written)"
        )
