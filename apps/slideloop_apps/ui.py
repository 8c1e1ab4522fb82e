"""Small presentation helpers shared by the app's views (no state, no core calls)."""

from __future__ import annotations

import html

#: (text colour, background) of a message banner per level
LEVEL_STYLE = {"info": ("#0b3d62", "#e8f1f8"), "ok": ("#0c5a1c", "#e6f4ea"), "warning": ("#6b4a00", "#fff4d6"),
               "error": ("#8a1010", "#fde8e8")}


#: candidate scale-bar lengths (µm, or px on an uncalibrated slide); the one drawn is 60–150 screen px long
SCALE_STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def scale_bar_html(mpp: float | None, level0_px_per_screen_px: float) -> str:
    """A scale bar for the map: a round length in µm (mm from 1000 µm), or in slide pixels without a scale."""
    unit_per_px, unit = (mpp * level0_px_per_screen_px, "µm") if mpp else (level0_px_per_screen_px, "px")
    length = next((s for s in SCALE_STEPS if s / unit_per_px >= 60), SCALE_STEPS[-1])
    label = f"{length / 1000:g} mm" if unit == "µm" and length >= 1000 else f"{length:g} {unit}"
    if not mpp:  # slide pixels are no physical length: say so, not just "px"
        label += " (uncalibrated: no µm/px)"
    width = max(1, round(length / unit_per_px))
    return (f"<div style='background:rgba(255,255,255,.85);padding:2px 6px;font:12px sans-serif'>"
            f"<div style='width:{width}px;height:6px;border:2px solid #222;border-top:none'></div>{label}</div>")


def message_html(text: str, level: str = "info") -> str:
    """The banner a view shows for its state's last message (escaped; empty text gives no banner)."""
    if not text:
        return ""
    fg, bg = LEVEL_STYLE.get(level, LEVEL_STYLE["info"])
    return (f"<div style='color:{fg};background:{bg};border-left:4px solid {fg};"
            f"padding:6px 10px;margin:4px 0;white-space:pre-wrap'>{html.escape(text)}</div>")


def slide_label(name: str, mpp: float | None) -> str:
    """A slide picker entry: the name, marked when the slide has no µm/px (uncalibrated)."""
    return name if mpp else f"{name} (uncalibrated)"
