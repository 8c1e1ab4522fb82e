"""Map tiles of slides and overlays as image bytes, for the server extension. No web framework here."""
