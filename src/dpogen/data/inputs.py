"""The local files a run's data come from, as inputs of the rules that read them: editing one reruns the
data stage (and the base model's tokenizer when it is trained on the text) and what follows."""

from __future__ import annotations

from pathlib import Path


def _local(paths) -> list[str]:
    if paths is None:
        return []
    if isinstance(paths, (str, Path)):
        paths = [paths]
    elif isinstance(paths, dict):  # datasets' {split: files}
        paths = [p for v in paths.values() for p in ([v] if isinstance(v, (str, Path)) else v)]
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.exists():
            out.append(str(p))
    return out


def data_files(data, all_concepts: bool = False) -> list[str]:
    """Files of ``data.source`` (``data``: settings.Data) on this machine (a hub dataset has none: its revision
    pins it). Persona: the run's personas' files, or every persona file with ``all_concepts`` (the tokenizer's
    corpus)."""
    src = data.source
    if src == "files":
        return _local(data.files.paths)
    if src == "hf":
        return _local(data.hf.data_files) + (_local(data.hf.path) if Path(data.hf.path or
                                                                                          "\0").is_dir() else [])
    if src == "persona":
        folder = Path(data.persona.path)
        if not folder.is_dir():
            return []
        if all_concepts or not (data.persona.names or data.k):
            return sorted(str(p) for p in folder.glob("*.jsonl"))
        names = data.persona.names
        if not names:
            from .sources import persona_names, persona_set

            names = persona_set(persona_names(folder), data.k, data.persona.seed)
        return [str(folder / f"{n}.jsonl") for n in names if (folder / f"{n}.jsonl").exists()]
    return []
