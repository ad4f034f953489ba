"""The pieces every routing view is drawn with: tokens as text, the page's style, text views, figures.

Nothing here routes or names a mechanism: each mechanism's view (in its home, mixturelm.mechanisms)
draws itself with these.
"""

from __future__ import annotations

import base64
import codecs
import colorsys
import html
import io

from ..plotting import pyplot

CSS_PREFIX = "mlmi"  # every class of the HTML fragment starts with this

# ----------------------------------------------------------------------------------------------
# Tokens as text

_CONTROL = {c: chr(0x2400 + c) for c in range(32) if chr(c) not in "\n\t"} | {0x7F: "\u2421"}


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for the 256 bytes (GPT-2's bytes_to_unicode), reversed."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The bytes a token stands for; None for a special token (end of document)."""
    if token_id == getattr(tokenizer, "eos_id", None):
        return None
    if getattr(tokenizer, "name", "") == "bytes":
        return bytes([token_id]) if token_id < 256 else None
    tok = getattr(tokenizer, "tok", None)
    if tok is not None:  # byte-level BPE (Hugging Face tokenizers)
        piece, table = tok.id_to_token(token_id), _byte_level_table()
        if piece is not None and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token, in order. A character split over several tokens (bytes, byte-level BPE)
    goes to the token that completes it: the tokens before it get "" (they are still shown, as a thin
    mark). Bytes that are not UTF-8 become U+FFFD; control characters their visible symbols."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    for i in ids:
        b = _token_bytes(tokenizer, int(i))
        if b is None:
            pieces.append(decoder.decode(b"", final=True) + "\u27e8eos\u27e9")
            decoder.reset()
        else:
            pieces.append(decoder.decode(b))
    if pieces:
        pieces[-1] += decoder.decode(b"", final=True)
    return ["".join(_CONTROL.get(ord(ch), ch) for ch in p) for p in pieces]


# ----------------------------------------------------------------------------------------------
# Figures and colours

def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def expert_colour(e: int, n_experts: int) -> str:
    """A light colour per expert id (dark text stays readable on it); hues spread over the experts."""
    hue = (e * 0.618034) % 1.0 if n_experts > 12 else e / max(1, n_experts)
    r, g, b = colorsys.hls_to_rgb(hue, 0.78, 0.75)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


NOOP_COLOUR, NONE_COLOUR, MOD_COLOUR = "#d9d9d9", "#ffffff", "#ffb74d"


# ----------------------------------------------------------------------------------------------
# HTML

P = CSS_PREFIX
STYLE = f"""<style>
.{P}{{font-family:system-ui,sans-serif;font-size:14px;color:#222;max-width:70em}}
.{P} .{P}-h{{font-size:1.2em;margin:0.8em 0 0.3em}}
.{P} .{P}-h2{{font-size:1.05em;margin:0.8em 0 0.2em}}
.{P} .{P}-note{{color:#555;margin:0.2em 0}}
.{P} .{P}-text{{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;line-height:1.7;
  border:1px solid #ddd;padding:0.5em;margin:0.3em 0 0.8em;overflow-wrap:anywhere}}
.{P} .{P}-t{{border-radius:2px}}
.{P} .{P}-on{{background:{MOD_COLOUR}}}
.{P} .{P}-part{{display:inline-block;min-width:0.25em;height:1em;vertical-align:middle}}
.{P} .{P}-noop{{background:{NOOP_COLOUR};text-decoration:line-through}}
.{P} .{P}-none{{outline:1px dotted #888}}
.{P} .{P}-skip{{color:#aaa}}
.{P} .{P}-win{{border-left:2px solid #1e88e5;margin:0 1px}}
.{P} .{P}-legend{{display:flex;flex-wrap:wrap;gap:0.3em 0.8em;font-size:12px;margin:0.2em 0}}
.{P} .{P}-sw{{display:inline-block;width:1em;height:1em;vertical-align:middle;margin-right:0.25em;
  border:1px solid #888}}
.{P} .{P}-fig{{max-width:100%;height:auto;display:block;margin:0.3em 0}}
.{P} .{P}-table{{border-collapse:collapse;font-size:13px}}
.{P} .{P}-table td,.{P} .{P}-table th{{border:1px solid #ddd;padding:2px 6px;text-align:left}}
</style>"""


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def text_view(pieces: list[str], window: int, spans) -> str:
    """The text, one span per token: spans(i) -> (class, inline style or "", tooltip)."""
    out = []
    for i, piece in enumerate(pieces):
        if i and i % window == 0:
            out.append(f'<span class="{P}-win" title="window {i // window + 1} starts"></span>')
        cls, style, tip = spans(i)
        cls = f"{P}-t {cls}" + (f" {P}-part" if piece == "" else "")
        style = f' style="{style}"' if style else ""
        tip = f"#{i} {piece!r}" + (f" · {tip}" if tip else "") + (" (bytes of a character finished later)"
                                                                  if piece == "" else "")
        out.append(f'<span class="{cls}"{style} title="{esc(tip)}">{esc(piece)}</span>')
    return f'<div class="{P}-text">{"".join(out)}</div>'


def img(name: str, data: bytes, alt: str) -> str:
    return (f'<img class="{P}-fig" alt="{esc(alt)}" title="{esc(name)}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">')


def page(fragment: str, title: str) -> str:
    """A complete self-contained page around a fragment."""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{esc(title)}</title></head>\n<body>\n{fragment}\n</body></html>\n')
