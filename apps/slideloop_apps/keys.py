"""The review page's keyboard: which key does what, and the help the ``?`` key shows (no widgets here)."""

from __future__ import annotations

import html

#: (keys as the page reports them, action, what it does); modifiers are written ``ctrl+``/``alt+``
KEYS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("n", "j", "ArrowDown"), "next", "next patch in the queue"),
    (("p", "k", "ArrowUp"), "prev", "previous patch"),
    (("s", "Enter"), "save", "save (applies a wand selection first)"),
    (("a",), "accept", "accept the prediction for the whole patch"),
    (("b",), "tool:brush", "brush: paint the active class"),
    (("e",), "tool:eraser", "eraser: paint background"),
    (("c",), "tool:accept", "accept brush: take the prediction where you paint"),
    (("w",), "tool:wand", "wand: click a region (Shift adds, Alt subtracts)"),
    (("v",), "tool:select", "select a saved polygon (then 1–9 or Delete)"),
    (("Escape",), "escape", "drop the selection, back to panning"),
    (tuple("123456789"), "class", "active class 1–9 (or the picked polygon's class)"),
    (("[", "]"), "size", "brush smaller / larger"),
    (("-", "="), "tolerance", "wand tolerance down / up"),
    (("Delete", "Backspace"), "delete", "delete the picked polygon"),
    (("l",), "toggle:labels", "labels on / off"),
    (("o",), "toggle:prediction", "prediction on / off"),
    (("m",), "toggle:errors", "error map (false positives / negatives) on / off"),
    (("ctrl+z", "u"), "undo", "undo: the last unsaved shape, else the last saved edit"),
    (("ctrl+Z", "ctrl+y", "U"), "redo", "redo a saved edit"),
    (("?",), "help", "show / hide these keys"),
)

#: key → action
KEYMAP: dict[str, str] = {k: action for keys, action, _ in KEYS for k in keys}

_SHOWN = {"ArrowDown": "↓", "ArrowUp": "↑", "ctrl+z": "Ctrl+Z", "ctrl+Z": "Ctrl+Shift+Z", "ctrl+y": "Ctrl+Y",
          "Escape": "Esc", "Backspace": "⌫", "Enter": "Enter"}


def help_html() -> str:
    """A compact two-column table of the keys, for the help panel."""
    rows = []
    for keys, action, text in KEYS:
        shown = "1–9" if action == "class" else " ".join(_SHOWN.get(k, k) for k in keys)
        rows.append(f"<tr><td style='padding:1px 8px 1px 0;white-space:nowrap'><kbd>{html.escape(shown)}</kbd></td>"
                    f"<td>{html.escape(text)}</td></tr>")
    # a floating card over the map's corner: opening it must not push the queue off the screen
    return ("<div class='slideloop-help' style='position:fixed;right:16px;top:56px;z-index:2000;font-size:12px;"
            "line-height:1.35;background:#fff;border:1px solid #999;box-shadow:0 2px 8px rgba(0,0,0,.3);"
            "padding:8px 10px'><b>Keys</b> anywhere on the page (? closes); Space+drag pans while a tool is on"
            f"<table style='border-collapse:collapse;margin-top:4px'>{''.join(rows)}</table></div>")
