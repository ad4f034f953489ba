"""`mixturelm inspect`: a checkpoint and a text in, a folder with inspect.html, inspect.json and the PNGs out."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UsageError
from ..files import OutputFolder, write_bytes_atomic, write_text_atomic
from .html import page
from .routing import FORMAT, RoutingViews, routing_views

DEFAULT_MAX_TOKENS = 1024


INSPECT_KIND = "inspect output"


def check_out(out_dir: str | Path, overwrite: bool) -> OutputFolder:
    """out_dir must be new, empty, or (with overwrite) an earlier inspect output: nothing else is touched."""
    if isinstance(out_dir, OutputFolder):
        return out_dir
    return OutputFolder(out_dir, INSPECT_KIND, overwrite=overwrite, legacy=lambda p: _previous_files(p) is not None,
                        exists_hint="add `overwrite=True` to replace it, or choose another `out`").check()


def _previous_files(out: Path) -> list[str] | None:
    try:
        prev = json.loads((out / "inspect.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(prev, dict) or prev.get("format") != FORMAT:
        return None
    return [f for f in prev.get("files", []) if isinstance(f, str) and "/" not in f and f.endswith(".png")]


def run_inspect(ckpt: str | Path, text: str, out_dir: Path, max_tokens: int = DEFAULT_MAX_TOKENS, *,
                overwrite: bool = False, device: str = "cpu") -> RoutingViews:
    """Load a checkpoint, tokenize `text` with its run's tokenizer (the first max_tokens tokens), and
    write out_dir/inspect.html (a page around the fragment), out_dir/inspect.json (the summary) and the
    PNGs. Checks every input before writing anything."""
    from .. import checkpoint

    if not text:
        raise UsageError("the text is empty; give some `text`")
    if max_tokens < 1:
        raise UsageError(f"`max_tokens` must be >= 1, got {max_tokens}")
    out = check_out(out_dir, overwrite)
    model, run_cfg, tokenizer, ckpt_dir = checkpoint.load_model(ckpt, device)
    # surrogateescape: bytes of a command line that are not UTF-8 are routed as the bytes they are
    all_ids = torch.as_tensor(tokenizer.encode(text.encode("utf-8", "surrogateescape")), dtype=torch.long)
    if all_ids.numel() == 0:
        raise UsageError("the text gives no tokens; give some `text`")
    ids = all_ids[:max_tokens]
    title = f"{run_cfg.get('preset') or ckpt_dir.parent.parent.name} ({ckpt_dir.name})"
    window = min(run_cfg["train"].get("seq_len") or model.config.max_seq_len, model.config.max_seq_len)
    views = routing_views(model, tokenizer, ids, title, window=window)
    views.summary.update(checkpoint=str(ckpt_dir), text_tokens=int(all_ids.numel()),
                         truncated=bool(all_ids.numel() > ids.numel()), files=sorted(views.figures))
    out = out.claim().path  # every input checked: lock, empty when replacing, mark
    for name, png in views.figures.items():
        write_bytes_atomic(out / name, png)
    write_text_atomic(out / "inspect.html", page(views.html, f"mixturelm inspect: {title}"))
    write_text_atomic(out / "inspect.json", json.dumps(views.summary, indent=1))
    return views
