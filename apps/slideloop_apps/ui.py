"""Small presentation helpers shared by the app's views (no state, no core calls)."""

from __future__ import annotations

import html

#: (text colour, background) of a message banner per level
LEVEL_STYLE = {"info": ("#0b3d62", "#e8f1f8"), "warning": ("#6b4a00", "#fff4d6"), "error": ("#8a1010", "#fde8e8")}


def message_html(text: str, level: str = "info") -> str:
    """The banner a view shows for its state's last message (escaped; empty text gives no banner)."""
    if not text:
        return ""
    fg, bg = LEVEL_STYLE.get(level, LEVEL_STYLE["info"])
    return (f"<div style='color:{fg};background:{bg};border-left:4px solid {fg};"
            f"padding:6px 10px;margin:4px 0'>{html.escape(text)}</div>")
