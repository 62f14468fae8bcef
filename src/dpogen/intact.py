"""Whether a finished output is whole, told cheaply from its structure: a few bytes read per file, never the
whole of a large one. The workflow asks it at every invocation (folders Snakemake cannot see into) and before
any job starts (the inputs of the jobs it is about to run); a job that fails asks it of its inputs.

What each kind must show:
- Parquet: ``PAR1`` at both ends and a footer that fits in the file (a truncated or overwritten file fails);
- ``.npy``: a readable header whose shape and dtype account for the file's size;
- ``.safetensors``: a JSON header whose tensors end where the file ends;
- JSON: parses (a large one, a tokenizer's vocabulary, ends as JSON does);
- a folder: each of its files as above; a model folder (``config.json``) has its weights, and every shard its
  index names; a features folder every step its index.json names; a margins folder matches the manifest in
  the run.json beside it (``tables.margins_damage``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


def damage(path) -> str | None:
    """What is wrong with a finished output, or None when it looks whole (or is not there: a missing file is
    Snakemake's to see)."""
    path = Path(path)
    if path.is_dir():
        return _folder(path)
    if not path.exists():
        return None
    try:
        return _CHECKS.get(path.suffix.lower(), lambda p: None)(path)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:  # a header of another shape
        return f"not what its name says ({type(e).__name__}: {e})"


def _parquet(path: Path) -> str | None:
    size = path.stat().st_size
    if size < 12:
        return f"not a Parquet file ({size} bytes)"
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(size - 8)
        tail = f.read(8)
    (footer,) = struct.unpack("<I", tail[:4])
    if head != b"PAR1" or tail[4:] != b"PAR1":
        return "not a Parquet file, or truncated (no PAR1 marker at its " + ("start)" if head != b"PAR1" else "end)")
    if footer > size - 12:
        return f"truncated (its footer claims {footer} bytes of {size})"
    return None


def _npy(path: Path) -> str | None:
    import numpy as np

    with path.open("rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        except ValueError as e:
            return f"not a .npy file ({e})"
        start = f.tell()
    if dtype.hasobject:
        return None
    want = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != want:
        return f"truncated or padded ({size} bytes, its header {list(shape)} {dtype} needs {want})"
    return None


def _safetensors(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return f"not a safetensors file ({size} bytes)"
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            return f"truncated (its header claims {n} bytes of {size})"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "not a safetensors file (its header is not JSON)"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return None if 8 + n + end == size else f"truncated or padded ({size} bytes, its tensors need {8 + n + end})"


def _json(path: Path) -> str | None:
    """Parsed whole when small; a large one (a tokenizer's vocabulary) by its last character."""
    size = path.stat().st_size
    if size > 1 << 20:
        with path.open("rb") as f:
            f.seek(size - 64)
            end = f.read().rstrip()
        return None if end.endswith((b"}", b"]")) else "truncated (it does not end as JSON does)"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return f"not valid JSON ({e})"
    return None


_CHECKS = {".parquet": _parquet, ".npy": _npy, ".safetensors": _safetensors, ".json": _json}


def _folder(path: Path) -> str | None:
    try:
        return _folder_parts(path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # an index or manifest of another shape
        return f"its index does not read as one ({type(e).__name__}: {e})"


def _folder_parts(path: Path) -> str | None:
    if path.suffix == ".parquet" and (path.parent / "run.json").exists():  # partitioned margins
        from .tables import margins_damage

        return margins_damage(path, quick=True)
    if (path / "config.json").exists():
        why = _model(path)
        if why:
            return why
    if path.name == "features":  # g(x) under the policy: index.json names the steps it holds
        why = _features(path)
        if why:
            return why
    for f in sorted(path.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            why = damage(f)
            if why:
                return f"{f.relative_to(path)}: {why}"
    return None


def _features(path: Path) -> str | None:
    index = path / "index.json"
    if not index.exists():
        return "index.json is missing"
    try:
        steps = json.loads(index.read_text()).get("steps", [])
    except ValueError as e:
        return f"index.json: not valid JSON ({e})"
    missing = [s for s in steps if not (path / f"step={s}.npy").exists()]
    return f"step={missing[0]}.npy is missing (index.json lists {len(steps)} steps)" if missing else None


def _model(path: Path) -> str | None:
    """A model folder has its weights: a weights file, or every shard its index lists."""
    index = next(iter(path.glob("*.index.json")), None)
    if index is not None:
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except ValueError as e:
            return f"{index.name}: not valid JSON ({e})"
        missing = sorted(s for s in shards if not (path / s).exists())
        return f"{missing[0]} is missing ({index.name} lists {len(shards)} shards)" if missing else None
    weights = [f for p in WEIGHTS for f in path.glob(p)]
    if not weights:
        return "no weights (model.safetensors or pytorch_model.bin): config.json without a model"
    if any("-of-" in f.name for f in weights):
        return "weight shards without the index that names them (*.index.json)"
    return None


def rebuild(path, configfiles=None) -> str:
    """How to make a damaged output again, and what depends on it: the command in full when the config files
    the run used are known, else the option to add."""
    if configfiles is None:
        return f"rerun the workflow with --forcerun {path}"
    return " ".join(["snakemake --cores 2", *(f"--configfile {f}" for f in configfiles), f"--forcerun {path}"])


def stale(folder) -> None:
    """Set a folder output's timestamp (Snakemake's ``.snakemake_timestamp``) back to the epoch: older than
    any input, so the rule that makes it reruns; its files are left as they are."""
    mark = Path(folder) / ".snakemake_timestamp"
    mark.touch()
    os.utime(mark, (0, 0))


def damaged_folders(paths) -> dict[str, str]:
    """Of a workflow's outputs, the folders that exist and are not whole → why. Snakemake sees a deleted
    file but not a deleted or damaged part of a folder (a margins partition, a model's weights). A folder
    that cannot be read is left to the job that reads it."""
    out = {}
    for p in paths:
        if Path(p).is_dir():
            try:
                why = damage(p)
            except OSError:
                continue
            if why:
                out[str(p)] = why
    return out


def refusal(bad: list[tuple[str, str, str]], configfiles=None) -> str:
    """The message that stops a run whose jobs would read damaged inputs: (path, the rule that makes it, why)."""
    lines = [f"{path} is damaged: {why}; rule {rule} makes it: rebuild it, and what depends on it, with\n"
             f"    {rebuild(path, configfiles)}" for path, rule, why in bad]
    return ("inputs checked before any job ran; nothing was run and every finished output is as it was:\n  "
            + "\n  ".join(lines))
